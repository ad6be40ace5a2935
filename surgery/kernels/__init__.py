"""Kernel backends: the numba CPU kernels and their torch twins share one interface.

A backend is a frozen table of functions over the engine's buffers. The numba backend computes in
place on numpy arrays. The torch backend runs the same math on its device, bit for bit, in one of
two ways: given numpy arrays it copies each kernel's inputs to the device and the result back (any
stage works); given the device tensors of its ``workspace`` (``resident.DeviceWorkspace``: pinned
host staging buffers, device buffers, its own CUDA streams) nothing moves between kernels, and a
chunk crosses the bus twice: its raw inputs in, its encoded output out. The engine is the same for
all of them; a backend with a ``workspace`` factory offers the device-resident path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from surgery.errors import DeviceError


@dataclass(frozen=True)
class Backend:
    """A table of kernels over numpy arrays or a torch backend's device tensors (float32 math, raw
    bf16 as uint16): pure functions, no I/O, no names; cross-chunk state (tie counters,
    accumulators) is passed in by the caller."""

    name: str
    bf16_to_f32: Callable
    f32_to_bf16: Callable
    subtract: Callable
    abs_hist_high: Callable
    abs_hist_low: Callable
    abs_hist_high_low: Callable
    band_mask: Callable
    band_select: Callable
    row_band_mask: Callable
    dare_mask: Callable
    della_mask: Callable
    combine_sum: Callable
    combine_ties: Callable
    combine_ties_variant: Callable
    combine_weighted: Callable
    combine_model_stock: Callable
    gram_accumulate: Callable
    l1_accumulate: Callable
    rescale_update: Callable
    count_nonfinite: Callable
    cast_in: Callable  # F16 / F64 storage -> float32
    cast_out: Callable  # float32 -> F32 / F16 storage
    # () -> a worker's device workspace (device-resident chunks); None: the host path only
    workspace: Callable[[], Any] | None = None

    def decode(self, raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
        """Raw storage -> float32. F32 input is returned as is (no copy)."""
        if dtype == "F32":
            return raw
        if dtype == "BF16":
            self.bf16_to_f32(raw, out)
        else:  # F16, F64: exact for F16, one rounding of F64
            self.cast_in(raw, dtype, out)
        return out

    def encode(self, x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
        """float32 -> raw storage of ``dtype``, one round-to-nearest-even."""
        if dtype == "BF16":  # the kernels read float32 as its bits: uint32 on the host
            self.f32_to_bf16(x.view(np.uint32) if isinstance(x, np.ndarray) else x, out)
        else:  # F32 copy; F16: overflow to inf is expected here and counted by the caller (nonfinite)
            self.cast_out(x, dtype, out)
        return out

    def nonfinite(self, raw: np.ndarray, dtype: str) -> int:
        """How many inf / NaN values ``raw`` (storage of float ``dtype``) holds (a device tensor is
        viewed as integers of its width by the torch kernel)."""
        width, mask = _EXPONENT[dtype]
        bits = raw.reshape(-1).view(width) if isinstance(raw, np.ndarray) else raw
        return int(self.count_nonfinite(bits, width(mask)))


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
    workspace = None
    if device == "cpu":
        from surgery.kernels import cpu as k
    else:
        from surgery.kernels import resident, torch_ops

        k = torch_ops.for_device("cpu" if device == "torch-cpu" else device)
        workspace = partial(resident.DeviceWorkspace, k.device)
    fields = [f for f in Backend.__dataclass_fields__ if f not in ("name", "workspace")]
    return Backend(name=device, workspace=workspace, **{f: getattr(k, f) for f in fields})
