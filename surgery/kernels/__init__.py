"""Kernel backends: the numba CPU kernels and their torch twins share one interface.

A backend is a frozen table of functions over numpy arrays (the engine's buffers). The numba backend
computes in place; the torch backend moves each chunk to its device, runs the same math, and copies
the result back, so the engine is the same for both and results can be compared bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from surgery.errors import DeviceError


@dataclass(frozen=True)
class Backend:
    """A table of kernels over numpy arrays (float32 math, raw bf16 as uint16): pure functions, no
    I/O, no names; cross-chunk state (tie counters, accumulators) is passed in by the caller."""

    name: str
    bf16_to_f32: Callable
    f32_to_bf16: Callable
    subtract: Callable
    abs_hist_high: Callable
    abs_hist_low: Callable
    band_mask: Callable
    band_select: Callable
    row_band_mask: Callable
    dare_mask: Callable
    della_mask: Callable
    combine_sum: Callable
    combine_ties: Callable
    combine_weighted: Callable
    combine_model_stock: Callable
    gram_accumulate: Callable
    l1_accumulate: Callable
    rescale_update: Callable
    count_nonfinite: Callable

    def decode(self, raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
        """Raw storage -> float32. F32 input is returned as is (no copy)."""
        if dtype == "F32":
            return raw
        if dtype == "BF16":
            self.bf16_to_f32(raw, out)
        else:  # F16, F64: numpy's cast is exact for F16 and rounds F64 once
            np.copyto(out, raw.view(np.float16 if dtype == "F16" else np.float64), casting="unsafe")
        return out

    def encode(self, x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
        """float32 -> raw storage of ``dtype``, one round-to-nearest-even."""
        if dtype == "F32":
            np.copyto(out, x)
        elif dtype == "BF16":
            self.f32_to_bf16(x.view(np.uint32), out)
        else:  # overflow to inf is expected here and counted by the caller (nonfinite)
            with np.errstate(over="ignore"):
                np.copyto(out.view(np.float16), x, casting="unsafe")
        return out

    def nonfinite(self, raw: np.ndarray, dtype: str) -> int:
        """How many inf / NaN values ``raw`` (storage of float ``dtype``) holds."""
        width, mask = _EXPONENT[dtype]
        return int(self.count_nonfinite(raw.reshape(-1).view(width), width(mask)))


# storage width and exponent field of each float dtype: all exponent bits set means inf or NaN
_EXPONENT = {
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F32": (np.uint32, 0x7F800000),
}


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run on, before anything is read or written: ``cpu``,
    ``torch-cpu`` (tests), ``cuda`` or ``cuda:N`` with N below the number of visible GPUs."""
    if device in ("cpu", "torch-cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise DeviceError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the CUDA path only
        raise DeviceError(f"device {device!r} needs torch, which is not installed",
                          hint="install torch with CUDA support, or use --device cpu") from None  # fmt: skip
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise DeviceError(
            f"device {device!r}: CUDA is not available on this machine ({why})",
            hint="use --device cpu (the numba kernels; the default)",
        )
    count = torch.cuda.device_count()
    if int(m.group(1) or 0) >= count:
        raise DeviceError(
            f"device {device!r}: this machine has {count} CUDA device(s)",
            hint=f"use cuda:0 ... cuda:{count - 1}",
        )


def get_backend(device: str = "cpu") -> Backend:
    """``cpu``: numba kernels. ``cuda``/``cuda:N`` (or ``torch-cpu`` for testing): torch twins."""
    if device == "cpu":
        from surgery.kernels import cpu as k
    else:
        from surgery.kernels import torch_ops

        k = torch_ops.for_device("cpu" if device == "torch-cpu" else device)
    fields = [f for f in Backend.__dataclass_fields__ if f != "name"]
    return Backend(name=device, **{f: getattr(k, f) for f in fields})
