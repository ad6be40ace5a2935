"""PEFT LoRA adapters as inputs: an adapter folder plus its base reads as the fine-tune it stands for.

``open_adapter(folder, base)`` -> ``AdapterCheckpoint`` (same reading interface as a ``Checkpoint``).
``surgery.inputs.open_input`` decides between the two, so callers never branch on adapters.
"""

from __future__ import annotations

from pathlib import Path

from surgery.adapters.lora import AdapterLayout, LowRankUpdate, map_adapter
from surgery.adapters.merged import AdapterCheckpoint
from surgery.adapters.peft_config import CONFIG_NAME, LoraSettings, is_adapter, read_settings
from surgery.checkpoint import open_checkpoint
from surgery.errors import IncompatibleTensorsError, InputNotFoundError, RecipeError
from surgery.files import ADAPTER_WEIGHTS as WEIGHTS_NAME

__all__ = [
    "AdapterCheckpoint", "AdapterLayout", "LoraSettings", "LowRankUpdate", "is_adapter", "open_adapter",
    "read_settings", "CONFIG_NAME", "WEIGHTS_NAME",
]  # fmt: skip

_MERGEABLE = ("F32", "F16", "BF16")


def open_adapter(source: str, folder: Path, base: str | None = None) -> AdapterCheckpoint:
    """Open the adapter in ``folder`` over ``base`` (default: its ``base_model_name_or_path``)."""
    from surgery.kernels import get_backend  # numba: only once an adapter is really read

    settings = read_settings(folder)
    if base is None and settings.base_model:  # a relative path: against the adapter folder, as cards
        local = folder / Path(settings.base_model).expanduser()
        base = str(local.resolve()) if local.exists() else settings.base_model
    if not base:
        raise RecipeError(
            f"adapter {source} names no base model (base_model_name_or_path is empty)",
            hint="pass --base BASE",
            path=source,
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputNotFoundError(
            f"no {WEIGHTS_NAME} in adapter folder {folder}",
            hint="surgery reads safetensors adapters: re-save it with safe_serialization=True",
            path=str(weights),
        )
    base_ck = open_checkpoint(base)
    try:
        adapter_ck = open_checkpoint(weights)
    except BaseException:
        base_ck.close()
        raise
    try:
        layout = map_adapter(
            settings,
            {n: i.shape for n, i in adapter_ck.tensors.items()},
            {n: i.shape for n, i in base_ck.tensors.items()},
            source,
        )
        odd = sorted(n for n in layout.updates if base_ck.tensors[n].dtype.name not in _MERGEABLE)
        odd += sorted(  # a replacement is cast to the base's dtype: only between these three
            n
            for n, key in layout.replaced.items()
            if base_ck.tensors[n].dtype.name != adapter_ck.tensors[key].dtype.name
            and {base_ck.tensors[n].dtype.name, adapter_ck.tensors[key].dtype.name} - set(_MERGEABLE)
        )
        if odd:
            raise IncompatibleTensorsError(
                f"adapter {source} changes tensors that are not F32/F16/BF16 in the base: "
                + ", ".join(odd[:5]),
                hint="surgery merges LoRA updates into float32, float16 and bfloat16 weights",
                tensor=odd[0],
            )
    except BaseException:
        base_ck.close()
        adapter_ck.close()
        raise
    return AdapterCheckpoint(source, folder, base_ck, adapter_ck, layout, get_backend("cpu"))
