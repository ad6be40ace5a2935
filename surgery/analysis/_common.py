"""Helpers shared by the analyses (stats, intruders, plots): layer labels, float32 reads, torch, regexes."""

from __future__ import annotations

import re

import numpy as np

from surgery.checkpoint import Checkpoint
from surgery.errors import RecipeError
from surgery.names import place


def layer_label(name: str) -> str:
    """``"3"`` for a tensor of block 3, else ``before`` (embeddings), ``after`` (head) or ``unknown``."""
    p = place(name)
    return str(p.block) if p.position == "block" else p.position


def layer_sort_key(label: str) -> tuple[int, int]:
    """Order layers as they sit in the network: before, 0, 1, ..., after, unknown."""
    fixed = {"before": (0, 0), "after": (2, 0), "unknown": (3, 0)}
    return fixed.get(label) or (1, int(label))


def read_f32(ckpt: Checkpoint, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
    """Elements ``start:start+count`` of a float tensor as a flat float32 array (BF16/F16 decoded)."""
    info = ckpt.info(name)
    count = info.numel - start if count is None else count
    return to_f32(ckpt.read_into(name, start, np.empty(count, dtype=info.dtype.storage)), info.dtype.name)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw storage (BF16 as uint16 bits) -> flat float32, with the engine's decoder."""
    from surgery.kernels import get_backend

    raw = raw.reshape(-1)
    if dtype == "F32":
        return raw
    return get_backend("cpu").decode(raw, dtype, np.empty(raw.size, np.float32))


def require_torch():
    """torch, or a clear error: the analyses' SVDs use torch.linalg (CPU threads or CUDA)."""
    try:
        import torch
    except ImportError:
        from surgery.errors import SurgeryError

        raise SurgeryError(
            "this analysis needs PyTorch (its SVDs run with torch.linalg), which is not installed",
            hint="install the CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu",
        ) from None
    return torch


def compile_include(include: str | None) -> re.Pattern | None:
    if include is None:
        return None
    try:
        return re.compile(include)
    except re.error as exc:
        raise RecipeError(
            f"--include {include!r} is not a valid regular expression: {exc}",
            hint="write a Python regex, e.g. 'layers\\.(0|1)\\.' or 'q_proj|v_proj'",
        ) from None
