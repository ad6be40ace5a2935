"""A tensor as a stream of chunks: the same element range of every input, decoded to float32.

A chunk holds as many elements as fit one worker's share of the memory budget (whole rows when a
stage works per row or rows are gathered by a vocabulary map; the whole tensor when the combine needs
whole matrices). ``TensorStream.read(k)`` returns chunk ``k`` with its task vectors; a tensor that
fits in one chunk is read once for all its passes. Buffers come from the worker's ``Workspace``,
allocated once and reused, so streaming costs no fresh memory per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from surgery.checkpoint import Checkpoint
from surgery.dtypes import DTYPES
from surgery.errors import RecipeError
from surgery.kernels import Backend
from surgery.methods.spec import TauFrom
from surgery.plan import TensorJob
from surgery.vocab import CARRY

_MEAN_BLOCK = 1024  # rows summed at once for a padding row's mean


class Workspace:
    """A worker's reusable buffers: allocated once, grown only when a job needs more."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[key] = np.empty(max(nbytes, 64), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


def bytes_per_element(job: TensorJob, n_models: int) -> int:
    """Working memory per element of a chunk: decoded inputs, raw reads, task vectors, output."""
    n_in = len(job.in_dtypes)
    raw = sum(DTYPES[d].itemsize for d in job.in_dtypes if d != "F32")
    out = 4 + DTYPES[job.out_dtype].itemsize
    return 4 * n_in + raw + 4 * n_models + out


