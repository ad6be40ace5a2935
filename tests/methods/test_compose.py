"""Composed patches (Ansell et al., ACL 2022): out = b + scale * sum_i s_i p_i in one pass, overlapping
entries added, exact pairwise overlap counts, patches of different bases refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ckpt_factory import INT_NAME, load_f32, load_raw, make_family, round_to
from click.testing import CliRunner
from surgery_cli.main import cli

from surgery.checkpoint import open_checkpoint
from surgery.compose import overlaps
from surgery.engine import EngineOptions, merge
from surgery.errors import PlanError
from surgery.recipe import make_recipe


def surgery(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "-q"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def patches(tmp_path):
    base, (ft1, ft2) = make_family(tmp_path / "in", n_models=2, dtype="BF16", quantize=True)
    surgery("diff", base, ft1, "--density", "0.3", "-o", tmp_path / "p1")
    surgery("diff", base, ft2, "--density", "0.4", "-o", tmp_path / "p2")
    surgery("diff", base, ft2, "-o", tmp_path / "d2")  # dense
    return base, tmp_path


def read_patch(folder):
    raw = load_raw(folder)
    names = {n.rsplit(".", 1)[0] for n in raw}
    return {n: (raw[n + ".indices"].numpy(), raw[n + ".values"].numpy()) for n in names}


def reference(base, parts, scales, scale=1.0):
    """Whole tensors: acc = sum_i s_i p_i in float32 (patch order), b + scale * acc where touched."""
    b = load_f32(base)
    out = {}
    for name, t in b.items():
        if name == INT_NAME:
            continue
        acc = np.zeros(t.size, np.float32)
        hit = np.zeros(t.size, bool)
        for part, s in zip(parts, scales):
            if isinstance(part, dict) and name in part:  # sparse: (indices, values)
                idx, val = part[name]
                acc[idx] = acc[idx] + np.float32(s) * val
                hit[idx] = True
            elif not isinstance(part, dict):  # dense diff folder
                acc = acc + np.float32(s) * load_f32(part)[name].reshape(-1)
                hit[:] = True
        flat = t.reshape(-1).copy()
        flat[hit] = flat[hit] + np.float32(scale) * acc[hit]
        out[name] = round_to(flat.reshape(t.shape), "BF16")
    return out


def test_two_patches_match_reference_and_overlaps(patches):
    base, tmp = patches
    res = surgery("apply", tmp / "p1", tmp / "p2", "--to", base, "--scales", "1,0.5", "-o", tmp / "out")
    p1, p2 = read_patch(tmp / "p1"), read_patch(tmp / "p2")
    want = reference(base, [p1, p2], [1.0, 0.5])
    got = load_raw(tmp / "out")
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert torch.equal(got[INT_NAME], load_raw(base)[INT_NAME])
    # overlap counts from index sets
    n1 = sum(v[0].size for v in p1.values())
    n2 = sum(v[0].size for v in p2.values())
    both = sum(len(set(p1[n][0]) & set(p2[n][0])) for n in p1 if n in p2)
    assert 0 < both < min(n1, n2)
    assert "shared entries" in res.output
    with open_checkpoint(tmp / "p1") as a, open_checkpoint(tmp / "p2") as b:
        table = overlaps([a, b], window=5)  # windows smaller than a tensor: counts are still exact
    assert table.entries == (n1, n2)
    assert table.shared == ((n1, both), (both, n2))
    recipe = (tmp / "out" / "surgery_recipe.yaml").read_text()
    assert "method: compose" in recipe and "- 0.5" in recipe


def test_json_table_and_dense_diff_in_the_mix(patches):
    base, tmp = patches
    res = CliRunner().invoke(cli, ["apply", str(tmp / "p1"), str(tmp / "d2"), "--to", str(base), "-q",
                                   "--json", "--scales", "0.5,1", "-o", str(tmp / "out")])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    p1 = read_patch(tmp / "p1")
    n1 = sum(v[0].size for v in p1.values())
    dense = sum(t.numel() for t in load_raw(tmp / "d2").values())
    assert data["entries"] == [n1, dense] and data["shared"] == [[n1, n1], [n1, dense]]
    got = load_raw(tmp / "out")
    for name, t in reference(base, [p1, tmp / "d2"], [0.5, 1.0]).items():
        assert torch.equal(got[name], t), name


def test_one_patch_is_todays_apply_bitwise(patches):
    base, tmp = patches
    surgery("apply", tmp / "p1", "--to", base, "--scale", "0.5", "-o", tmp / "a")
    surgery("apply", tmp / "p1", "--to", base, "--scales", "0.5", "-o", tmp / "b")
    a, b = (tmp / "a" / "model.safetensors").read_bytes(), (tmp / "b" / "model.safetensors").read_bytes()
    assert a == b
    res = CliRunner().invoke(
        cli, ["apply", str(tmp / "p1"), "--to", str(base), "--json", "-q", "-o", str(tmp / "c")]
    )
    n1 = sum(v[0].size for v in read_patch(tmp / "p1").values())
    assert json.loads(res.stdout) == {"sources": [str(tmp / "p1")], "entries": [n1], "shared": [[n1]]}
    p1 = read_patch(tmp / "p1")
    got, bf = load_raw(tmp / "a"), load_f32(base)
    for name, (idx, val) in p1.items():  # the formula apply has always used: b[i] + scale * v_i
        flat = bf[name].reshape(-1).copy()
        flat[idx] = flat[idx] + np.float32(0.5) * val
        assert torch.equal(got[name], round_to(flat.reshape(bf[name].shape), "BF16"))


def test_streamed_equals_whole(patches):
    base, tmp = patches
    recipe = make_recipe("compose", [str(tmp / "p1"), str(tmp / "p2"), str(tmp / "d2")], str(base),
                         {"scales": [1.0, -0.5, 0.25], "scale": 0.75})  # fmt: skip
    merge(recipe, tmp / "whole", EngineOptions(max_memory=2**30, threads=1))
    merge(recipe, tmp / "tiny", EngineOptions(max_memory=300, threads=3))
    assert (tmp / "whole" / "model.safetensors").read_bytes() == (
        tmp / "tiny" / "model.safetensors"
    ).read_bytes()
    parts = [read_patch(tmp / "p1"), read_patch(tmp / "p2"), tmp / "d2"]
    got = load_raw(tmp / "whole")
    for name, t in reference(base, parts, [1.0, -0.5, 0.25], 0.75).items():
        assert torch.equal(got[name], t), name


def test_patches_of_different_bases_are_refused(patches):
    base, tmp = patches
    other, (oft,) = make_family(tmp / "other", n_models=1, dtype="BF16", seed=5)
    surgery("diff", other, oft, "--density", "0.2", "-o", tmp / "q")
    args = ["apply", str(tmp / "p1"), str(tmp / "q"), "--to", str(base), "-o", str(tmp / "out")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1
    assert f"{tmp / 'p1'} was taken from base {base} and {tmp / 'q'} from {other}" in res.output
    assert "hint: " in res.output and "--force-base" in res.output
    assert not (tmp / "out").exists()
    with pytest.raises(PlanError, match="base tensors differ"):
        make = make_recipe("compose", [str(tmp / "p1"), str(tmp / "q")], str(base), {})
        merge(make, tmp / "out")
    res = CliRunner().invoke(cli, [*args, "--force-base", "-q"])
    assert res.exit_code == 0, res.output
    assert f"warning: {tmp / 'q'}: the target differs from the base this diff" in res.output
    assert "force_base: true" in (tmp / "out" / "surgery_recipe.yaml").read_text()


def test_scales_count_must_match(patches):
    base, tmp = patches
    res = CliRunner().invoke(cli, ["apply", str(tmp / "p1"), str(tmp / "p2"), "--to", str(base),
                                   "--scales", "1", "-o", str(tmp / "out")])  # fmt: skip
    assert res.exit_code == 1
    assert "error: compose: scales has 1 values for 2 models" in res.output


def test_a_patch_value_inf_is_carried_not_refused(patches):
    # the non-finite check: a composed patch's own values are inputs, so its inf is carried
    from safetensors.torch import save_file

    base, tmp = patches
    raw = load_raw(tmp / "p2")  # the second input: every composed input counts
    name = next(n for n in raw if n.endswith(".values"))
    raw[name][0] = float("inf")
    save_file(raw, str(tmp / "p2" / "model.safetensors"))
    res = CliRunner().invoke(cli, ["apply", str(tmp / "p1"), str(tmp / "p2"), "--to", str(base), "-q",
                                   "-o", str(tmp / "out")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert not torch.isfinite(load_raw(tmp / "out")[name[: -len(".values")]].float()).all()
