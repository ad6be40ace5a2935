"""mergekit's della / della_linear, rescale: true after a magnitude top-k, and arcee_fusion, through
`surgery run`.

The reference is mergekit 0.1.5's ``della_magprune`` and generalized task arithmetic re-derived here in
torch on whole tensors: ranks of |delta| along each row (argsort of argsort), keep probabilities
``(density - epsilon) + rank_norm * 2 epsilon``, a Bernoulli mask, ``rescaled_masked_tensor`` with the
L1 norm, weights before the sign election, ``normalize`` and ``lambda``. The one substitution: the
Bernoulli draws are our counter-based uniforms (mergekit's come from torch's global generator and
cannot be reproduced), so the check is exact given the draws. Float32 inputs: within 1e-5 relative.
Arcee Fusion's reference is mergekit's ``_compute_importance`` and quartiles in float32 torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from surgery.mergekit.native import _task_arithmetic_family
from tests.mergekit.test_run_mergekit import (
    check,
    family,  # noqa: F401 (a fixture)
    gradient,
    gta,
    magnitude,
    outliers,
    position,
    states_of,
    write_config,
)
from tests.methods.test_arcee_fusion import fusion_reference
from tests.methods.test_della import uniforms
from tests.test_e2e_transformers import load_state


def mk_magprune(delta: torch.Tensor, density: float, epsilon: float, draws: np.ndarray) -> torch.Tensor:
    """mergekit's della_magprune (rows along dim 1, a 1-D tensor as one row), the mask from ``draws``."""
    if density >= 1:
        return delta
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1).double() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = torch.from_numpy(draws.reshape(t.shape) < probs.numpy()).float()
    return (t * mask).reshape(delta.shape)


def l1_back(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = delta.double().abs().sum(), masked.double().abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else (masked.double() * (before / after)).float()


def della_ref(name, b, fs, weights, densities, epsilons, *, consensus, normalize, rescale=True, lam=1.0):
    def sparsify(delta, t):
        masked = mk_magprune(delta, densities[t], epsilons[t], uniforms(name, t, delta.numel(), 0))
        return l1_back(delta, masked) if rescale and densities[t] < 1 else masked

    return gta(b, fs, weights, sparsify=sparsify, consensus=consensus, normalize=normalize, lam=lam)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_defaults(family, invoke, tmp_path, method):  # noqa: F811
    """mergekit's defaults: epsilon 0.15, rescale: true (L1); della normalize: true, della_linear false."""
    weights, densities, epsilons = [0.6, 0.3, 0.5], [0.5, 0.4, 0.7], [0.15, 0.1, 0.2]
    models = [
        {"model": str(family[k]), "parameters": {"weight": w, "density": d, **({"epsilon": e} if i else {})}}
        for i, (k, w, d, e) in enumerate(zip(("ft1", "ft2", "ft3"), weights, densities, epsilons))
    ]
    cfg = write_config(
        tmp_path, {"merge_method": method, "base_model": str(family["base"]), "models": models,
                   "parameters": {"lambda": 1.2}, "dtype": "float32"}
    )  # fmt: skip
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")
    della = method == "della"
    check(
        tmp_path / "out",
        lambda n, _: della_ref(n, b[n], [f[n] for f in fs], weights, densities, epsilons,
                               consensus=della, normalize=della, lam=1.2),
    )  # fmt: skip
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == method and recipe["parameters"]["rescale"] == "l1"
    assert recipe["parameters"]["epsilon"] == epsilons
    if della:
        assert recipe["parameters"]["elect"] == "weighted" and recipe["parameters"]["disjoint"] == "mean"


def test_della_gradient_filter_and_no_rescale(family, invoke, tmp_path):  # noqa: F811
    """Per-tensor density (gradient) and epsilon (filter), rescale: false (kept entries unscaled)."""
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "della",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
            "parameters": {
                "density": [0.3, 0.7],
                "epsilon": [{"filter": "mlp", "value": 0.25}, {"value": 0.05}],
                "rescale": False,
                "normalize": False,
            },
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def expect(n, _):
        d, e = gradient([0.3, 0.7], position(n)), 0.25 if "mlp" in n else 0.05
        return della_ref(n, b[n], [f1[n], f2[n]], [1.0, 1.0], [d, d], [e, e], consensus=True,
                         normalize=False, rescale=False)  # fmt: skip

    check(tmp_path / "out", expect)
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["parameters"]["rescale"] == "off"
    assert recipe["per_tensor"]["model.layers.3.mlp.up_proj.weight"]["epsilon"] == 0.25


def test_della_kept_fraction_is_the_density(family, invoke, tmp_path):  # noqa: F811
    cfg = write_config(
        tmp_path,
        {"merge_method": "della_linear", "base_model": str(family["base"]),
         "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.3}}],
         "parameters": {"epsilon": 0.2}},
    )  # fmt: skip
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    (b,) = states_of(family, "base")
    got = load_state(tmp_path / "out")
    kept = sum(int((got[n] != b[n]).sum()) for n in got)
    total = sum(t.numel() for t in got.values())
    assert abs(kept / total - 0.3) < 0.01, kept / total  # ~30,000 draws: sd 0.003


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rescale_after_a_top_k(family, invoke, tmp_path, method):  # noqa: F811
    """rescale: true after magnitude pruning: each trimmed delta times ||delta||_1 / ||trimmed||_1."""
    cfg = write_config(
        tmp_path,
        {"merge_method": method, "base_model": str(family["base"]),
         "models": [{"model": str(family[k]), "parameters": {"weight": w}} for k, w in (("ft1", 0.7), ("ft2", 0.4))],
         "parameters": {"density": 0.25, "gamma": 0.05, "rescale": True} if method != "ties"
         else {"density": 0.25, "rescale": True}},
    )  # fmt: skip
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def trim(delta, _):
        masked = magnitude(delta, 0.25) if method == "ties" else outliers(delta, 0.25, 0.05)
        return l1_back(delta, masked)

    ties = method != "breadcrumbs"
    check(
        tmp_path / "out",
        lambda n, _: gta(b[n], [f1[n], f2[n]], [0.7, 0.4], sparsify=trim, consensus=ties, normalize=method == "ties"),
    )  # fmt: skip
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["parameters"]["rescale"] == "l1"


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((4, 3, 8), "della on a 3-D tensor (mergekit ranks along its second axis)"),
        ((8, 1), "della on a tensor with one entry per row (mergekit fails on it: 0/0 rank)"),
    ],
)
def test_della_shapes_mergekit_ranks_differently_are_refused(shape, reason):
    reasons: list[str] = []
    per_model = {"weight": (1.0,), "density": (0.5,), "epsilon": (0.1,)}
    shared = {"normalize": True, "rescale": True, "lambda": 1.0, "int8_mask": False}
    _task_arithmetic_family("della", shared, per_model, shape, reasons)
    assert reasons == [reason]
    reasons.clear()
    _task_arithmetic_family("della", shared, {**per_model, "density": (1.0,)}, shape, reasons)
    assert reasons == []  # density 1: nothing is ranked


