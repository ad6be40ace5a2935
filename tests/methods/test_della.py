"""DELLA (MAGPRUNE + TIES or a sum) against its formula computed here, its statistics and invariants.

The reference ranks each row by a full stable sort (not the kernel's per-row key sort), computes the
keep probabilities p = density - epsilon + 2 epsilon * rank / (n - 1) and draws the same counter-based
uniforms as the engine, so the deterministic part (which entries a given draw keeps, the 1/p or L1
rescale, the combine) is checked bit for bit; the randomness itself is checked statistically.
"""

from __future__ import annotations

import numpy as np
import pytest
from ckpt_factory import load_f32, make_family, round_to, splitmix64, ties_merge, weighted_sum

from surgery.engine import EngineOptions, merge
from surgery.errors import RecipeError
from surgery.methods.dare import dare_key
from surgery.recipe import make_recipe
from tests.methods.test_formulas import assert_matches, float_names, run, taus_of

OPTS = EngineOptions(threads=1)


def keep_probability(tau: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Per row (a 1-D tensor is one row): ascending rank of |tau| (equal |tau|: the higher index
    first, so the lower index ranks higher), spread linearly over density -/+ epsilon."""
    rows = tau.reshape(-1, tau.shape[-1]).astype(np.float64)
    n = rows.shape[1]
    p = np.empty_like(rows)
    for r, row in enumerate(rows):
        descending = np.lexsort((np.arange(n), -np.abs(row)))  # largest first, ties by lower index
        rank = np.empty(n, np.int64)
        rank[descending] = np.arange(n)[::-1]  # ascending rank: n-1 for the largest
        p[r] = density if n == 1 else (density - epsilon) + (2.0 * epsilon) * (rank / (n - 1))
    return p.reshape(tau.shape)


def uniforms(name: str, model: int, size: int, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(dare_key(seed, name, model)) + np.arange(size, dtype=np.uint64))
    return ((z >> np.uint64(11)).astype(np.float64) / 2.0**53).reshape(-1)


def magprune(tau, name, model, density, epsilon, seed=0, rescale="none"):
    """(the sparsified task vector, its mask)."""
    p = keep_probability(tau, density, epsilon)
    keep = (uniforms(name, model, tau.size, seed) < p.reshape(-1)).reshape(tau.shape)
    if density >= 1:
        return tau.copy(), np.ones(tau.shape, bool)
    if rescale == "none":
        out = np.where(keep, (tau.astype(np.float64) / p).astype(np.float32), np.float32(0))
    else:
        out = np.where(keep, tau, np.float32(0))
    if rescale == "l1":  # sums in index order, as the engine's element-by-element accumulation
        before = np.cumsum(np.abs(tau.reshape(-1)).astype(np.float64))[-1]
        after = np.cumsum(np.abs(out.reshape(-1)).astype(np.float64))[-1]
        if before >= 1e-7 and after >= 1e-7:
            out = out * np.float32(before / after)
    return out.astype(np.float32), keep


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "in", n_models=3, dtype="BF16", quantize=True)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("della", {"density": 0.5, "epsilon": 0.2, "seed": 7}),
        ("della_linear", {"density": 0.4, "epsilon": 0.1, "seed": 2, "weights": [0.5, 1.0, 0.25]}),
        ("della", {"density": [0.3, 0.6, 1.0], "epsilon": [0.1, 0.25, 0.15], "rescale": "l1"}),
        ("della_linear", {"density": 0.7, "epsilon": 0.2, "rescale": "off", "scale": 0.8}),
    ],
)
def test_della_formula(tmp_path, family, method, params):
    base, models = family
    b, _, taus = taus_of(base, models)
    out = run(tmp_path, method, base, models, **params)
    pick = lambda v, t: v[t] if isinstance(v, list) else v  # noqa: E731
    weights = params.get("weights", [1.0] * 3)
    expected = {}
    for n in float_names(b):
        pruned = [
            magprune(tau, n, t, pick(params["density"], t), pick(params["epsilon"], t), params.get("seed", 0),
                     params.get("rescale", "none"))[0]
            for t, tau in enumerate(taus[n])
        ]  # fmt: skip
        merged = ties_merge(pruned, weights) if method == "della" else weighted_sum(pruned, weights)
        expected[n] = round_to(b[n] + np.float32(params.get("scale", 1.0)) * merged, "BF16")
    assert_matches(out, expected)


def test_keep_rate_follows_the_rank_and_the_rescale_is_unbiased(tmp_path):
    """256 rows of 256: the kept fraction is density, each rank band keeps at its mean probability,
    and kept entries are tau / p, so the mean update equals tau in expectation."""
    name = "model.layers.0.w"
    base, models = make_family(tmp_path / "in", n_models=1, dtype="F32", shapes={name: (256, 256)})
    out = load_f32(run(tmp_path, "della_linear", base, models, density=0.4, epsilon=0.2, seed=11))
    tau = load_f32(models[0])[name] - load_f32(base)[name]
    update = out[name] - load_f32(base)[name]
    kept = update != 0
    p = keep_probability(tau, 0.4, 0.2)
    assert abs(kept.mean() - 0.4) < 0.006  # 65,536 draws: sd 0.0019
    for lo in (0.2, 0.3, 0.4, 0.5):  # four bands of p: each keeps at its mean p (16,384 draws, sd 0.004)
        band = (p >= lo) & (p < lo + 0.1 + 1e-9)
        assert abs(kept[band].mean() - p[band].mean()) < 0.015, lo
    # b + tau / p - b: exact up to the rounding of the sum to float32 (|b| < 8: 5e-7)
    np.testing.assert_allclose(update[kept], (tau[kept] / p[kept]).astype(np.float32), rtol=0, atol=5e-7)
    # E[m tau / p] = tau: the rescaled update sums to about the task vector's sum
    assert abs(update.sum() - tau.sum()) < 0.03 * np.abs(tau).sum()


def test_epsilon_zero_is_dare_bit_for_bit(tmp_path, family):
    base, models = family
    for della, dare in (("della", "dare_ties"), ("della_linear", "dare")):
        a = run(tmp_path, della, base, models, name=della, density=0.35, epsilon=0.0, seed=4)
        c = run(tmp_path, dare, base, models, name=dare, density=0.35, seed=4)
        assert (a / "model.safetensors").read_bytes() == (c / "model.safetensors").read_bytes()


def test_density_one_prunes_nothing(tmp_path, family):
    base, models = family
    for della, plain, params in (
        ("della", "ties", {"density": 1.0}),
        ("della_linear", "task_arithmetic", {}),
    ):
        a = run(tmp_path, della, base, models, name=della, density=1.0, epsilon=0.15)
        c = run(tmp_path, plain, base, models, name=plain, **params)
        assert (a / "model.safetensors").read_bytes() == (c / "model.safetensors").read_bytes()


def test_the_seed_changes_the_mask_and_the_default_rescale_is_the_papers(tmp_path, family):
    base, models = family
    a = load_f32(run(tmp_path, "della_linear", base, models, name="a", seed=1))
    c = load_f32(run(tmp_path, "della_linear", base, models, name="c", seed=2))
    assert any(not np.array_equal(a[n], c[n]) for n in float_names(a))
    recipe = make_recipe("della", [str(m) for m in models], str(base))
    assert recipe.parameters["rescale"] == "none" and recipe.parameters["epsilon"] == 0.15


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0.1, "epsilon": 0.15}, "della: density 0.1 with epsilon 0.15 gives keep probabilities from "
                                            "-0.05 to 0.25, outside (0, 1]"),
        ({"density": 0.9, "epsilon": [0.05, 0.2]}, "della: density 0.9 with epsilon 0.2 gives keep "
                                                   "probabilities from 0.7 to 1.1, outside (0, 1]"),
        ({"granularity": "per_tensor"}, "della: granularity is fixed at 'per_row'"),
        ({"rescale": "l2"}, "della: rescale must be one of none, l1, off"),
    ],
)  # fmt: skip
def test_bad_parameters_are_refused(tmp_path, params, message):
    with pytest.raises(RecipeError) as err:
        make_recipe("della", ["a", "b"], "base", params)
    assert str(err.value).startswith(message)
    assert err.value.hint


def test_per_tensor_epsilon_is_checked_with_its_density(tmp_path):
    with pytest.raises(RecipeError, match=r"per_tensor: x: della: density 0.5 with epsilon 0.6"):
        make_recipe("della", ["a"], "base", {"density": 0.5}, per_tensor={"x": {"epsilon": 0.6}})


def test_cli_flags_and_methods_listing(tmp_path, family, invoke):
    base, models = family
    result = invoke("merge", *map(str, models), "--base", str(base), "--della", "--density", "0.6",
                    "--epsilon", "0.1", "--rescale", "l1", "-o", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = (tmp_path / "out" / "surgery_recipe.yaml").read_text()
    assert "method: della\n" in recipe and "epsilon: 0.1\n" in recipe and "rescale: l1\n" in recipe
    listing = invoke("methods").output
    assert "della_linear" in listing and "--epsilon" in listing


def test_streamed_in_tiny_chunks_on_three_threads_equals_one_chunk(tmp_path, family):
    base, models = family
    recipe = make_recipe("della", [str(m) for m in models], str(base), {"density": 0.45, "rescale": "l1"})
    merge(recipe, tmp_path / "whole", EngineOptions(max_memory=2**30, threads=1))
    merge(recipe, tmp_path / "tiny", EngineOptions(max_memory=300, threads=3))
    whole, tiny = (tmp_path / k / "model.safetensors" for k in ("whole", "tiny"))
    assert whole.read_bytes() == tiny.read_bytes()


def test_passes_count_the_l1_measure():
    from surgery.methods import METHODS

    della, ties = METHODS["della"], METHODS["ties"]
    assert della.passes({"granularity": "per_row", "rescale": "none"}) == 1
    assert della.passes({"granularity": "per_row", "rescale": "l1"}) == 2
    assert ties.passes({"granularity": "per_tensor", "rescale": "l1"}) == 4
    assert METHODS["task_arithmetic"].passes({"rescale": "l1"}) == 1  # no sparsify stage: no rescale


def test_lines_auto_alpha_measures_the_rescaled_update(tmp_path, family):
    """LiNeS' alpha = ||sum_t tau_t||_1 / (T ||merged update||_1) over the merged tensors, with the
    update as written: here each pruned task vector back at its L1 norm (rescale: l1)."""
    base, models = family
    b, _, taus = taus_of(base, models)
    recipe = make_recipe("della_linear", [str(m) for m in models], str(base),
                         {"density": 0.4, "rescale": "l1"}, lines={"alpha": "auto"})  # fmt: skip
    result = merge(recipe, tmp_path / "out", OPTS)
    total = merged = 0.0
    for n in float_names(b):
        pruned = [magprune(tau, n, t, 0.4, 0.15, rescale="l1")[0] for t, tau in enumerate(taus[n])]
        total += np.abs(weighted_sum(taus[n], [1.0] * 3).astype(np.float64)).sum()
        merged += np.abs(weighted_sum(pruned, [1.0] * 3).astype(np.float64)).sum()
    assert result.lines.alpha == pytest.approx(total / (3 * merged), rel=1e-6)
