"""Diff artifacts: the manifest that names the base a diff was taken from, and sparse patches.

A dense diff is a checkpoint of float32 task vectors with the base's tensor names. A sparse patch
stores, for every selected tensor ``W``, two tensors: ``W.indices`` (int64 flat indices, ascending)
and ``W.values`` (float32 ``tau`` at those indices); tensors with nothing selected are omitted. Both
carry ``surgery_diff.json``::

    {"format": "surgery-diff", "version": 1, "kind": "dense" | "patch",
     "method": "diff" | "patch", "parameters": {...},          # what selected the entries
     "base": {"source": ..., "tensors": {name: {"dtype", "shape", "hash"}}},
     "finetuned": {"source": ...},
     "tensors": {name: {"shape": [...], "kept": k}},          # patch only
     "kept": K, "total": N, "fraction": K / N}

``hash`` is a BLAKE2b-128 digest of the tensor's raw bytes, so ``apply`` can tell whether its
target is the base the diff came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.checkpoint import Checkpoint, read_json
from surgery.errors import CorruptCheckpointError, InputNotADiffError
from surgery.files import MANIFEST
from surgery.names import natural_key
from surgery.recipe import Recipe
from surgery.writer import Layout, OutputTensor, plan_layout

INDICES, VALUES = ".indices", ".values"


def patch_layout(counts: dict[str, int], max_shard_size: int) -> Layout:
    """Output tensors of a patch: indices + values for every tensor with something kept."""
    tensors = []
    for name in sorted(counts, key=natural_key):
        if counts[name] > 0:
            tensors.append(OutputTensor(name + INDICES, "I64", (counts[name],)))
            tensors.append(OutputTensor(name + VALUES, "F32", (counts[name],)))
    return plan_layout(tensors, max_shard_size)


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != "surgery-diff":
        raise CorruptCheckpointError(f"{path} is not a surgery diff manifest", path=str(path))
    return data


@dataclass(frozen=True)
class DiffSummary:
    """What a diff or patch holds: ``kept`` of ``total`` parameters, ``size_bytes`` of safetensors."""

    kind: str  # "dense" | "patch"
    kept: int
    total: int
    fraction: float
    size_bytes: int


def manifest_for(
    recipe: Recipe,
    inputs: Sequence[Checkpoint],
    jobs: Sequence,
    hashes: dict[str, str],
    counts: dict[str, int],
) -> dict:
    """surgery_diff.json of a diff (``counts`` empty) or a sparse patch (entries kept per tensor).

    ``jobs`` are the plan's merge jobs (``plan.TensorJob``; plan.py imports this module)."""
    spec = recipe.spec
    patch = spec.output == "patch"
    base, ft = inputs[0], inputs[-1]
    total = sum(j.numel for j in jobs)
    kept = sum(counts.values()) if patch else total
    data = {
        "format": "surgery-diff",
        "version": 1,
        "kind": "patch" if patch else "dense",
        "method": spec.name,
        "parameters": dict(recipe.parameters),
        "base": {
            "source": base.source,
            "tensors": {
                j.name: {"dtype": j.in_dtypes[0], "shape": list(j.shape), "hash": hashes[j.name]}
                for j in jobs
            },
        },
        "finetuned": {"source": ft.source},
        "kept": kept,
        "total": total,
        "fraction": kept / total if total else 0.0,
    }
    if patch:
        data["tensors"] = {j.name: {"shape": list(j.shape), "kept": counts.get(j.name, 0)} for j in jobs}
    return data


def target_warning(diff: Checkpoint, hashes: dict[str, str]) -> str | None:
    """Applying ``diff``: a warning when the target (whose tensors hash to ``hashes``) is not the base
    the diff was taken from, or when the diff has no manifest to tell."""
    manifest = read_manifest(diff.root)
    if manifest is None:
        return f"{diff.source} has no {MANIFEST}: cannot check that the target is its base"
    recorded = manifest.get("base", {}).get("tensors", {})
    differ = sorted(n for n, h in hashes.items() if n in recorded and recorded[n]["hash"] != h)
    if not differ:
        return None
    return (
        f"the target differs from the base this diff was taken from ({manifest['base'].get('source')}) "
        f"in {len(differ)} of {len(hashes)} tensors, e.g. {differ[0]}: the result is a transfer, not a "
        "reconstruction"
    )


