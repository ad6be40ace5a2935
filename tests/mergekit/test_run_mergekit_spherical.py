"""`surgery run` on mergekit configs of nearswap, nuslerp, multislerp, karcher and sce, on tiny Llama
models, against mergekit's math re-derived in ``tests/mergekit_math.py`` (float32 inputs: 1e-5)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from mergekit_math import karcher_ref, multislerp_ref, nearswap_ref, nuslerp_ref, sce_ref

from tests.mergekit.test_run_mergekit import family, states_of, write_config  # noqa: F401 (fixture)
from tests.test_e2e_transformers import load_state


@pytest.fixture
def llamas(family):  # noqa: F811 (the tiny Llama models of test_run_mergekit)
    return family


def run_config(invoke, tmp_path, data) -> dict[str, torch.Tensor]:
    result = invoke("run", write_config(tmp_path, {**data, "dtype": "float32"}), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    return load_state(tmp_path / "out")


def recipe_of(tmp_path) -> dict:
    return yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())


def np32(state):
    return {n: t.float().numpy() for n, t in state.items()}


def check(got: dict[str, torch.Tensor], want) -> None:
    for name, tensor in got.items():
        expected = torch.from_numpy(np.asarray(want(name), np.float64)).float()
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7, msg=name)


def models(llamas, *keys, **params):
    return [{"model": str(llamas[k]), **({"parameters": params[k]} if k in params else {})} for k in keys]


def test_nearswap_with_a_gradient_t(llamas, invoke, tmp_path):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "nearswap",
            "base_model": str(llamas["base"]),
            "models": models(llamas, "ft1"),
            "parameters": {"t": [{"filter": "mlp", "value": 0.03}, {"value": 0.01}]},
        },
    )
    b, f = (np32(s) for s in states_of(llamas, "base", "ft1"))
    check(got, lambda n: nearswap_ref(b[n], f[n], 0.03 if "mlp" in n else 0.01))
    recipe = recipe_of(tmp_path)
    assert recipe["method"] == "nearswap" and recipe["parameters"]["distance"] == 0.01
    assert all(v == {"distance": 0.03} for v in recipe["per_tensor"].values())


@pytest.mark.parametrize(
    "options,axis",
    [({}, None), ({"nuslerp_flatten": False}, -1), ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 0)],
)
def test_nuslerp_with_a_base_and_vector_options(llamas, invoke, tmp_path, options, axis):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "nuslerp",
            "base_model": str(llamas["base"]),
            "models": models(llamas, "ft1", "ft2", ft1={"weight": 0.3}, ft2={"weight": 0.9}),
            "parameters": options,
        },
    )
    b, f1, f2 = (np32(s) for s in states_of(llamas, "base", "ft1", "ft2"))
    check(got, lambda n: b[n] + nuslerp_ref(0.75, f1[n] - b[n], f2[n] - b[n], axis))


def test_nuslerp_without_a_base(llamas, invoke, tmp_path):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "nuslerp",
            "models": models(llamas, "ft1", "ft2", ft1={"weight": 1.0}, ft2={"weight": 1.0}),
        },
    )
    f1, f2 = (np32(s) for s in states_of(llamas, "ft1", "ft2"))
    check(got, lambda n: nuslerp_ref(0.5, f1[n], f2[n]))
    assert recipe_of(tmp_path)["base"] is None


def test_multislerp_with_a_base(llamas, invoke, tmp_path):
    w = {"ft1": 0.5, "ft2": 1.0, "ft3": 2.0}
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "multislerp",
            "base_model": str(llamas["base"]),
            "models": models(llamas, "ft1", "ft2", "ft3", **{k: {"weight": v} for k, v in w.items()}),
        },
    )
    b, *fs = (np32(s) for s in states_of(llamas, "base", "ft1", "ft2", "ft3"))
    check(got, lambda n: b[n] + multislerp_ref([f[n] - b[n] for f in fs], list(w.values())))


def test_multislerp_without_normalized_weights(llamas, invoke, tmp_path):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "multislerp",
            "base_model": str(llamas["base"]),
            "models": models(llamas, "ft1", "ft2", ft1={"weight": 0.5}, ft2={"weight": 1.0}),
            "parameters": {"normalize_weights": False},
        },
    )
    b, *fs = (np32(s) for s in states_of(llamas, "base", "ft1", "ft2"))
    check(got, lambda n: b[n] + multislerp_ref([f[n] - b[n] for f in fs], [0.5, 1.0], normalize=False))


def test_karcher_of_three_models(llamas, invoke, tmp_path):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "karcher",
            "models": models(llamas, "ft1", "ft2", "ft3"),
            "parameters": {"max_iter": 4, "tol": 1e-6},
        },
    )
    fs = [np32(s) for s in states_of(llamas, "ft1", "ft2", "ft3")]
    check(got, lambda n: karcher_ref([f[n] for f in fs], max_iter=4, tol=1e-6))
    assert recipe_of(tmp_path)["parameters"] == {"max_iter": 4, "tol": 1e-6}


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce_select_topk(llamas, invoke, tmp_path, topk):
    got = run_config(
        invoke,
        tmp_path,
        {
            "merge_method": "sce",
            "base_model": str(llamas["base"]),
            "models": models(llamas, "ft1", "ft2", "ft3"),
            "parameters": {"select_topk": topk},
        },
    )
    b, *fs = (np32(s) for s in states_of(llamas, "base", "ft1", "ft2", "ft3"))
    check(got, lambda n: sce_ref(b[n], [f[n] for f in fs], topk))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"merge_method": "sce", "parameters": {"select_topk": 0.0}},
            r"sce with select_topk 0.0 \(keeps nothing: the base\) is not supported yet",
        ),
    ],
)
def test_refusals_name_the_option(llamas, invoke, tmp_path, data, message):
    data = {
        "base_model": str(llamas["base"]),
        "models": models(llamas, "ft1", "ft2"),
        "dtype": "float32",
        **data,
    }
    result = invoke("run", write_config(tmp_path, data), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
