"""An adapter folder read as base + adapter equals peft's merge_and_unload, for every config option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig
from peft_factory import gpt2, llama, make_adapter, merged_reference, save_base

from surgery.adapters import AdapterCheckpoint
from surgery.errors import MissingTensorError, RecipeError
from surgery.inputs import open_input

LLAMA = transformers.LlamaForCausalLM
GPT2 = transformers.GPT2LMHeadModel
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "plain": (llama, LLAMA, dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "patterns": (llama, LLAMA, dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                    rank_pattern={"v_proj": 2, r"layers\.2\.mlp\.up_proj": 3},
                                    alpha_pattern={"o_proj": 3, "k_proj": 5})),
    "rslora": (llama, LLAMA, dict(r=3, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "down_proj"])),
    "layers": (llama, LLAMA, dict(r=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2])),
    "regex_exclude": (llama, LLAMA, dict(r=2, target_modules=r".*\.(q_proj|gate_proj)",
                                         exclude_modules=["layers.1.self_attn.q_proj"])),
    "modules_to_save": (llama, LLAMA, dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "embedding": (llama, LLAMA, dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj"])),
    "tied_embedding": (lambda: llama(tie=True), LLAMA, dict(r=2, target_modules=["embed_tokens", "up_proj"])),
    "gpt2_conv1d": (gpt2, GPT2, dict(r=3, lora_alpha=6, fan_in_fan_out=True,
                                     target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_bias": (gpt2, GPT2, dict(r=2, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "gpt2_embedding": (gpt2, GPT2, dict(r=2, fan_in_fan_out=True, target_modules=["wte", "c_proj"])),
}  # fmt: skip


def as_f32(ckpt, name: str) -> torch.Tensor:
    info = ckpt.info(name)
    raw = torch.from_numpy(ckpt.read(name).copy())
    if info.dtype.name == "BF16":
        return raw.view(torch.bfloat16).float()
    return raw.view(torch.float16).float() if info.dtype.name == "F16" else raw


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_reads_as_merge_and_unload(case, tmp_path):
    make_model, cls, kwargs = CASES[case]
    base = save_base(make_model(), tmp_path / "base")
    adapter = make_adapter(make_model(), tmp_path / "adapter", LoraConfig(**kwargs))
    reference = merged_reference(cls, base, adapter)
    with open_input(str(adapter), base=str(base)) as ckpt:
        assert isinstance(ckpt, AdapterCheckpoint)
        assert set(ckpt.tensors) == set(reference)
        changed = 0
        for name, want in reference.items():
            got = as_f32(ckpt, name)
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6, msg=name)
            changed += not torch.equal(got, as_f32(ckpt.base, name))
        assert changed >= 2  # the adapter really changes weights (B is not left at zero)
        untouched = set(reference) - set(ckpt.layout.updates) - set(ckpt.layout.replaced)
        for name in untouched:  # bytes of weights the adapter does not touch are the base's
            assert np.array_equal(ckpt.read(name), ckpt.base.read(name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dyadic_adapter_is_byte_exact(dtype, tmp_path):
    """With factors whose products are exact, the merged weights equal peft's bit for bit, in the
    base's dtype (peft rounds a linear delta once with the add, an embedding delta before it)."""
    base = save_base(llama(), tmp_path / "base", dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"])
    adapter = make_adapter(llama(), tmp_path / "adapter", config, dyadic=True)
    reference = merged_reference(LLAMA, base, adapter, dtype=dtype)
    with open_input(str(adapter), base=str(base)) as ckpt:
        for name, want in reference.items():
            got = torch.from_numpy(ckpt.read(name).copy())
            assert got.numpy().tobytes() == want.contiguous().view(got.dtype).numpy().tobytes(), name


def test_reads_are_chunk_invariant(tmp_path, monkeypatch):
    """Any element range (rows cut anywhere, tiny row blocks) gives the bytes of the whole read."""
    from surgery.adapters import merged

    base = save_base(llama(), tmp_path / "base", torch.bfloat16)
    adapter = make_adapter(
        llama(), tmp_path / "adapter", LoraConfig(r=4, target_modules=ALL_LINEAR + ["embed_tokens"])
    )
    with open_input(str(adapter), base=str(base)) as ckpt:
        whole = {n: ckpt.read(n).reshape(-1) for n in ckpt.layout.updates}
        monkeypatch.setattr(merged, "BLOCK_ELEMENTS", 5)
        for name, want in whole.items():
            for step in (7, 16, 33):
                parts = [ckpt.read_into(name, s, np.empty(min(step, want.size - s), want.dtype))
                         for s in range(0, want.size, step)]  # fmt: skip
                assert np.array_equal(np.concatenate(parts), want), (name, step)


def test_default_base_is_the_adapters_own(tmp_path):
    base = save_base(llama(), tmp_path / "base")
    adapter = make_adapter(llama(), tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"]))
    from peft_factory import set_base_name

    set_base_name(adapter, str(base))
    with open_input(str(adapter)) as ckpt:
        assert ckpt.base.root == base


def test_dora_is_refused(tmp_path):
    adapter = make_adapter(
        llama(), tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    base = save_base(llama(), tmp_path / "base")
    with pytest.raises(RecipeError, match=r"uses DoRA .*use_dora in adapter_config.json.*does not merge"):
        open_input(str(adapter), base=str(base))


def test_keys_that_map_nowhere_are_named(tmp_path):
    """An adapter on the wrong base: every key that fits no base tensor is listed."""
    adapter = make_adapter(
        gpt2(), tmp_path / "adapter", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    base = save_base(llama(), tmp_path / "llama")
    with pytest.raises(MissingTensorError) as err:
        open_input(str(adapter), base=str(base))
    message = str(err.value)
    assert "2 problem(s)" in message
    assert "adapter module 'transformer.h.0.attn.c_attn' maps to no base tensor" in message
    assert "transformer.h.1.attn.c_attn" in message


def test_untargeted_keys_are_refused(tmp_path):
    """peft would silently drop factors of a module its config does not target: refuse instead."""
    import json

    base = save_base(llama(), tmp_path / "base")
    adapter = make_adapter(
        llama(), tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MissingTensorError, match=r"'model.layers.0.self_attn.v_proj' is not targeted"):
        open_input(str(adapter), base=str(base))


def test_rank_must_match_the_config(tmp_path):
    import json

    base = save_base(llama(), tmp_path / "base")
    adapter = make_adapter(llama(), tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MissingTensorError, match=r"lora_A \[2, 16\] and lora_B \[16, 2\], not rank 4"):
        open_input(str(adapter), base=str(base))
