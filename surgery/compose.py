"""Composing sparse patches (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer", ACL 2022, arXiv 2110.07560): theta = b + phi_1 + phi_2 + ..., overlapping entries added.

The engine applies the patches in one pass (``apply_patch`` with several models). This module holds
what is decided from the patch files alone, before any weight is read:

- which tensors and positions each input touches (``touched``): a sparse patch its ``.indices``,
  a dense diff every position of its float tensors;
- the pairwise overlap table (``overlaps``): how many (tensor, position) pairs two inputs share;
- whether the inputs were taken from one base (``base_conflicts``): the BLAKE2b hashes of the base
  tensors recorded in each manifest must agree on the tensors the inputs share;
- one output chunk (``compose_chunk``), for the engine's scatter writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from surgery.checkpoint import Checkpoint
from surgery.patch import PatchCursor, is_patch, patched_names, read_manifest

DENSE = -1  # TensorJob.patch_counts entry of a dense diff: every element of the tensor


def touched(ckpt: Checkpoint) -> dict[str, int]:
    """Tensor name -> entries this input holds (``DENSE`` for a dense diff's float tensors)."""
    if is_patch(ckpt):
        return patched_names(ckpt)
    return {name: DENSE for name, info in ckpt.tensors.items() if info.dtype.kind == "float"}


@dataclass(frozen=True)
class Overlaps:
    """``entries[i]``: positions input i touches; ``shared[i][j]``: positions inputs i and j both touch."""

    sources: tuple[str, ...]
    entries: tuple[int, ...]
    shared: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "entries": list(self.entries),
                "shared": [list(row) for row in self.shared]}  # fmt: skip


def overlaps(inputs: list[Checkpoint], window: int = 1 << 22) -> Overlaps:
    """Exact pairwise overlap counts, reading only the patches' indices, ``window`` positions of a
    tensor at a time (memory stays bounded whatever the patches' sizes)."""
    maps = [touched(c) for c in inputs]
    n = len(inputs)
    shared = np.zeros((n, n), np.int64)
    for name in sorted(set().union(*maps)):
        holders = [i for i in range(n) if name in maps[i]]
        dense = [i for i in holders if maps[i][name] == DENSE]
        sparse = [i for i in holders if maps[i][name] != DENSE]
        for a in holders:  # a dense diff holds every position: it shares all of the other's entries
            for b in holders:
                if a in dense or b in dense:
                    both_dense = a in dense and b in dense
                    shared[a, b] += (
                        inputs[a].tensors[name].numel if both_dense else maps[b if a in dense else a][name]
                    )
        cursors = {i: PatchCursor(inputs[i], name, maps[i][name], 2**62) for i in sparse}
        end = 0
        while any(c.pos < c.count or c.idx.size for c in cursors.values()):
            end += window
            taken = {i: c.take(end)[0] for i, c in cursors.items()}
            for x, a in enumerate(sparse):
                shared[a, a] += taken[a].size
                for b in sparse[x + 1 :]:
                    common = np.intersect1d(taken[a], taken[b], assume_unique=True).size
                    shared[a, b] += common
                    shared[b, a] += common
    return Overlaps(
        tuple(c.source for c in inputs),
        tuple(int(shared[i, i]) for i in range(n)),
        tuple(tuple(int(v) for v in row) for row in shared),
    )


def base_conflicts(inputs: list[Checkpoint]) -> list[str]:
    """Messages for every pair of inputs whose manifests record different base tensors (by hash)."""
    recorded = []
    for ckpt in inputs:
        manifest = read_manifest(ckpt.root) or {}
        base = manifest.get("base", {})
        recorded.append((base.get("source"), base.get("tensors", {})))
    problems = []
    for i in range(len(inputs)):
        for j in range(i + 1, len(inputs)):
            (src_i, ti), (src_j, tj) = recorded[i], recorded[j]
            differ = sorted(n for n in set(ti) & set(tj) if ti[n].get("hash") != tj[n].get("hash"))
            if differ:
                problems.append(
                    f"{inputs[i].source} was taken from base {src_i} and {inputs[j].source} from "
                    f"{src_j}: {len(differ)} base tensors differ, e.g. {differ[0]}"
                )
    return problems


def compose_chunk(out: np.ndarray, start: int, parts: Sequence, weights: Sequence, scale: np.float32,
                  acc: np.ndarray, hit: np.ndarray) -> None:  # fmt: skip
    """``out`` holds b for elements start..start+count-1 of one tensor; make it
    b + scale * sum_i w_i p_i where some input touches, leaving b's bits elsewhere. ``parts[i]`` is
    input i's ``PatchCursor``, a callable returning its dense diff's float32 chunk, or None (the
    input does not touch this tensor). ``acc`` and ``hit`` are scratch buffers of the chunk's size."""
    acc.fill(0.0)
    hit.fill(False)
    for part, w in zip(parts, weights):  # float32 sums in input order
        if isinstance(part, PatchCursor):
            idx, val = part.take(start + out.size)
            local = idx - start
            acc[local] += w * val
            hit[local] = True
        elif part is not None:
            acc += w * part()
            hit.fill(True)
    out[hit] = out[hit] + scale * acc[hit]
