"""Arcee Fusion against its formula computed here (torch, float64: softmax, KL per row, sorted quartiles
by index), and its invariants; whole tensors, so a tensor over the budget is refused before writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ckpt_factory import load_f32, make_family, round_to

from surgery.engine import EngineOptions, merge
from surgery.errors import RecipeError
from surgery.recipe import make_recipe
from tests.methods.test_formulas import assert_matches, float_names, run


def fusion_reference(b: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the fused tensor in float32, the importance) as mergekit defines them, in float64."""
    bt, ft = torch.from_numpy(b).double(), torch.from_numpy(f).double()
    p = torch.softmax(ft, dim=-1) + 1e-8
    q = torch.softmax(bt, dim=-1) + 1e-8
    importance = (ft - bt).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, q2, q3 = (ordered[int(k * (ordered.numel() - 1))] for k in (0.25, 0.5, 0.75))
    mask = (importance >= q2 + 1.5 * (q3 - q1)).numpy()
    tau = f - b
    return b + np.where(mask, tau, np.float32(0)), importance.numpy()


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_fusion_formula(tmp_path, dtype):
    base, models = make_family(tmp_path / "in", n_models=1, dtype=dtype, update=0.3)
    out = run(tmp_path, "arcee_fusion", base, models)
    b, f = load_f32(base), load_f32(models[0])
    expected, kept = {}, []
    for n in float_names(b):
        fused, importance = fusion_reference(b[n], f[n])
        expected[n] = round_to(fused, dtype)
        kept.append(float(np.mean(fused != b[n])))
    assert_matches(out, expected)
    assert 0 < sum(kept) and max(kept) < 0.5  # above the median: at most half of each tensor


def test_an_unchanged_model_gives_the_base_and_scale_zero_too(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32", update=0.0)
    out = load_f32(run(tmp_path, "arcee_fusion", base, models))
    b = load_f32(base)
    assert all(np.array_equal(out[n], b[n]) for n in float_names(b))
    base, models = make_family(tmp_path / "in2", n_models=1, dtype="F32")
    out = load_f32(run(tmp_path, "arcee_fusion", base, models, name="zero", scale=0.0))
    b = load_f32(base)
    assert all(np.array_equal(out[n], b[n]) for n in float_names(b))


def test_a_tensor_over_the_budget_is_refused_before_writing(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32")
    recipe = make_recipe("arcee_fusion", [str(models[0])], str(base))
    with pytest.raises(RecipeError, match="needs its whole matrix from every input at once"):
        merge(recipe, tmp_path / "out", EngineOptions(max_memory=2000, threads=1))
    assert not (tmp_path / "out").exists()


def test_one_model_only(tmp_path):
    with pytest.raises(RecipeError, match="arcee_fusion takes at most 1 models"):
        make_recipe("arcee_fusion", ["a", "b"], "base")
