"""Optimised skill grafting (Panigrahi et al. 2023): the relaxed mask starts at the data-free mask,
full / empty masks give the fine-tune / the base, and the written patch round-trips through
`surgery apply`. Tiny Llama models are built from configs (no download)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from analysis.test_tuco import finetune_of, make_model, make_tokenizer  # noqa: E402

from surgery.analysis.localize import (  # noqa: E402
    compare_patches,
    gamma,
    grafted_params,
    localize,
    read_examples,
    region_names,
)
from surgery.errors import OutputError, RecipeError  # noqa: E402

EXAMPLES = [("abc=", "cba"), ("bad=", "dab"), ("ace=", "eca"), ("fgh=", "hgf")] * 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft")
    base = make_model(0, layers=2)
    ft = finetune_of(base, 0.05)
    tok = make_tokenizer()
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [json.dumps({"prompt": p, "answer": a}) for p, a in EXAMPLES]
    (root / "data.jsonl").write_text("\n".join(rows) + "\n")
    return root, base, ft


def test_gamma_rounds_to_base_mask_at_init():
    gen = torch.Generator().manual_seed(0)
    m0 = (torch.rand(1000, generator=gen) < 0.1).float()
    s = torch.rand(1000, generator=gen)
    assert torch.equal(gamma(m0, s).round(), m0)


def test_full_mask_gives_finetuned_and_empty_gives_base(family):
    _, base, ft = family
    b = {n: p.detach() for n, p in base.named_parameters()}
    f = {n: p.detach() for n, p in ft.named_parameters()}
    tau = {n: f[n] - b[n] for n in b}
    full = grafted_params(b, tau, {n: torch.ones_like(t) for n, t in tau.items()})
    empty = grafted_params(b, tau, {n: torch.zeros_like(t) for n, t in tau.items()})
    for n in b:
        torch.testing.assert_close(full[n], f[n])
        assert torch.equal(empty[n], b[n])


def test_region_defaults_to_blocks(family):
    names = region_names(family[1], None)
    assert names and all(".layers." in n for n in names)
    with pytest.raises(RecipeError, match="matches no float parameter"):
        region_names(family[1], "nothing-here")


def _read_patch(folder):
    import numpy as np

    from surgery.checkpoint import open_checkpoint
    from surgery.patch import INDICES, VALUES, patched_names

    with open_checkpoint(folder) as ckpt:
        return {
            n: (ckpt.read(n + INDICES).astype(np.int64), ckpt.read(n + VALUES)) for n in patched_names(ckpt)
        }


def test_zero_steps_is_the_data_free_graft(family, tmp_path):
    from surgery.engine import merge
    from surgery.recipe import make_recipe

    root = family[0]
    report = localize(root / "base", root / "ft", EXAMPLES, 0.05, tmp_path / "loc", steps=0)
    params = {"density": 0.05, "granularity": "global", "region": None}
    merge(make_recipe("patch", [str(root / "ft")], str(root / "base"), params), tmp_path / "df")
    ours, ref = _read_patch(tmp_path / "loc"), _read_patch(tmp_path / "df")
    assert ours.keys() == ref.keys()
    for n in ref:
        assert (ours[n][0] == ref[n][0]).all() and (ours[n][1] == ref[n][1]).all()
    assert report.kept == report.data_free_kept > 0
    assert compare_patches(tmp_path / "loc", tmp_path / "df")["overall"]["jaccard"] == 1.0
    # written by the same guarded writer as every output: the same bytes, staged, replaceable
    weights = (tmp_path / "loc" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "df" / "model.safetensors").read_bytes()
    assert not (tmp_path / "loc" / ".surgery-partial").exists()
    localize(root / "base", root / "ft", EXAMPLES, 0.05, tmp_path / "loc", steps=0, overwrite=True)
    assert (tmp_path / "loc" / "model.safetensors").read_bytes() == weights


def test_optimised_patch_round_trips_through_apply(family, tmp_path):
    from safetensors.torch import load_file

    from surgery.engine import merge
    from surgery.recipe import make_recipe

    root, base, ft = family
    report = localize(
        root / "base", root / "ft", EXAMPLES, 0.02, tmp_path / "p", steps=6, eval_every=2, lr=2.0, holdout=0.0
    )  # fmt: skip (scores on the data the mask was selected on)
    assert report.scores["optimised"]["loss"] <= report.scores["data_free"]["loss"]
    manifest = json.loads((tmp_path / "p" / "surgery_diff.json").read_text())
    assert manifest["kind"] == "patch" and manifest["kept"] == report.kept
    merge(make_recipe("apply_patch", [str(tmp_path / "p")], str(root / "base"), {}), tmp_path / "out")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(f))
    patch = _read_patch(tmp_path / "p")
    b = dict(base.named_parameters())
    for name, p in b.items():
        expect = p.detach().clone().flatten()
        if name in patch:
            idx, val = patch[name]
            expect[torch.from_numpy(idx)] += torch.from_numpy(val)
        torch.testing.assert_close(out[name].flatten(), expect)
    jac = compare_patches(tmp_path / "p", tmp_path / "p")
    assert jac["overall"]["jaccard"] == 1.0


def test_output_checks(family, tmp_path):
    root = family[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="is not empty"):
        localize(root / "base", root / "ft", EXAMPLES, 0.05, tmp_path / "full", steps=0)
    with pytest.raises(RecipeError, match="density"):
        localize(root / "base", root / "ft", EXAMPLES, 0.0, tmp_path / "o", steps=0)


def test_read_examples(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a=", "answer": "a"}\n\n')
    assert read_examples(tmp_path / "d.jsonl") == [("a=", "a")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a="}\n')
    with pytest.raises(RecipeError, match="needs string fields 'prompt' and 'answer'"):
        read_examples(tmp_path / "bad.jsonl")


def test_cli_localize_and_compare(family, tmp_path):
    from click.testing import CliRunner
    from surgery_cli.forward import localize_command

    root = family[0]
    args = [str(root / "base"), str(root / "ft"), "--data", str(root / "data.jsonl"), "--density", "0.05",
            "--steps", "2"]  # fmt: skip
    res = CliRunner().invoke(localize_command, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "optimised graft" in res.stdout and "data-free graft" in res.stdout
    res = CliRunner().invoke(localize_command, [*args, "--allow-growth", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(localize_command, [str(root / "base"), str(tmp_path / "a"), "--compare",
                                                str(tmp_path / "b"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert 0 < json.loads(res.stdout)["overall"]["jaccard"] <= 1
    res = CliRunner().invoke(localize_command, [str(root / "base"), str(root / "ft")])
    assert res.exit_code != 0 and "--data, --density and -o" in str(res.exception)
