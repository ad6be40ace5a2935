"""Per-tensor evaluation of whole configs (mergekit's planner rules) on names alone, no weights."""

from __future__ import annotations

import pytest

from surgery.errors import RecipeError
from surgery.mergekit.config import ModelRef, parse_config
from surgery.mergekit.methods import get_mk_method
from surgery.mergekit.resolve import ModelInfo, output_layers, resolve_tensors


def llama_names(n_layers: int) -> tuple[str, ...]:
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"]
    return (*names, "model.norm.weight", "lm_head.weight")


def info_for(layers: dict[str, int]):
    return lambda ref: ModelInfo(llama_names(layers[ref.path]), layers[ref.path])


def run(data: dict, layers: dict[str, int]):
    config = parse_config(data)
    method = get_mk_method(config.merge_method)
    return resolve_tensors(config, method, info_for(layers))


def by_name(specs):
    return {s.name: s for s in specs}


def test_gradient_over_blocks_and_t0_outside_them():
    specs, notes = run(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": [0.0, 1.0]}}, {"model": "b"}],
            "parameters": {"weight": 0.5, "lambda": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
        },
        {"base": 5, "a": 5, "b": 5},
    )
    s = by_name(specs)
    assert [s[f"model.layers.{i}.self_attn.q_proj.weight"].per_model["weight"] for i in range(5)] == [
        (0.0, 0.5),
        (0.25, 0.5),
        (0.5, 0.5),
        (0.75, 0.5),
        (1.0, 0.5),
    ]
    # embeddings, final norm AND lm_head take t = 0 (mergekit plans them outside the slices)
    assert s["lm_head.weight"].per_model["weight"] == (0.0, 0.5)
    assert s["model.embed_tokens.weight"].per_model["weight"] == (0.0, 0.5)
    assert s["model.layers.2.mlp.up_proj.weight"].shared["lambda"] == 2.0
    assert s["model.layers.2.self_attn.q_proj.weight"].shared["lambda"] == 1.0
    assert s["model.norm.weight"].models == (ModelRef("base"), ModelRef("a"), ModelRef("b"))  # base first
    assert s["model.norm.weight"].shared["normalize"] is False  # mergekit's task_arithmetic default
    assert notes == []


def test_base_listed_among_models_is_not_weighted_twice():
    specs, _ = run(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "base"}],
            "parameters": {"density": 0.5},
        },
        {"base": 2, "a": 2},
    )
    assert specs[0].models == (ModelRef("base"), ModelRef("a"))
    assert specs[0].per_model == {"weight": (1.0,), "density": (0.5,)}


def test_linear_takes_the_base_as_an_input():
    specs, _ = run(
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [{"model": "a"}],
            "parameters": {"weight": 1.0},
        },
        {"base": 2, "a": 2},
    )
    assert specs[0].models == (ModelRef("a"), ModelRef("base")) and not specs[0].has_base


def test_passthrough_slices_renumber_and_map_sources():
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "b", "layer_range": [1, 3]}], "parameters": {"scale": [0.5, 1.0]}},
        ],
    }
    specs, _ = run(data, {"a": 4, "b": 4})
    s = by_name(specs)
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert [s[q.format(i)].sources[0] for i in range(5)] == [q.format(i) for i in (0, 1, 2, 1, 2)]
    assert [s[q.format(i)].models[0].path for i in range(5)] == ["a", "a", "a", "b", "b"]
    assert [s[q.format(i)].per_model["scale"][0] for i in range(5)] == [None, None, None, 0.5, 1.0]
    assert s["model.embed_tokens.weight"].models == (ModelRef("a"),)  # from the first slice
    assert s["lm_head.weight"].models == (ModelRef("b"),)  # from the last slice, t = 0
    assert s["lm_head.weight"].per_model["scale"] == (0.5,)
    config = parse_config(data)
    assert output_layers(config, get_mk_method("passthrough"), info_for({"a": 4, "b": 4})) == 5


def test_filters_of_a_source_see_the_input_tensor_name():
    data = {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [
                    {
                        "model": "a",
                        "layer_range": [2, 3],
                        "parameters": {"scale": [{"filter": "layers.2.", "value": 3.0}]},
                    }
                ]
            }
        ],
    }
    specs, _ = run(data, {"a": 4})
    assert by_name(specs)["model.layers.0.mlp.up_proj.weight"].per_model["scale"] == (3.0,)


@pytest.mark.parametrize(
    ("data", "layers", "message"),
    [
        (
            {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]},
            {"a": 2},
            "needs base_model",
        ),
        (
            {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]},
            {"a": 2, "base": 2},
            "needs parameter 'weight'",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a"}, {"model": "b"}],
                "parameters": {"weight": 1},
            },
            {"a": 2, "b": 3},
            "different numbers of layers",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "base",
                "models": ["a", "b", "base"],
                "parameters": {"t": 0.5},
            },
            {"a": 2, "b": 2, "base": 2},
            "takes exactly 1 model",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 9]}]}]},
            {"a": 4},
            "has no layer 4",
        ),
    ],
)
def test_resolution_errors(data, layers, message):
    with pytest.raises(RecipeError, match=message):
        run(data, layers)


def test_parameters_the_method_ignores_are_noted():
    _, notes = run(
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.3}}]},
        {"a": 2},
    )
    assert notes == [
        "mergekit config: parameter 'density' means nothing to linear; ignored (as mergekit does)"
    ]
