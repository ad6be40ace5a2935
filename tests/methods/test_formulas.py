"""Every method against its formula computed independently, and against its invariants (METHODS.md)."""

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
    splitmix64,
    ties_merge,
    weighted_sum,
)

from surgery.engine import EngineOptions, merge
from surgery.methods.dare import dare_key
from surgery.names import natural_key
from surgery.recipe import make_recipe

OPTS = EngineOptions(threads=1)


def run(tmp_path, method, base, models, name="out", dtype=None, **params):
    out = tmp_path / name
    recipe = make_recipe(method, [str(m) for m in models], str(base) if base else None, params, dtype)
    merge(recipe, out, OPTS)
    return out


def float_names(tensors):
    return sorted((n for n in tensors if n != INT_NAME), key=natural_key)


def assert_matches(out_dir, expected: dict[str, torch.Tensor]):
    got = load_raw(out_dir)
    assert set(got) == set(expected) | {INT_NAME}
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "in", n_models=3, dtype="BF16", quantize=True)


def taus_of(base, models):
    b = load_f32(base)
    fs = [load_f32(m) for m in models]
    return b, fs, {n: [f[n] - b[n] for f in fs] for n in float_names(b)}


# -- task arithmetic ---------------------------------------------------------------------------------
def test_task_arithmetic_formula(tmp_path, family):
    base, models = family
    b, _, taus = taus_of(base, models)
    w = [0.5, 1.0, -0.25]
    out = run(tmp_path, "task_arithmetic", base, models, scale=0.7, weights=w)
    expected = {
        n: round_to(b[n] + np.float32(0.7) * weighted_sum(taus[n], w), "BF16") for n in float_names(b)
    }
    assert_matches(out, expected)
    # the integer buffer is copied, not merged
    assert torch.equal(load_raw(out)[INT_NAME], load_raw(base)[INT_NAME])


def test_task_arithmetic_invariants(tmp_path, family):
    base, models = family
    zero = run(tmp_path, "task_arithmetic", base, models, name="zero", scale=0.0)
    assert_matches(zero, {n: t for n, t in load_raw(base).items() if n != INT_NAME})
    one = run(tmp_path, "task_arithmetic", base, models[:1], name="one")
    # bf16 inputs: f - b is exact in float32, so b + (f - b) rounds back to f exactly
    assert_matches(one, {n: t for n, t in load_raw(models[0]).items() if n != INT_NAME})


# -- breadcrumbs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row", "global"])
def test_breadcrumbs_formula(tmp_path, family, granularity):
    base, models = family
    b, _, taus = taus_of(base, models)
    density, outliers = 0.3, 0.05
    out = run(
        tmp_path, "breadcrumbs", base, models, density=density, outliers=outliers, granularity=granularity
    )
    names = float_names(b)
    masks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for t in range(len(models)):
        if granularity == "per_tensor":
            for n in names:
                size = taus[n][t].size
                r_hi = math.floor(outliers * size + 1e-9)
                masks[n].append(rank_band_mask(taus[n][t], r_hi, r_hi + math.floor(density * size + 1e-9)))
        elif granularity == "per_row":
            for n in names:
                x = taus[n][t]
                rows = x.reshape(-1, x.shape[-1])
                cols = rows.shape[1]
                r_hi = math.floor(outliers * cols + 1e-9)
                r_lo = r_hi + math.floor(density * cols + 1e-9)
                masks[n].append(np.stack([rank_band_mask(r, r_hi, r_lo) for r in rows]).reshape(x.shape))
        else:  # one ranking over all tensors of the model, in name order then element order
            flat = np.concatenate([taus[n][t].reshape(-1) for n in names])
            r_hi = math.floor(outliers * flat.size + 1e-9)
            mask = rank_band_mask(flat, r_hi, r_hi + math.floor(density * flat.size + 1e-9))
            pos = 0
            for n in names:
                size = taus[n][t].size
                masks[n].append(mask[pos : pos + size].reshape(taus[n][t].shape))
                pos += size
    expected = {}
    for n in names:
        masked = [np.where(m, tau, np.float32(0)) for m, tau in zip(masks[n], taus[n])]
        expected[n] = round_to(b[n] + np.float32(1.0) * weighted_sum(masked, [1.0] * 3), "BF16")
    assert_matches(out, expected)


