"""Issue 10, item 3: `surgery apply` takes what `surgery diff` wrote (or a patch), never a full model."""

from __future__ import annotations

import torch
from cli_checks import assert_fails, snapshot
from safetensors.torch import load_file


def test_full_model_is_not_a_diff(invoke, make_family, tmp_path):
    base, (ft, _) = make_family()
    before = snapshot(tmp_path)
    result = invoke("apply", ft, "--to", base, "-o", tmp_path / "out", "-q")
    assert_fails(
        result,
        f"{ft} has no surgery_diff.json: it looks like a full model, not something `surgery diff` wrote",
        hint=f"take the diff first: `surgery diff BASE {ft} -o DIFF`",
    )
    assert "--raw-diff" in result.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_surgery_diff_output_and_raw_diff_escape(invoke, make_family, tmp_path, write_checkpoint):
    base, (ft, _) = make_family()
    assert invoke("diff", base, ft, "-o", tmp_path / "d", "-q").exit_code == 0
    assert invoke("apply", tmp_path / "d", "--to", base, "-o", tmp_path / "a", "-q").exit_code == 0
    # a hand-made diff (no manifest, no config): refused without the flag, applied with it
    b = load_file(str(base / "model.safetensors"))
    hand = write_checkpoint(tmp_path / "hand", {n: torch.full_like(t, 0.5) for n, t in b.items()})
    assert_fails(invoke("apply", hand, "--to", base, "-o", tmp_path / "h", "-q"), "it looks like a model")
    result = invoke("apply", hand, "--to", base, "--raw-diff", "-o", tmp_path / "h", "-q")
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert all(torch.equal(out[n], b[n] + 0.5) for n in b)


def _recipe(path, **fields):
    import yaml

    path.write_text(yaml.safe_dump({"version": 1, **fields}))
    return path


def test_run_checks_an_apply_recipe_the_same_way(invoke, make_family, tmp_path):
    base, (ft, _) = make_family()
    full = _recipe(tmp_path / "full.yaml", method="apply", base=str(base), models=[str(ft)])
    assert_fails(invoke("run", full, "-o", tmp_path / "o1", "-q"), "it looks like a full model",
                 hint=f"take the diff first: `surgery diff BASE {ft} -o DIFF`")  # fmt: skip
    assert not (tmp_path / "o1").exists()
    assert invoke("diff", base, ft, "-o", tmp_path / "d", "-q").exit_code == 0
    wrong = _recipe(
        tmp_path / "wrong.yaml", method="apply_patch", base=str(base), models=[str(tmp_path / "d")]
    )
    assert_fails(invoke("run", wrong, "-o", tmp_path / "o2"), "the recipe's method is apply_patch, but",
                 hint="write method: apply")  # fmt: skip
    ties = _recipe(tmp_path / "ties.yaml", method="ties", base=str(base), models=[str(ft)])
    assert_fails(
        invoke("run", ties, "--raw-diff", "-o", tmp_path / "o3"), "--raw-diff does nothing for a ties recipe"
    )
    ok = invoke("run", full, "--raw-diff", "-o", tmp_path / "o4", "-q")  # the escape hatch, as for apply
    assert ok.exit_code == 0, ok.output
