"""A worker's device workspace: the torch backend's device-resident chunk pipeline.

The host ``stream.Workspace`` keeps a chunk in numpy arrays and the torch kernels then copy every
kernel's operands to the device and back. This workspace keeps them there instead: a chunk's raw
input bytes are read from disk into pinned host staging buffers (allocated once per worker and
reused), copied to the device once, decoded there; task vectors, sparsify masks, radix-select
histograms (int64, accumulated on the device for the whole tensor), the combine and the encode all
run on device tensors, and only the encoded output comes back, into a pinned buffer, for the writer.

Overlap on CUDA (each worker thread has its own compute stream, made current by ``activate``, and a
copy stream): staging buffers come in two slots per input, alternating chunk by chunk, on the host
and on the device. The copy of chunk k+1 into its slot waits only for the compute that last used
that slot (chunk k-1), so it runs while chunk k computes; the host slot is refilled only once its
previous copy has finished. The worker's CPU thread reads the next chunk from disk while the GPU
works; it waits for the GPU where a result is needed on the host (the output bytes, tie counts).

The same code runs on ``cpu`` tensors (tests, ``--device torch-cpu``): no pinning, no streams, every
copy synchronous, the same bytes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

_TORCH = {
    np.dtype(np.uint16): torch.int16,  # raw storage lives on the device as the signed type (bits)
    np.dtype(np.uint32): torch.int32,
    np.dtype(np.uint64): torch.int64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.bool_): torch.bool,
}


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class DeviceWorkspace:
    """Reusable buffers of one worker for ``device``: host buffers (pinned on CUDA), device
    buffers, and (CUDA) a compute and a copy stream. Same methods as ``stream.Workspace``."""

    resident = True  # chunks live on the device

    def __init__(self, device: torch.device | str, streams=None) -> None:
        """``streams``: the stream and event API (``torch.cuda`` for a CUDA device, None on the CPU;
        tests pass a recording fake to check the ordering on CPU tensors)."""
        self.device = torch.device(device)
        self._api = streams if streams is not None else (torch.cuda if self.device.type == "cuda" else None)
        self.cuda = self._api is not None
        self._host: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # bytes as torch and numpy
        self._dev: dict[str, torch.Tensor] = {}
        self._fresh: set[str] = set()  # device buffers allocated since their last upload
        self._slot: dict[str, int] = {}  # staging key -> slot handed out last
        self._staged: dict[int, tuple[str, torch.Tensor]] = {}  # host address -> ("key#slot", view)
        self._copied: dict[str, Any] = {}  # "key#slot" -> event: its last upload finished
        self._released: dict[str, Any] = {}  # "key#slot" -> event: compute done with it
        self.compute = self._api.Stream(self.device) if self.cuda else None
        self.copy = self._api.Stream(self.device) if self.cuda else None

    # -- buffers ------------------------------------------------------------------------------------
    def _pair(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """Host buffer ``key`` as numpy and as torch views of the same (pinned, on CUDA) bytes."""
        nbytes = math.prod(shape) * dtype.itemsize
        held = self._host.get(key)
        if held is None or held[0].numel() < nbytes:
            t = torch.empty(max(nbytes, 64), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            held = self._host[key] = (t, t.numpy())
        t, a = held[0][:nbytes].view(_TORCH[dtype]), held[1][:nbytes].view(dtype)
        return a.reshape(shape), t.reshape(shape)

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A host buffer (page-locked on CUDA, so copies from and to it are asynchronous DMA)."""
        return self._pair(key, shape, np.dtype(dtype))[0]

    def array(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> torch.Tensor:
        """A device buffer of numpy ``dtype`` (unsigned: the signed torch type of its width)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._dev.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._dev[key] = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=self.device)
            self._fresh.add(key)
        return buf[:nbytes].view(_TORCH[dtype]).reshape(shape)

    def staging(self, key: str, shape: tuple[int, ...], dtype, alias=None) -> np.ndarray:
        """The host slot the next chunk's raw bytes of ``key`` are read into: the other slot than
        last time, once its previous upload has finished (``alias`` is for the host path only)."""
        slot = self._slot[key] = 1 - self._slot.get(key, 1)
        name = f"{key}#{slot}"
        copied = self._copied.pop(name, None)
        if copied is not None:
            copied.synchronize()  # the DMA out of this slot is done: it may be overwritten
        raw, src = self._pair(name, shape, np.dtype(dtype))
        self._staged[_address(raw)] = (name, src)
        return raw

    # -- transfers ----------------------------------------------------------------------------------
    def upload(self, raw: np.ndarray, dest: torch.Tensor | None = None) -> torch.Tensor:
        """Copy a staging slot to the device once; the result (its device slot, or ``dest``) is
        ready for kernels on the current stream. A device slot is read by the kernels enqueued
        before the next upload of the same key (the decode right after this one), and stays valid
        until the upload after that reuses it."""
        name, src = self._staged[_address(raw)]
        key = "dev:" + name
        dev = self.array(key, tuple(raw.shape), raw.dtype)
        if not self.cuda:
            dev.copy_(src)
        else:
            compute = self._api.current_stream(self.device)
            released = self._released.pop(name, None)
            if key in self._fresh:  # new memory may still be in use by earlier compute
                self._fresh.discard(key)
                self.copy.wait_stream(compute)
            elif released is not None:  # the compute that read this device slot last is done
                self.copy.wait_event(released)
            with self._api.stream(self.copy):
                dev.copy_(src, non_blocking=True)
            copied = self._copied[name] = self._api.Event()
            copied.record(self.copy)
            compute.wait_event(copied)
            # Everything enqueued so far on the compute stream (the previous chunk's use of the
            # other slot included) must finish before that slot is written again.
            mark = self._released[name[:-1] + str(1 - int(name[-1]))] = self._api.Event()
            mark.record(compute)
        if dest is not None:  # an F32 input: device-to-device into its decoded row
            dest.copy_(dev)
            return dest
        return dev

    def download(self, x: torch.Tensor, key: str) -> np.ndarray:
        """The device array's bytes in a reused host buffer, complete when this returns."""
        host, out = self._pair(key, tuple(x.shape), np.dtype(_NUMPY[x.dtype]))
        if self.cuda:
            out.copy_(x, non_blocking=True)
            done = self._api.Event()
            done.record(self._api.current_stream(self.device))
            done.synchronize()
        else:
            out.copy_(x)
        return host

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        """A small device array (histograms, sums) as a fresh numpy array."""
        return x.cpu().numpy()

    def asarray(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def counts(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device=self.device)

    def activate(self) -> contextlib.AbstractContextManager:
        """Run this worker's kernels on its own compute stream (CUDA), not the shared default one."""
        return self._api.stream(self.compute) if self.cuda else contextlib.nullcontext()


# The host dtype a device array comes back as: the engine's storage dtypes (raw bf16 is uint16).
_NUMPY = {torch.int16: np.uint16, torch.int32: np.uint32, torch.int64: np.int64, torch.float16: np.float16,
          torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_}  # fmt: skip
