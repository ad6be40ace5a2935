"""Reading mergekit YAML: every top-level key, model references, and errors that name the feature."""

from __future__ import annotations

import pytest

from surgery.errors import RecipeError
from surgery.mergekit.config import ModelRef, looks_like_mergekit, parse_config, parse_model_ref
from surgery.mergekit.methods import MK_METHODS, get_mk_method, require_runnable


def test_model_references():
    assert parse_model_ref("org/name", "m") == ModelRef("org/name")
    assert parse_model_ref("org/name@v1.0", "m") == ModelRef("org/name", "v1.0")
    assert parse_model_ref("/data/models/a", "m").source == "/data/models/a"
    assert parse_model_ref("org/name@abc", "m").source == "org/name@abc"
    assert parse_model_ref({"model": "org/name@r"}, "m") == ModelRef("org/name", "r")
    with pytest.raises(RecipeError, match="more than one @"):
        parse_model_ref("a@b@c", "m")


def test_lora_references_are_refused_by_name():
    with pytest.raises(RecipeError, match=r"model\+lora.*not supported yet") as info:
        parse_model_ref("org/base+org/adapter", "models[0].model")
    assert "merge_and_unload" in info.value.hint


FULL = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [{"model": "org/a", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}, "org/b"],
    "parameters": {"normalize": True, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]},
    "dtype": "bfloat16",
    "out_dtype": "float16",
    "tokenizer_source": "base",
    "name": "my-merge",
}


def test_a_full_config_parses():
    config = parse_config(FULL)
    assert config.merge_method == "ties"
    assert config.base_model == ModelRef("org/base")
    assert [m.model.path for m in config.models] == ["org/a", "org/b"]
    assert config.models[0].parameters == {"weight": 0.5, "density": [0.2, 0.8]}
    assert (config.dtype, config.out_dtype, config.tokenizer_source, config.name) == (
        "bfloat16",
        "float16",
        "base",
        "my-merge",
    )
    assert looks_like_mergekit(FULL) and not looks_like_mergekit({"method": "ties", "models": []})


def test_slices_parse():
    config = parse_config(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 4]}]},
                {"sources": [{"model": "b", "layer_range": [2, 6]}], "parameters": {"scale": 0.5}},
            ],
        }
    )
    assert [s.sources[0].layer_range for s in config.slices] == [(0, 4), (2, 6)]
    assert config.slices[1].parameters == {"scale": 0.5}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modules": {"text": {}}}, r"'modules:'.*not supported yet"),
        ({"tokenizer_source": "union"}, "tokenizer_source: union is not supported yet"),
        ({"chat_template": "chatml"}, "chat_template is not supported yet"),
        (
            {"tokenizer_source": None, "tokenizer": {"source": "base", "tokens": {"<x>": {}}}},
            "tokenizer.tokens",
        ),
        ({"frobnicate": 1}, "unknown top-level key"),
        ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
        ({"dtype": "int8"}, "not a float dtype"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "exactly one of"),
        ({"parameters": {"weight": [1, {"filter": "x", "value": 2}]}}, "mixes values and conditions"),
        ({"merge_method": None}, "merge_method must be"),
    ],
)
def test_errors_name_the_feature(change, message):
    with pytest.raises(RecipeError, match=message):
        parse_config({**FULL, **change})


def test_slice_errors():
    def cfg(sources, **extra):
        return {"merge_method": "slerp", "slices": [{"sources": sources, **extra}]}

    with pytest.raises(RecipeError, match="different numbers of layers"):
        parse_config(cfg([{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]))
    with pytest.raises(RecipeError, match="layer_range must be"):
        parse_config(cfg([{"model": "a", "layer_range": [3, 2]}]))
    with pytest.raises(RecipeError, match="residual_weight is not supported yet"):
        parse_config(cfg([{"model": "a", "layer_range": [0, 2]}], residual_weight=0.5))


def test_every_mergekit_method_is_known_and_the_missing_ones_are_named():
    names = {
        "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "linear", "slerp", "nuslerp", "multislerp", "karcher", "sce",
        "model_stock", "passthrough", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
    }  # fmt: skip
    assert set(MK_METHODS) == names
    with pytest.raises(RecipeError, match="merge_method: ram is not supported yet"):
        require_runnable(get_mk_method("ram"))
    with pytest.raises(RecipeError, match="unknown merge_method 'frank'"):
        get_mk_method("frank")


def test_mergekit_defaults_that_differ_from_the_papers():
    normalize = {
        n: MK_METHODS[n].param("normalize").default for n in ("ties", "dare_ties", "della", "task_arithmetic")
    }
    assert normalize == {"ties": True, "dare_ties": False, "della": True, "task_arithmetic": False}
    assert MK_METHODS["dare_linear"].param("rescale").default is True
    assert MK_METHODS["breadcrumbs"].param("density").default == 1.0
