"""LiNeS (arXiv 2410.17146): the depth schedule against its formula and its invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ckpt_factory import (
    INT_NAME,
    load_f32,
    load_raw,
    make_family,
    rank_band_mask,
    round_to,
    ties_merge,
    weighted_sum,
)
from click.testing import CliRunner
from surgery_cli.main import cli

from surgery.engine import EngineOptions, merge
from surgery.errors import PlanError, RecipeError
from surgery.names import place
from surgery.recipe import make_recipe

OPTS = EngineOptions(threads=1)


def run(tmp_path, name, method, base, models, lines, **params):
    out = tmp_path / name
    merge(make_recipe(method, [str(m) for m in models], str(base), params, lines=lines), out, OPTS)
    return out


def same_bytes(a, b):
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def depth_of(name, L=2):
    p = place(name)
    return None if p.block is None else p.block / (L - 1)


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "in", n_models=2, dtype="BF16")


@pytest.mark.parametrize("outside", ["alpha", "alpha+beta", "one"])
def test_single_task_formula(tmp_path, family, outside):
    base, models = family
    out = run(
        tmp_path, "o", "task_arithmetic", base, models[:1], {"alpha": 0.3, "beta": 0.5, "outside": outside}
    )
    b, f = load_f32(base), load_f32(models[0])
    got = load_raw(out)
    for name in b:
        if name == INT_NAME:
            continue
        d = depth_of(name)
        lam = 0.3 + 0.5 * d if d is not None else {"alpha": 0.3, "alpha+beta": 0.8, "one": 1.0}[outside]
        want = round_to(b[name] + np.float32(lam) * (f[name] - b[name]), "BF16")
        assert torch.equal(got[name], want), name


def test_alpha_one_beta_zero_is_unchanged(tmp_path, family):
    base, models = family
    for method in ("task_arithmetic", "ties", "linear", "model_stock"):
        plain = tmp_path / f"plain_{method}"
        merge(make_recipe(method, [str(m) for m in models], str(base)), plain, OPTS)
        lined = run(tmp_path, f"l_{method}", method, base, models, {"alpha": 1.0, "beta": 0.0})
        assert same_bytes(plain, lined), method


def test_alpha_zero_beta_zero_is_base(tmp_path, family):
    base, models = family
    out = run(tmp_path, "z", "ties", base, models, {"alpha": 0.0, "beta": 0.0})
    b, got = load_raw(base), load_raw(out)
    for name in b:
        assert torch.equal(b[name], got[name]), name


def test_auto_alpha_on_task_arithmetic_is_one_over_T(tmp_path, family):
    base, models = family
    lined = run(tmp_path, "auto", "task_arithmetic", base, models, {"alpha": "auto", "beta": 0.0})
    scaled = tmp_path / "half"
    merge(make_recipe("task_arithmetic", [str(m) for m in models], str(base), {"scale": 0.5}), scaled, OPTS)
    assert same_bytes(lined, scaled)


def test_scales_are_non_decreasing_in_depth(tmp_path):
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (8, 8) for i in range(6)}
    shapes["model.embed_tokens.weight"] = (10, 8)
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32", shapes=shapes)
    (base / "config.json").write_text('{"num_hidden_layers": 6}')
    out = run(tmp_path, "o", "task_arithmetic", base, models, {"alpha": 0.2})
    b, f, got = load_f32(base), load_f32(models[0]), load_f32(out)
    ratios = []
    for i in range(6):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        tau = (f[name] - b[name]).astype(np.float64)
        ratios.append(
            float(np.dot((got[name] - b[name]).ravel(), tau.ravel()) / np.dot(tau.ravel(), tau.ravel()))
        )
    np.testing.assert_allclose(ratios, [0.2 + 0.8 * i / 5 for i in range(6)], rtol=1e-5)
    assert all(x < y for x, y in zip(ratios, ratios[1:]))


def test_auto_alpha_matches_formula_for_ties(tmp_path, family):
    """alpha = ||sum_t tau_t||_1 / (T * ||tau_merged||_1), from the run's result, against an
    independent TIES merge (ckpt_factory) of the exact float32 task vectors."""
    base, models = family
    recipe = make_recipe("ties", [str(m) for m in models], str(base), lines={"alpha": "auto", "beta": 0})
    result = merge(recipe, tmp_path / "out", OPTS)
    b = load_f32(base)
    fs = [load_f32(m) for m in models]
    num = den = 0.0
    for name in b:
        if name == INT_NAME:
            continue
        taus = [f[name] - b[name] for f in fs]
        k = math.floor(0.2 * taus[0].size)
        trimmed = [t * rank_band_mask(t, 0, k) for t in taus]
        num += np.abs(weighted_sum(taus, [1, 1]).astype(np.float64)).sum()
        den += np.abs(ties_merge(trimmed, [1, 1]).astype(np.float64)).sum()
    # exact up to the order of the float64 sums
    assert result.lines.alpha == pytest.approx(num / (2 * den), rel=1e-9)
    assert result.lines.beta == 0 and result.lines.requested_alpha == "auto"
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"lambda(l) = {result.lines.alpha:.6g} + 0 * l / (L - 1)" in card


def test_lines_needs_base_and_placeable_names(tmp_path, family):
    base, models = family
    with pytest.raises(RecipeError, match="base"):
        make_recipe("linear", [str(m) for m in models], None, lines={"alpha": 0.5})
    shapes = {"weird.tensor": (4, 4), "model.layers.0.w": (4, 4)}
    b2, m2 = make_family(tmp_path / "odd", n_models=1, dtype="F32", shapes=shapes)
    with pytest.raises(PlanError, match="weird.tensor"):
        merge(
            make_recipe("task_arithmetic", [str(m2[0])], str(b2), lines={"alpha": 0.5}), tmp_path / "x", OPTS
        )


def test_cli_lines_command(tmp_path, family):
    base, models = family
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli, ["lines", str(base), str(models[0]), "--alpha", "0.3", "-o", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    ref = run(tmp_path, "ref", "task_arithmetic", base, models[:1], {"alpha": 0.3})
    assert same_bytes(out, ref)
    assert "lines:" in (out / "surgery_recipe.yaml").read_text()
    assert "LiNeS" in (out / "README.md").read_text()
