"""A LoRA adapter named by its Hub id: downloaded (config + weights only), its base taken from its
``base_model_name_or_path`` (itself a Hub id), merged the same as the local folders."""

from __future__ import annotations

import json
from pathlib import Path


def write_adapter(folder: Path, base_name: str) -> Path:
    """A PEFT-layout adapter over ckpt_factory's names: rank 2 on the q_proj of both blocks."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in (0, 1):
        stem = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(2, 12, generator=g)
        tensors[f"{stem}.lora_B.weight"] = torch.randn(12, 2, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": base_name}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_hub_adapter_merges_like_the_local_one(tmp_path, family, fake_hub, run_child):
    from test_hub import _files

    fake_hub.add_repo("alice/base", _files(family["base"]))
    hub_adapter = write_adapter(tmp_path / "hub_adapter", "alice/base")
    fake_hub.add_repo("alice/lora", {**_files(hub_adapter), "optimizer.pt": b"x" * 100})
    local = write_adapter(tmp_path / "local_adapter", str(family["base"]))
    result = run_child("child_merge_adapters", tmp_path, str(local))
    assert result["same"], "merging the Hub adapter differs from merging the local one"
    assert result["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "base: alice/base\n" in result["recipe"] and "- alice/lora\n" in result["recipe"]
