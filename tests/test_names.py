"""Layer placement on tensor names of real architectures, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from surgery.names import layer_map, place

SMALL = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}


def build(config_cls, model_cls, **kw):
    config = config_cls(**kw)
    with torch.device("meta"):  # names only: no memory for weights
        model = model_cls(config)
    return list(model.state_dict().keys()), config.to_dict()


FAMILIES = {
    "llama": lambda: build(tf.LlamaConfig, tf.LlamaForCausalLM, num_hidden_layers=3, num_key_value_heads=1, **SMALL),
    "mistral": lambda: build(tf.MistralConfig, tf.MistralForCausalLM, num_hidden_layers=3, num_key_value_heads=1, **SMALL),
    "qwen2": lambda: build(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_hidden_layers=3, num_key_value_heads=1, **SMALL),
    "gemma": lambda: build(tf.GemmaConfig, tf.GemmaForCausalLM, num_hidden_layers=3, num_key_value_heads=1, head_dim=8, **SMALL),
    "gpt2": lambda: build(tf.GPT2Config, tf.GPT2LMHeadModel, n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=32),
    "bert": lambda: build(tf.BertConfig, tf.BertForMaskedLM, num_hidden_layers=3, **SMALL),
    "roberta": lambda: build(tf.RobertaConfig, tf.RobertaForMaskedLM, num_hidden_layers=3, **SMALL),
    "t5": lambda: build(tf.T5Config, tf.T5ForConditionalGeneration, num_layers=3, num_decoder_layers=3, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=64),
    "vit": lambda: build(tf.ViTConfig, tf.ViTModel, num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=8, patch_size=4),
    "clip_vision": lambda: build(tf.CLIPVisionConfig, tf.CLIPVisionModel, num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=8, patch_size=4),
    "mixtral": lambda: build(tf.MixtralConfig, tf.MixtralForCausalLM, num_hidden_layers=3, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "qwen2_moe": lambda: build(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, num_hidden_layers=3, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8, **SMALL),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_is_placed_and_block_count_matches_config(family):
    names, config = FAMILIES[family]()
    layers = layer_map(names, config)
    assert layers.unknown == (), layers.unknown
    assert layers.num_blocks == 3
    assert layers.consistent
    assert {p.block for p in layers.placements.values() if p.block is not None} == {0, 1, 2}
    positions = {p.position for p in layers.placements.values()}
    assert "before" in positions  # every family has embeddings before block 0


def test_moe_experts_belong_to_their_layer_not_block_zero():
    names, _ = FAMILIES["mixtral"]()
    experts = [n for n in names if "experts" in n]
    assert experts, names
    for name in experts:
        layer = int(name.split("layers.")[1].split(".")[0])
        assert place(name).block == layer, name
    assert place("model.layers.5.mlp.experts.0.down_proj.weight").block == 5
    assert place("model.layers.5.block_sparse_moe.experts.17.w1.weight").block == 5


@pytest.mark.parametrize(
    ("name", "position", "block"),
    [
        ("model.embed_tokens.weight", "before", None),
        ("transformer.wte.weight", "before", None),
        ("transformer.wpe.weight", "before", None),
        ("bert.embeddings.LayerNorm.weight", "before", None),
        ("model.norm.weight", "after", None),
        ("lm_head.weight", "after", None),
        ("transformer.ln_f.bias", "after", None),
        ("transformer.h.11.attn.c_attn.weight", "block", 11),
        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "block", 2),
        ("visual.transformer.resblocks.7.attn.in_proj_weight", "block", 7),
        ("vision_model.encoder.layers.4.mlp.fc1.weight", "block", 4),
        ("something.completely.different", "unknown", None),
    ],
)
def test_place_rules(name, position, block):
    p = place(name)
    assert (p.position, p.block) == (position, block)


def test_config_disagreement_is_reported():
    names = [f"model.layers.{i}.mlp.weight" for i in range(4)] + ["model.embed_tokens.weight"]
    layers = layer_map(names, {"num_hidden_layers": 6})
    assert layers.num_blocks == 4 and layers.config_layers == 6 and not layers.consistent