def mk_fusion(b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion in float32 (its quartiles are exact below 1M entries)."""
    p = torch.softmax(f, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    importance = (f - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    return b + (f - b) * (importance >= median + 1.5 * (q3 - q1)).float()


def test_arcee_fusion(family, invoke, tmp_path):  # noqa: F811
    """Exact against the formula in float64; mergekit computes the importance in float32, where the KL
    of two nearby softmaxes loses ~1e-3 of its digits, so a few entries next to the threshold differ."""
    cfg = write_config(
        tmp_path,
        {"merge_method": "arcee_fusion", "base_model": str(family["base"]),
         "models": [{"model": str(family["ft2"])}], "dtype": "float32"},
    )  # fmt: skip
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f2 = states_of(family, "base", "ft2")
    got = load_state(tmp_path / "out")
    differ = total = 0
    for n, tensor in got.items():
        exact = torch.from_numpy(fusion_reference(b[n].numpy(), f2[n].numpy())[0])
        assert torch.equal(tensor, exact), n
        differ += int((tensor != mk_fusion(b[n], f2[n])).sum())
        total += tensor.numel()
    assert differ / total < 1e-3, (differ, total)
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == "arcee_fusion" and recipe["parameters"] == {"scale": 1.0}


def test_convert_prints_a_della_recipe_that_reproduces_the_run(family, invoke, tmp_path):  # noqa: F811
    data = {
        "merge_method": "della",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 0.5, "density": 0.6}} for k in ("ft1", "ft2")
        ],
        "parameters": {"epsilon": [{"filter": "mlp", "value": 0.2}, {"value": 0.1}]},
        "out_dtype": "bfloat16",
    }
    cfg = write_config(tmp_path, data)
    converted = invoke("convert", cfg)
    assert converted.exit_code == 0, converted.output
    recipe = yaml.safe_load(converted.stdout)
    assert recipe["method"] == "della" and recipe["parameters"]["seed"] == 0
    (tmp_path / "native.yml").write_text(converted.stdout)
    assert invoke("run", cfg, "-o", tmp_path / "a", "-q").exit_code == 0
    assert invoke("run", tmp_path / "native.yml", "-o", tmp_path / "b", "-q").exit_code == 0
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