def test_breadcrumbs_keep_all_is_task_arithmetic(tmp_path, family):
    base, models = family
    crumbs = run(tmp_path, "breadcrumbs", base, models, name="c", density=1.0, outliers=0.0)
    ta = run(tmp_path, "task_arithmetic", base, models, name="ta")
    assert (crumbs / "model.safetensors").read_bytes() == (ta / "model.safetensors").read_bytes()


def test_breadcrumbs_exact_counts_and_ranks(tmp_path):
    """nnz per tensor = floor(n*density) exactly, even with heavy ties (quantised updates)."""
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32", quantize=True, update=0.02)
    b, f, taus = taus_of(base, models)
    density, outliers = 0.29, 0.07  # 0.29 * 100 is 28.999... in floats: must still keep 29 of 100
    out = run(tmp_path, "breadcrumbs", base, models, density=density, outliers=outliers)
    got = load_f32(out)
    for n in float_names(b):
        size = b[n].size
        kept = (got[n] - b[n]) != 0
        nnz_tau = taus[n][0] != 0
        expected_keep = 29 * size // 100  # floor(0.29 * n) in exact arithmetic
        r_hi = 7 * size // 100
        mask = rank_band_mask(taus[n][0], r_hi, r_hi + expected_keep)
        assert mask.sum() == expected_keep
        np.testing.assert_array_equal(kept, mask & nnz_tau, err_msg=n)


def test_breadcrumbs_tiny_outlier_fraction_does_not_wipe_tensor(tmp_path):
    """Another toolkit's bug: outliers*n rounds to 0 and a negative slice drops everything."""
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32")
    out = run(tmp_path, "breadcrumbs", base, models, density=0.5, outliers=0.001)
    b, got = load_f32(base), load_f32(out)
    for n in float_names(b):  # every tensor has < 1000 entries: no outlier removed, top half kept
        kept = int(((got[n] - b[n]) != 0).sum())
        assert kept == b[n].size // 2, n


# -- TIES --------------------------------------------------------------------------------------------
def test_ties_formula(tmp_path, family):
    base, models = family
    b, _, taus = taus_of(base, models)
    w = [1.0, 2.0, 0.5]
    out = run(tmp_path, "ties", base, models, density=0.4, scale=0.9, weights=w)
    expected = {}
    for n in float_names(b):
        k = math.floor(0.4 * b[n].size + 1e-9)
        trimmed = [np.where(rank_band_mask(t, 0, k), t, np.float32(0)) for t in taus[n]]
        expected[n] = round_to(b[n] + np.float32(0.9) * ties_merge(trimmed, w), "BF16")
    assert_matches(out, expected)


def test_ties_single_model_full_density_is_the_model(tmp_path, family):
    base, models = family
    out = run(tmp_path, "ties", base, models[:1], density=1.0)
    assert_matches(out, {n: t for n, t in load_raw(models[0]).items() if n != INT_NAME})


def test_breadcrumbs_ties_formula(tmp_path, family):
    base, models = family
    b, _, taus = taus_of(base, models)
    out = run(tmp_path, "breadcrumbs_ties", base, models, density=0.5, outliers=0.1)
    expected = {}
    for n in float_names(b):
        size = b[n].size
        r_hi = math.floor(0.1 * size + 1e-9)
        masks = [rank_band_mask(t, r_hi, r_hi + math.floor(0.5 * size + 1e-9)) for t in taus[n]]
        trimmed = [np.where(m, t, np.float32(0)) for m, t in zip(masks, taus[n])]
        expected[n] = round_to(b[n] + np.float32(1.0) * ties_merge(trimmed, [1.0] * 3), "BF16")
    assert_matches(out, expected)


# -- DARE --------------------------------------------------------------------------------------------
def dare_reference(tau: np.ndarray, density: float, key: int) -> np.ndarray:
    idx = np.arange(tau.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(key) + idx)
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    scaled = (tau.reshape(-1).astype(np.float64) * (1.0 / density)).astype(np.float32)
    return np.where(u < density, scaled, np.float32(0)).reshape(tau.shape)


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_formula(tmp_path, family, method):
    base, models = family
    b, _, taus = taus_of(base, models)
    out = run(tmp_path, method, base, models, density=0.3, seed=7)
    expected = {}
    for n in float_names(b):
        dropped = [dare_reference(t, 0.3, dare_key(7, n, i)) for i, t in enumerate(taus[n])]
        merged = weighted_sum(dropped, [1.0] * 3) if method == "dare" else ties_merge(dropped, [1.0] * 3)
        expected[n] = round_to(b[n] + np.float32(1.0) * merged, "BF16")
    assert_matches(out, expected)