def diff_kind(ckpt: Checkpoint, raw_diff: bool = False) -> str:
    """ "dense" or "patch" for what ``surgery diff`` wrote; anything else is refused (a full model
    applied as a diff would silently add the whole model to the target), unless ``raw_diff`` says
    that a folder without a manifest is a hand-made dense diff."""
    if read_manifest(ckpt.root) is not None or raw_diff or is_patch(ckpt):
        return "patch" if is_patch(ckpt) else "dense"
    looks = "a full model" if ckpt.config() is not None else "a model, not a diff"
    raise InputNotADiffError(
        f"{ckpt.source} has no {MANIFEST}: it looks like {looks}, not something `surgery diff` wrote",
        hint=f"take the diff first: `surgery diff BASE {ckpt.source} -o DIFF`, then "
        "`surgery apply DIFF --to NEW_BASE` (or in one step: `surgery transfer`); pass --raw-diff if "
        "it really is a hand-made dense diff",
        path=ckpt.source,
    )


def is_patch(ckpt: Checkpoint) -> bool:
    manifest = read_manifest(ckpt.root)
    if manifest is not None:
        return manifest.get("kind") == "patch"
    return bool(ckpt.tensors) and all(n.endswith((INDICES, VALUES)) for n in ckpt.tensors)


def patched_names(ckpt: Checkpoint) -> dict[str, int]:
    """Tensor name -> number of patch entries, checking that indices and values pair up."""
    out: dict[str, int] = {}
    for name, info in ckpt.tensors.items():
        if not name.endswith(INDICES):
            continue
        target = name[: -len(INDICES)]
        values = ckpt.tensors.get(target + VALUES)
        if values is None or info.dtype.name != "I64" or values.dtype.name != "F32":
            raise CorruptCheckpointError(
                f"patch {ckpt.source}: {name} needs a float32 {target + VALUES} beside it (int64 indices)",
                path=str(ckpt.root),
                tensor=name,
            )
        if info.shape != values.shape or len(info.shape) != 1:
            raise CorruptCheckpointError(
                f"patch {ckpt.source}: {name} and {target + VALUES} have different shapes",
                path=str(ckpt.root),
                tensor=name,
            )
        out[target] = info.shape[0]
    return out


class PatchCursor:
    """Streams one tensor's (indices, values) in index order, in bounded blocks.

    ``take(end)`` returns every entry with index < end not yet returned; indices must ascend.
    """

    BLOCK = 1 << 20

    def __init__(self, patch: Checkpoint, name: str, count: int, numel: int) -> None:
        self.patch, self.name, self.count, self.numel = patch, name, count, numel
        self.pos = 0  # entries consumed from the file
        self.idx = np.empty(0, np.int64)
        self.val = np.empty(0, np.float32)
        self.last = -1

    def _refill(self) -> None:
        n = min(self.BLOCK, self.count - self.pos)
        idx = self.patch.read_into(self.name + INDICES, self.pos, np.empty(n, np.int64))
        val = self.patch.read_into(self.name + VALUES, self.pos, np.empty(n, np.float32))
        if n and (np.any(np.diff(idx) <= 0) or idx[0] <= self.last or idx[-1] >= self.numel or idx[0] < 0):
            raise CorruptCheckpointError(
                f"patch {self.patch.source}: indices of {self.name!r} are not strictly ascending "
                f"within 0..{self.numel - 1}",
                hint="the patch does not belong to this model or is corrupt",
                tensor=self.name,
            )
        if n:
            self.last = int(idx[-1])
        self.pos += n
        self.idx = np.concatenate([self.idx, idx])
        self.val = np.concatenate([self.val, val])

    def take(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        while self.pos < self.count and (self.idx.size == 0 or self.idx[-1] < end):
            self._refill()
        cut = int(np.searchsorted(self.idx, end))
        idx, val = self.idx[:cut], self.val[:cut]
        self.idx, self.val = self.idx[cut:], self.val[cut:]
        return idx, val
