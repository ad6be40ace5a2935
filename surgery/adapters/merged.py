"""A LoRA adapter over its base, read as the fine-tuned checkpoint it stands for.

``AdapterCheckpoint`` answers the same questions as ``surgery.checkpoint.Checkpoint`` (tensor names,
dtypes, shapes, ``read_into`` of any element range), so every command that takes a fine-tune takes an
adapter, and neither the planner nor the engine nor any method knows adapters exist. Its tensors are
exactly what ``merge_and_unload()`` produces in the base's dtype:

    adapted linear / Conv1D weight:  dtype(fl32(W + fl32(fl32(L @ R) * scaling)))
    adapted embedding:               dtype(fl32(W + dtype(fl32(fl32(L @ R) * scaling))))
    modules_to_save / saved layers:  the adapter's tensor, cast to the base tensor's dtype (plus its
                                     low-rank update, for an embedding saved beside its LoRA)
    anything else:                   the base tensor, bytes unchanged

(peft adds a linear layer's float32 delta to the weight and rounds once; it casts an embedding's
delta to the weight's dtype first.) Only the rows a read covers are computed, a block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery.adapters.lora import BLOCK_ELEMENTS, AdapterLayout, LowRankUpdate, factors, update_rows
from surgery.checkpoint import Checkpoint, TensorInfo
from surgery.kernels import Backend

# Tokenizer files an adapter may carry (new tokens); when present they replace the base's.
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class AdapterCheckpoint:
    """The fine-tune ``base + adapter``; same reading interface as ``Checkpoint``."""

    source: str  # what the user named (adapter folder or Hub id)
    folder: Path  # the adapter folder
    base: Checkpoint
    adapter: Checkpoint  # adapter_model.safetensors, opened by the same validated reader
    layout: AdapterLayout
    backend: Backend
    metadata: dict[str, str] = field(default_factory=dict)

    # -- what a Checkpoint offers -----------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    @property
    def root(self) -> Path:
        """Side files (tokenizer) come from the adapter when it ships its own, else from the base."""
        if any((self.folder / name).is_file() for name in _TOKENIZER):
            return self.folder
        return self.base.root

    @property
    def io(self):
        """How tensor bytes are read (local files or ranges): the base's (adapters are downloaded)."""
        return self.base.io

    @property
    def files(self) -> tuple[Path, ...]:
        return self.base.files + self.adapter.files

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def config(self) -> dict | None:
        return self.base.config()  # an adapter does not change the architecture

    def fingerprint(self) -> list[list]:
        return self.base.fingerprint() + self.adapter.fingerprint()

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = np.empty(info.numel, dtype=info.dtype.storage)
        return self.read_into(name, 0, out).reshape(info.shape)

    def prefetch(self, name: str, start: int, count: int) -> None:
        self.base.prefetch(name, start, count)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> AdapterCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the merged weights -----------------------------------------------------------------------
    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Elements ``start:start+out.size`` of the merged tensor, raw storage of the base's dtype."""
        info = self.info(name)
        replacement = self.layout.replaced.get(name)
        if replacement is not None:  # modules_to_save, or the embedding layer saved with its LoRA
            self._read_replacement(info, replacement, start, out)
        else:
            self.base.read_into(name, start, out)
        update = self.layout.updates.get(name)
        if update is not None:
            self._add_update(info, update, start, out.reshape(-1))
        return out

    def _read_replacement(self, info: TensorInfo, key: str, start: int, out: np.ndarray) -> np.ndarray:
        src = self.adapter.info(key)
        if src.dtype.name == info.dtype.name:
            return self.adapter.read_into(key, start, out)
        raw = self.adapter.read_into(key, start, np.empty(out.size, src.dtype.storage))
        values = self.backend.decode(raw, src.dtype.name, np.empty(out.size, np.float32))
        self.backend.encode(np.ascontiguousarray(values, np.float32), info.dtype.name, out.reshape(-1))
        return out

    def _add_update(self, info: TensorInfo, update: LowRankUpdate, start: int, flat: np.ndarray) -> None:
        """flat (raw, elements start:start+len) += the update, a block of rows at a time."""
        cols = info.shape[-1] if len(info.shape) > 1 else 1
        left, right = factors(update, self._read_f32)
        dtype = info.dtype.name
        end = start + flat.size
        row = start // cols
        block = max(1, BLOCK_ELEMENTS // cols)
        while row * cols < end:
            stop = min(row + block, math.ceil(end / cols))
            delta = update_rows(update, left, right, row, stop).reshape(-1)
            lo, hi = max(start, row * cols), min(end, stop * cols)
            d = delta[lo - row * cols : hi - row * cols]
            part = flat[lo - start : hi - start]
            if dtype == "F32":
                part += d
            else:
                if update.round_first:  # embedding: delta.to(weight dtype) before the add
                    d = self.backend.decode(self.backend.encode(d, dtype, np.empty_like(part)), dtype,
                                            np.empty(d.size, np.float32))  # fmt: skip
                merged = self.backend.decode(part, dtype, np.empty(d.size, np.float32)) + d
                self.backend.encode(merged, dtype, part)
            row = stop

    def _read_f32(self, key: str) -> np.ndarray:
        info = self.adapter.info(key)
        raw = self.adapter.read(key)
        if info.dtype.name == "F32":
            return raw
        return self.backend.decode(
            raw.reshape(-1), info.dtype.name, np.empty(info.numel, np.float32)
        ).reshape(info.shape)
