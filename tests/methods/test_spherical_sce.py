"""NearSwap, NuSLERP, Multi-SLERP, Karcher and SCE against independent references of mergekit 0.1.5's
math (written step by step as mergekit does it, whole tensors, numpy), their invariants, and streamed
== whole-tensor runs."""

from __future__ import annotations

import numpy as np
import pytest
from ckpt_factory import INT_NAME, load_f32, load_raw, make_family
from mergekit_math import karcher_ref, multislerp_ref, nearswap_ref, nuslerp_ref, sce_ref

from surgery.engine import EngineOptions, merge
from surgery.errors import RecipeError
from surgery.names import natural_key
from surgery.recipe import make_recipe

OPTS = EngineOptions(threads=1)
TINY = EngineOptions(threads=3, max_memory=600)  # a few elements per chunk


def run(tmp_path, method, base, models, name="out", opts=OPTS, **params):
    out = tmp_path / name
    recipe = make_recipe(method, [str(m) for m in models], str(base) if base else None, params)
    merge(recipe, out, opts)
    return out


def names(tensors):
    return sorted((n for n in tensors if n != INT_NAME), key=natural_key)


def close(got, want, rel=1e-5):
    """|got - want| <= rel * max|want|, elementwise (relative to the tensor's scale)."""
    want = np.asarray(want, np.float64)
    err = np.max(np.abs(got.astype(np.float64) - want))
    assert err <= rel * max(np.max(np.abs(want)), 1e-30), (err, np.max(np.abs(want)))


@pytest.fixture
def fam(tmp_path):
    return make_family(tmp_path / "in", n_models=3, dtype="F32", update=0.3)


# -- nearswap ---------------------------------------------------------------------------------------
def test_nearswap_formula_and_invariants(tmp_path, fam):
    base, models = fam
    b, f = load_f32(base), load_f32(models[0])
    got = load_f32(run(tmp_path, "nearswap", base, models[:1], distance=0.2))
    for n in names(b):
        close(got[n], nearswap_ref(b[n], f[n], 0.2))
        assert np.any(got[n] != b[n]) and np.any(got[n] != f[n])  # the threshold bites both ways
    zero = load_f32(run(tmp_path, "nearswap", base, models[:1], name="t0", distance=0.0))
    far = load_f32(run(tmp_path, "nearswap", base, models[:1], name="far", distance=100.0))
    for n in names(b):
        np.testing.assert_array_equal(zero[n], b[n])
        np.testing.assert_array_equal(far[n], f[n])


# -- nuslerp ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vectors,axis", [("flat", None), ("rows", -1), ("columns", 0)])
def test_nuslerp_formula_with_and_without_base(tmp_path, fam, vectors, axis):
    base, models = fam
    b, f0, f1 = load_f32(base), load_f32(models[0]), load_f32(models[1])
    w = [1.0, 3.0]
    got = load_f32(run(tmp_path, "nuslerp", base, models[:2], weights=w, vectors=vectors))
    free = load_f32(run(tmp_path, "nuslerp", None, models[:2], name="nobase", weights=w, vectors=vectors))
    for n in names(b):
        close(got[n], b[n] + nuslerp_ref(0.75, f0[n] - b[n], f1[n] - b[n], axis))
        close(free[n], nuslerp_ref(0.75, f0[n], f1[n], axis))


def test_nuslerp_weight_endpoints(tmp_path, fam):
    base, models = fam
    f0, f1 = load_f32(models[0]), load_f32(models[1])
    first = load_f32(run(tmp_path, "nuslerp", None, models[:2], name="a", weights=[1.0, 0.0]))
    second = load_f32(run(tmp_path, "nuslerp", None, models[:2], name="b", weights=[0.0, 2.0]))
    for n in names(f0):
        np.testing.assert_array_equal(first[n], f0[n])
        np.testing.assert_array_equal(second[n], f1[n])


# -- multislerp -------------------------------------------------------------------------------------
def test_multislerp_formula(tmp_path, fam):
    base, models = fam
    b, fs = load_f32(base), [load_f32(m) for m in models]
    w = [1.0, 2.0, 0.5]
    got = load_f32(run(tmp_path, "multislerp", base, models, weights=w))
    free = load_f32(run(tmp_path, "multislerp", None, models, name="nobase", weights=w))
    for n in names(b):
        close(got[n], b[n] + multislerp_ref([f[n] - b[n] for f in fs], w))
        close(free[n], multislerp_ref([f[n] for f in fs], w))


def test_multislerp_identical_inputs_and_one_model(tmp_path, fam):
    base, models = fam
    f = load_f32(models[0])
    same = load_f32(run(tmp_path, "multislerp", base, [models[0]] * 3, weights=[1.0, 2.0, 3.0]))
    one = load_f32(run(tmp_path, "multislerp", base, models[:1], name="one"))
    for n in names(f):
        close(same[n], f[n], 1e-6)
        np.testing.assert_array_equal(one[n], f[n])


# -- karcher ----------------------------------------------------------------------------------------
def test_karcher_formula(tmp_path, fam):
    _, models = fam
    fs = [load_f32(m) for m in models]
    got = load_f32(run(tmp_path, "karcher", None, models))
    few = load_f32(run(tmp_path, "karcher", None, models, name="few", max_iter=1))
    for n in names(fs[0]):
        close(got[n], karcher_ref([f[n] for f in fs]))
        close(few[n], karcher_ref([f[n] for f in fs], max_iter=1))


