"""Job writers of the kinds that place or select entries, and the engine helpers they need.

- ``scatter``: the target plus sparse patches (or dense diffs), composed in one pass
  (``compose.compose_chunk``);
- ``key_patch``: a sparse patch of tau at the positions a keyed sparsify stage chose from the base
  tensor (``Sparsify.key``: LIFT's principal weights), with ``key_selection``;
- ``pick``: every element from input 0 or input 1 by the method's ``Pick`` rules (half reset), with
  ``pair_chunks`` for the rules' reduce passes.

Each takes the engine's run (``engine._Run``: streams, workspace, writer, hashes) and one job; the
engine chooses them by ``job.kind``, never by method.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from surgery import reduce
from surgery.compose import DENSE, compose_chunk
from surgery.dtypes import DTYPES
from surgery.patch import INDICES, VALUES, PatchCursor
from surgery.plan import TensorJob
from surgery.stream import Chunk


def pair_chunks(run: Any, job: TensorJob):
    """(input 0, input 1) float32 chunks of a tensor, in index order (for ``Pick.rules``)."""
    stream = run.stream(job)
    for start, count in stream.ranges:
        dec = stream.load(start, count, None)
        yield dec[0], dec[1]


def key_selection(run: Any, job: TensorJob) -> np.ndarray | None:
    """A keyed sparsify stage's flat indices of this tensor (``reduce.key_selection``), else None."""
    sparsify = run.spec.sparsify
    if sparsify is None or sparsify.key is None:
        return None
    return reduce.key_selection(run.stream(job), job, sparsify.key, run.backend)


def key_patch(run: Any, job: TensorJob, selected: np.ndarray) -> None:
    """A patch of tau at the positions a keyed sparsify stage chose (from the base tensor)."""
    stream = run.stream(job)
    hasher = run.hasher()
    for k in range(len(stream.ranges)):
        chunk = stream.take(k)
        if hasher is not None:
            hasher.update(stream.raw0(chunk))
        lo, hi = np.searchsorted(selected, [chunk.start, chunk.start + chunk.count])
        if hi > lo:
            values = np.ascontiguousarray(chunk.tau[0, selected[lo:hi] - chunk.start])
            run.write(job.name + INDICES, int(lo), selected[lo:hi])
            run.write(job.name + VALUES, int(lo), values)
    run.finish_hash(job, hasher)


def scatter(run: Any, job: TensorJob) -> None:
    """out = b + scale * sum_i s_i p_i over the patches (and dense diffs) touching this tensor
    (``compose.compose_chunk``: float32 in patch order, one rounding; untouched entries keep b)."""
    patches = run.plan.inputs[1:]
    weights = [np.float32(w) for w in job.params.get("scales") or [1.0] * len(patches)]
    scale = np.float32(job.params["scale"])
    hasher = run.hasher()
    stream = run.stream(job)
    cursors = [
        PatchCursor(p, job.name, n, job.numel) if n > 0 else None for p, n in zip(patches, job.patch_counts)
    ]
    for start, count in stream.ranges:
        dec = stream.load(start, count, None, n_inputs=1)
        if hasher is not None:
            hasher.update(stream.raw0(Chunk(start, count, dec, None)))
        parts = [c if n != DENSE else partial(_read_f32, run, p, job.name, start, count)
                 for p, n, c in zip(patches, job.patch_counts, cursors)]  # fmt: skip
        out = run.ws.get("out", (count,), np.float32)
        np.copyto(out, dec[0])
        hit = run.ws.get("hit", (count,), np.bool_)
        compose_chunk(out, start, parts, weights, scale, run.ws.get("acc", (count,), np.float32), hit)
        run.write(job.name, start, run.encode(job, out))
    run.finish_hash(job, hasher)


def _read_f32(run: Any, ckpt, name: str, start: int, count: int) -> np.ndarray:
    """Elements start:start+count of a float tensor of ``ckpt``, decoded to float32."""
    dtype = ckpt.tensors[name].dtype.name
    out = run.ws.get("dense", (count,), np.float32)
    if dtype == "F32":
        return ckpt.read_into(name, start, out)
    raw = run.ws.get("dense_raw", (count,), DTYPES[dtype].storage)
    return run.backend.decode(ckpt.read_into(name, start, raw), dtype, out)


def pick(run: Any, job: TensorJob) -> None:
    """Each element from input 0 where the spec's rule says so, else from input 1, bit for bit
    (decode then encode in the same dtype is exact); tensors without a rule take input 1."""
    rule = run.prepared.picks.get(job.name)
    state = None if rule is None else rule.fresh()
    stream = run.stream(job)
    for start, count in stream.ranges:
        dec = stream.load(start, count, None)
        take0 = False if rule is None else rule.mask(start, count, dec[0], dec[1], run.backend, state)
        out = run.ws.get("out", (count,), np.float32)
        np.copyto(out, np.where(take0, dec[0], dec[1]))
        run.write(job.name, start, run.encode(job, out))