def chunk_ranges(
    job: TensorJob, share: int, n_models: int, whole_rows: bool, min_chunk: int = 1, whole: bool = False
) -> list[tuple[int, int]]:
    """(start, count) of every chunk: as many elements as fit ``share`` bytes; whole rows when
    ``whole_rows``; one chunk holding the whole tensor when ``whole`` (an error if it does not fit)."""
    n = max(1, job.numel)
    per = bytes_per_element(job, n_models)
    if whole:
        if n * per > share:
            need = n * per
            raise RecipeError(
                f"tensor {job.name!r} {list(job.shape)} needs its whole matrix from every input at once: "
                f"{_size(need)} of working memory, more than one worker's share of the budget "
                f"({_size(share)})",
                hint=f"raise --max-memory to at least {_size(need)} times the number of --threads, or use "
                "fewer --threads",
                tensor=job.name,
            )
        return [(0, job.numel)]
    chunk = max(min_chunk, share // per)
    if whole_rows or job.row_map is not None:
        cols = job.cols
        chunk = max(cols, chunk // cols * cols)
    chunk = min(n, chunk)
    return [(s, min(chunk, job.numel - s)) for s in range(0, job.numel, chunk)]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{math.ceil(n / scale * 10) / 10:g}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class Chunk:
    """Elements ``start:start+count`` of one tensor, decoded: ``inputs`` [n_inputs, count] and the
    task vectors ``tau`` [T, count] (None when the method does not use them)."""

    start: int
    count: int
    inputs: np.ndarray
    tau: np.ndarray | None


class TensorStream:
    """Chunks of one job across its inputs, read by positional reads into reused buffers."""

    def __init__(
        self,
        job: TensorJob,
        inputs: Sequence[Checkpoint],
        backend: Backend,
        workspace: Workspace,
        ranges: list[tuple[int, int]],
        tau_from: TauFrom | None,
        n_models: int,
        check_stop: Callable[[], None],
    ) -> None:
        self.job, self.inputs, self.backend, self.ws = job, inputs, backend, workspace
        self.ranges, self.tau_from, self.n_models = ranges, tau_from, n_models
        self.check_stop = check_stop
        self._cached: tuple[int, Chunk] | None = None
        self._means: dict[int, np.ndarray] = {}  # padding rows' mean per input (vocabulary maps)

    def read(self, k: int) -> Chunk:
        """Chunk ``k``, kept for the next pass while the tensor is one chunk: do not modify it."""
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        chunk = self._read(k)
        self._cached = (k, chunk)
        return chunk

    def take(self, k: int) -> Chunk:
        """Chunk ``k`` for the caller to modify in place (a sparsify stage masks tau)."""
        chunk = self.read(k)
        self._cached = None
        return chunk

    def _read(self, k: int) -> Chunk:
        start, count = self.ranges[k]
        nxt = self.ranges[k + 1] if k + 1 < len(self.ranges) else None
        dec = self.load(start, count, nxt)
        tau = None
        if self.tau_from is not None:
            tau = self.ws.get("tau", (self.n_models, count), np.float32)
            self.tau_from.compute(self.backend, dec, tau)
        return Chunk(start, count, dec, tau)

    def load(self, start: int, count: int, ranges_next: tuple | None = None, n_inputs: int | None = None):
        """Decoded float32 inputs [n_inputs, count] for elements start:start+count (the first
        ``n_inputs`` inputs only, when given)."""
        job = self.job
        n_in = len(job.in_dtypes) if n_inputs is None else n_inputs
        dec = self.ws.get("dec", (n_in, count), np.float32)
        if job.row_map is not None:
            return self._load_rows(start, count, dec)
        for i, (ckpt, dtype) in enumerate(zip(self.inputs[:n_in], job.in_dtypes[:n_in])):
            self.check_stop()
            source = job.source(i)
            if dtype == "F32":
                ckpt.read_into(source, start, dec[i])
            else:
                raw = self.ws.get(f"raw{i}", (count,), DTYPES[dtype].storage)
                ckpt.read_into(source, start, raw)
                self.backend.decode(raw, dtype, dec[i])
            if ranges_next is not None:
                ckpt.prefetch(source, *ranges_next)
        return dec

    def _load_rows(self, start: int, count: int, dec: np.ndarray) -> np.ndarray:
        """Gather whole rows by the vocabulary row map: -1 reads as zeros, or as the row's fill (a
        mean of other inputs' rows); padding rows (from ``mean_from``) as the input's mean row."""
        cols, row_map = self.job.cols, self.job.row_map
        r0, n_rows = start // cols, count // cols
        end = n_rows if row_map.mean_from is None else max(0, min(n_rows, row_map.mean_from - r0))
        for i in range(dec.shape[0]):
            self.check_stop()
            self._gather(i, r0, end, dec[i, : end * cols])
            for j in range(end, n_rows):
                dec[i, j * cols : (j + 1) * cols] = self._mean_row(i)
        return dec

    def _gather(self, i: int, r0: int, n: int, out: np.ndarray) -> None:
        """Aligned rows ``r0 .. r0+n-1`` (before ``mean_from``) of input ``i``, float32, into ``out``:
        one read per run of consecutive source rows, one decode, then the filled rows."""
        job = self.job
        cols, dtype = job.cols, job.in_dtypes[i]
        raw = out if dtype == "F32" else self.ws.get(f"raw{i}", (n * cols,), DTYPES[dtype].storage)
        src = job.row_map.rows[r0 : r0 + n, i]
        j = 0
        while j < n:
            if src[j] < 0:
                raw[j * cols : (j + 1) * cols] = 0
                j += 1
                continue
            k = j + 1
            while k < n and src[k] == src[k - 1] + 1:
                k += 1
            self.inputs[i].read_into(job.source(i), int(src[j]) * cols, raw[j * cols : k * cols])
            j = k
        if dtype != "F32":
            self.backend.decode(raw, dtype, out)
        for j in np.flatnonzero(src < 0):  # after the decode: a fill is float32 already
            fill = job.row_map.fills.get(r0 + int(j), ())
            if fill:
                self._fill_row(fill, out[j * cols : (j + 1) * cols])

    def _fill_row(self, fill: tuple[tuple[int, int], ...], out: np.ndarray) -> None:
        """The float32 mean of rows (input, row), summed in order and divided once (mergekit's
        running sum), into ``out``."""
        job = self.job
        part = self.ws.get("fill", (job.cols,), np.float32)
        out[:] = 0
        for k, row in fill:
            dtype = job.in_dtypes[k]
            raw = part if dtype == "F32" else self.ws.get("fill_raw", (job.cols,), DTYPES[dtype].storage)
            self.inputs[k].read_into(job.source(k), row * job.cols, raw)
            if dtype != "F32":
                self.backend.decode(raw, dtype, part)
            out += part
        out /= np.float32(len(fill))

    def _mean_row(self, i: int) -> np.ndarray:
        """Input ``i``'s mean over its aligned rows 0..mean_from-1 (padding rows), once per stream:
        float64 sums of fixed blocks of rows, so the value does not depend on the chunking."""
        if i not in self._means:
            cols, n = self.job.cols, self.job.row_map.mean_from
            total = np.zeros(cols, np.float64)
            for r in range(0, n, _MEAN_BLOCK):
                self.check_stop()
                b = min(_MEAN_BLOCK, n - r)
                block = self.ws.get("mean_block", (b * cols,), np.float32)
                self._gather(i, r, b, block)
                total += block.reshape(b, cols).sum(axis=0, dtype=np.float64)
            self._means[i] = (total / n).astype(np.float32)
        return self._means[i]

    def raw0(self, chunk: Chunk) -> np.ndarray:
        """Raw bytes of input 0 for the chunk just loaded (F32 is read straight into ``inputs``)."""
        if self.job.in_dtypes[0] == "F32":
            return chunk.inputs[0]
        return self.ws.get("raw0", (chunk.count,), DTYPES[self.job.in_dtypes[0]].storage)

    def fix_rows(self, chunk: Chunk, out: np.ndarray) -> None:
        """Rows carried over from the fine-tune, or kept from the new base, bypass the arithmetic."""
        job = self.job
        if job.row_map is None:
            return
        cols = job.cols
        r0 = chunk.start // cols
        modes = job.row_map.mode[r0 : r0 + chunk.count // cols]
        for j in np.flatnonzero(modes):
            src = 2 if modes[j] == CARRY else 0
            out[j * cols : (j + 1) * cols] = chunk.inputs[src, j * cols : (j + 1) * cols]