def test_dare_statistics_and_seed(tmp_path):
    """Keep rate ~ density; rescale preserves the sum in expectation; the seed changes the mask."""
    shapes = {"model.layers.0.w": (256, 256)}
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32", shapes=shapes)
    a = load_f32(run(tmp_path, "dare", base, models, name="a", density=0.25, seed=1))
    c = load_f32(run(tmp_path, "dare", base, models, name="c", density=0.25, seed=2))
    b, f = load_f32(base), load_f32(models[0])
    name = "model.layers.0.w"
    tau, kept = f[name] - b[name], a[name] - b[name]
    rate = (kept != 0).mean()
    assert abs(rate - 0.25) < 0.01  # 65,536 Bernoulli draws: sd 0.0017
    assert abs(kept.sum() - tau.sum()) < 0.05 * np.abs(tau).sum()
    assert not np.array_equal(a[name], c[name])


# -- linear, slerp, model stock ----------------------------------------------------------------------
def test_linear_formula(tmp_path, family):
    base, models = family
    fs = [load_f32(m) for m in models]
    w = [1.0, 3.0, 4.0]
    out = run(tmp_path, "linear", None, models, weights=w)
    wn = [np.float32(x / 8.0) for x in w]
    expected = {n: round_to(weighted_sum([f[n] for f in fs], wn), "BF16") for n in float_names(fs[0])}
    assert_matches(out, expected)


def slerp_reference(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    a, c = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    cos = np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c))
    if abs(cos) > 1 - 1e-6:
        return ((1 - t) * v0 + t * v1).astype(np.float32)
    om = np.arccos(np.clip(cos, -1, 1))
    return (np.sin((1 - t) * om) / np.sin(om) * v0 + np.sin(t * om) / np.sin(om) * v1).astype(np.float32)


def test_slerp_formula_and_endpoints(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=2, dtype="F32", update=0.8)
    f0, f1 = load_f32(models[0]), load_f32(models[1])
    got = load_f32(run(tmp_path, "slerp", None, models, t=0.3))
    for n in float_names(f0):
        np.testing.assert_allclose(got[n], slerp_reference(f0[n], f1[n], 0.3), rtol=1e-5, atol=1e-6)
    zero = load_f32(run(tmp_path, "slerp", None, models, name="t0", t=0.0))
    one = load_f32(run(tmp_path, "slerp", None, models, name="t1", t=1.0))
    for n in float_names(f0):
        np.testing.assert_array_equal(zero[n], f0[n])
        np.testing.assert_array_equal(one[n], f1[n])
    # with --base and one model, the endpoints are (base, model)
    b = load_f32(base)
    with_base = load_f32(run(tmp_path, "slerp", base, models[:1], name="wb", t=0.0))
    for n in float_names(b):
        np.testing.assert_array_equal(with_base[n], b[n])


def test_model_stock_formula(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=3, dtype="F32")
    b = load_f32(base)
    fs = [load_f32(m) for m in models]
    got = load_f32(run(tmp_path, "model_stock", base, models))
    for n in float_names(b):
        taus = [f[n].astype(np.float64).ravel() - b[n].astype(np.float64).ravel() for f in fs]
        cos = [
            np.dot(taus[i], taus[j]) / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
            for i in range(3)
            for j in range(i + 1, 3)
        ]
        c = min(1.0, max(0.0, float(np.mean(cos))))
        k = 3 * c / (1 + 2 * c)
        want = k * np.mean([f[n] for f in fs], axis=0) + (1 - k) * b[n]
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6)


def test_model_stock_identical_models_give_the_model(tmp_path):
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32")
    got = load_f32(run(tmp_path, "model_stock", base, [models[0], models[0]]))
    want = load_f32(models[0])
    for n in float_names(want):
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6)


def test_output_dtype_override(tmp_path, family):
    base, models = family
    b, _, taus = taus_of(base, models)
    out = run(tmp_path, "task_arithmetic", base, models, dtype="float32")
    expected = {n: round_to(b[n] + np.float32(1) * weighted_sum(taus[n], [1.0] * 3), "F32") for n in taus}
    assert_matches(out, expected)
