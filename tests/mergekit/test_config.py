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


def test_lora_references():
    ref = parse_model_ref("org/base@r1+org/lora@r2", "models[0].model")
    assert ref == ModelRef("org/base", "r1", "org/lora@r2")  # the adapter keeps its revision
    assert (ref.source, ref.input, str(ref)) == ("org/base@r1", "org/lora@r2", "org/base@r1+org/lora@r2")
    with pytest.raises(RecipeError, match="more than one @"):
        parse_model_ref("org/base+org/lora@a@b", "m")
    assert parse_model_ref({"model": "org/base", "lora": "org/lora"}, "m").lora == "org/lora"
    with pytest.raises(RecipeError, match="names no LoRA adapter"):
        parse_model_ref("org/base+", "m")
    with pytest.raises(RecipeError, match="cannot read model reference"):
        parse_model_ref("a+b+c", "m")


def test_tokenizer_block_and_chat_template_parse():
    config = parse_config(
        {
            **FULL,
            "tokenizer_source": None,
            "tokenizer": {
                "pad_to_multiple_of": 8,
                "tokens": {
                    "<a>": {"source": "org/a"},
                    "<b>": {"source": {"kind": "zero"}, "force": True},
                    "<c>": {"source": {"kind": "model_token", "model": "org/b+lora", "token_id": 3}},
                },
            },
            "chat_template": "chatml",
        }
    )
    assert config.tokenizer_source == "union"  # mergekit's default source of a tokenizer block
    assert config.pad_to_multiple_of == 8 and config.chat_template == "chatml"
    tokens = dict(config.tokens)
    assert tokens["<a>"] == {"source": ModelRef("org/a"), "force": False}
    assert tokens["<b>"] == {"source": {"kind": "zero"}, "force": True}
    assert tokens["<c>"]["source"]["model"] == ModelRef("org/b", None, "lora")


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
        ({"chat_template": "exaone"}, "chat_template: exaone is not supported yet"),
        ({"chat_template": "zephyr"}, "invalid chat template 'zephyr'"),
        (
            {"tokenizer_source": None, "tokenizer": {"source": "base", "tokens": {"<x>": {}}}},
            r"tokenizer.tokens\['<x>'\] without a source is not supported yet",
        ),
        ({"tokenizer_source": None, "tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
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
    # declared by mergekit 0.1.5 but read nowhere: accepted and ignored, as mergekit does
    assert (
        parse_config(cfg([{"model": "a", "layer_range": [0, 2]}], residual_weight=0.5))
        .slices[0]
        .residual_weight
        == 0.5
    )
    with pytest.raises(RecipeError, match="residual_weight must be a number"):
        parse_config(cfg([{"model": "a", "layer_range": [0, 2]}], residual_weight="x"))


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
