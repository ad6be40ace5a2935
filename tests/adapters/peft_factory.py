"""Tiny transformers models with real peft adapters, built offline, and the merged reference.

The reference is peft itself: ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file


def llama(tie: bool = False) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def gpt2() -> transformers.PreTrainedModel:
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def save_base(model, folder: Path, dtype=torch.float32) -> Path:
    model.to(dtype).save_pretrained(folder)
    model.to(torch.float32)
    return folder


def make_adapter(model, folder: Path, config: LoraConfig, seed: int = 1, dyadic: bool = False) -> Path:
    """Wrap ``model`` with ``config``, give every LoRA factor random values (B is zero at init), save.

    ``dyadic``: small multiples of 1/16, so that every product and sum in B @ A is exact in float32 and
    any summation order gives the same bits (byte-exact comparisons with peft's own GEMM).
    """
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                values = torch.randn(p.shape, generator=g)
                p.copy_(torch.round(values * 4) / 16 if dyadic else values * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def set_base_name(adapter: Path, base: str) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config))


def merged_reference(model_cls, base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of ``adapter`` over ``base``, as the checkpoint's state dict."""
    model = model_cls.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    saved = load_file(str(base / "model.safetensors"))
    return {k: state[k] for k in saved}  # the names the checkpoint stores (tied lm_head is not)