def test_karcher_far_apart_points_need_the_iteration(tmp_path):
    """Points far apart on the sphere: the Karcher mean differs from the normalised chordal mean
    (its first iterate), so a test that skipped the iteration would fail."""
    _, models = make_family(tmp_path / "in", n_models=3, dtype="F32", update=3.0)
    fs = [load_f32(m) for m in models]
    got = load_f32(run(tmp_path, "karcher", None, models))
    first = load_f32(run(tmp_path, "karcher", None, models, name="first", max_iter=0))
    for n in names(fs[0]):
        close(got[n], karcher_ref([f[n] for f in fs]))
        assert np.max(np.abs(got[n] - first[n])) > 1e-4 * np.max(np.abs(got[n]))


def test_karcher_of_one_model_and_identical_models(tmp_path, fam):
    _, models = fam
    f = load_f32(models[0])
    one = load_f32(run(tmp_path, "karcher", None, models[:1]))
    same = load_f32(run(tmp_path, "karcher", None, [models[0]] * 3, name="same"))
    for n in names(f):
        np.testing.assert_array_equal(one[n], f[n])
        close(same[n], f[n], 1e-6)


# -- sce --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_formula(tmp_path, fam, topk):
    base, models = fam
    b, fs = load_f32(base), [load_f32(m) for m in models]
    got = load_f32(run(tmp_path, "sce", base, models, density=topk))
    for n in names(b):
        close(got[n], sce_ref(b[n], [f[n] for f in fs], topk))


def test_sce_selects_by_variance_across_models(tmp_path, fam):
    """Entries where the models agree (zero variance) are dropped first; identical models give the model."""
    base, models = fam
    f = load_f32(models[0])
    same = load_f32(run(tmp_path, "sce", base, [models[0]] * 2, density=0.5))
    b = load_f32(base)
    for n in names(f):  # zero variance everywhere: k = 0, nothing selected, the base
        np.testing.assert_array_equal(same[n], b[n])
    full = load_f32(run(tmp_path, "sce", base, [models[0]] * 2, name="full"))
    for n in names(f):
        close(full[n], f[n], 1e-6)


# -- streaming --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,with_base,params",
    [
        ("nearswap", True, {"distance": 0.2}),
        ("nuslerp", True, {"weights": [1.0, 2.0]}),
        ("nuslerp", False, {"weights": [1.0, 2.0]}),
        ("multislerp", True, {"weights": [1.0, 2.0]}),
        ("karcher", False, {}),
    ],
)
def test_streamed_equals_whole_tensor(tmp_path, fam, method, with_base, params):
    base, models = fam
    models = models[:1] if method == "nearswap" else models[:2]
    base = base if with_base else None
    whole = run(tmp_path, method, base, models, name="whole", **params)
    streamed = run(tmp_path, method, base, models, name="streamed", opts=TINY, **params)
    a, b = load_raw(whole), load_raw(streamed)
    for n in a:
        assert np.array_equal(a[n].numpy(), b[n].numpy()), n


@pytest.mark.parametrize("method,params", [("sce", {"density": 0.5}), ("nuslerp", {"vectors": "rows"})])
def test_whole_tensor_methods_name_the_memory_they_need(tmp_path, fam, method, params):
    base, models = fam
    with pytest.raises(RecipeError, match="needs its whole matrix"):
        run(tmp_path, method, base, models[:2], opts=TINY, **params)
    assert not (tmp_path / "out").exists()


def test_sce_takes_one_density(tmp_path, fam):
    base, models = fam
    with pytest.raises(RecipeError, match="one density"):
        run(tmp_path, "sce", base, models[:2], density=[0.5, 0.3])


# -- the CLI: method parameters get flags from the registry -------------------------------------------
def test_merge_flags_from_the_registry(tmp_path, fam, invoke):
    base, models = fam
    b, f = load_f32(base), load_f32(models[0])
    out = tmp_path / "cli"
    result = invoke("merge", models[0], "--base", base, "--nearswap", "--distance", "0.2", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    got = load_f32(out)
    for n in names(b):
        close(got[n], nearswap_ref(b[n], f[n], 0.2))
    fs = [load_f32(m) for m in models]
    result = invoke("merge", *models, "--karcher", "--max-iter", "1", "-o", tmp_path / "k", "-q")
    assert result.exit_code == 0, result.output
    got = load_f32(tmp_path / "k")
    for n in names(b):
        close(got[n], karcher_ref([x[n] for x in fs], max_iter=1))
    # a flag of another method is refused by name, nothing written
    result = invoke("merge", *models, "--base", base, "--ties", "--distance", "0.2", "-o", tmp_path / "bad")
    assert result.exit_code == 1 and "takes no parameter 'distance'" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "method,with_base,params",
    [
        ("nearswap", True, {"distance": 0.2}),
        ("nuslerp", True, {"weights": [1.0, 2.0], "vectors": "columns"}),
        ("multislerp", False, {"weights": [1.0, 2.0]}),
        ("karcher", False, {}),
        ("sce", True, {"density": 0.5}),
    ],
)
def test_torch_backend_agrees(tmp_path, fam, method, with_base, params):
    """The CUDA path's torch kernels, run on the CPU (the stages' own numpy runs on the host)."""
    base, models = fam
    models = models[:1] if method == "nearswap" else models[:2]
    base = base if with_base else None
    ours = load_f32(run(tmp_path, method, base, models, name="cpu", **params))
    twin = load_f32(
        run(tmp_path, method, base, models, name="torch", opts=EngineOptions(device="torch-cpu"), **params)
    )
    for n in names(ours):
        close(twin[n], ours[n], 1e-6)
