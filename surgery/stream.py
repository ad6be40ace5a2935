"""A tensor as a stream of chunks: the same element range of every input, decoded to float32.

Two sizes. A *chunk* is what the kernels compute on: at most ``COMPUTE_CHUNK`` elements (whole rows
when a stage works per row or rows are gathered by a vocabulary map; the whole tensor when the combine
needs whole matrices), so the decoded inputs, task vectors and output of a chunk stay in the CPU's
cache while one kernel after another walks them (a 2^24-element chunk ran the same kernels ~10x slower
per element than a 2^20 one on the 2-core VM). A *span* is what is read from disk: consecutive chunks
whose raw input bytes fill the rest of the worker's share of the memory budget, read with one large
positional read per input and kept while its chunks are decoded, so a method with several passes over
a tensor that fits one span reads it from disk once. ``TensorStream.read(k)`` returns chunk ``k`` with
its task vectors. Buffers come from the worker's ``Workspace``, allocated once and reused, so
streaming costs no fresh memory per chunk.

The workspace also decides where a chunk's arrays live. The host ``Workspace`` keeps everything in
numpy arrays (its upload and download are no-ops). A backend's device workspace
(``surgery.kernels.resident``) reads into pinned host staging buffers and keeps the decoded inputs,
task vectors and output on its device; the stream and the engine call the same methods either way.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    """A worker's reusable host buffers: allocated once, grown only when a job needs more.

    ``get`` gives a host buffer; the other methods are the interface a device workspace shares
    (``surgery.kernels.resident.DeviceWorkspace``), here without any copy: compute ``array``s are
    host buffers, ``upload``/``download`` hand the same array back."""

    resident = False  # chunks live in numpy arrays

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        # what the span buffers hold: (stream, start, count, inputs); streams of one worker share them
        self.held: tuple | None = None

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[key] = np.empty(max(nbytes, 64), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def array(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A buffer the kernels compute in (here: the host buffer ``key``)."""
        return self.get(key, shape, dtype)

    def staging(self, key: str, shape: tuple[int, ...], dtype, alias: np.ndarray | None = None) -> np.ndarray:
        """The host buffer raw input bytes are read into before ``upload``; ``alias``: the compute
        row itself (an F32 input is read straight into it here)."""
        return alias if alias is not None else self.get(key, shape, dtype)

    def upload(self, raw: np.ndarray, dest: np.ndarray | None = None) -> np.ndarray:
        """``raw`` as a compute array (copied into ``dest`` when given and not ``raw`` itself)."""
        if dest is None:
            return raw
        if not np.may_share_memory(raw, dest):
            np.copyto(dest, raw)
        return dest

    def download(self, x: np.ndarray, key: str) -> np.ndarray:
        """A compute array's bytes in a host buffer, ready for the writer."""
        return x

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def asarray(self, a: np.ndarray) -> np.ndarray:
        """A small host array (per-tensor factors) where the compute arrays live."""
        return a

    def counts(self, shape: tuple[int, ...]) -> np.ndarray:
        """A zeroed int64 accumulator (radix-select histograms) where the compute arrays live."""
        return np.zeros(shape, np.int64)

    def activate(self) -> contextlib.AbstractContextManager:
        """Context for one unit of a worker's work (a device workspace selects its streams)."""
        return contextlib.nullcontext()


class WorkerSpaces(threading.local):
    """Each worker thread's workspaces: ``host``, and ``device`` from the backend's factory (None
    when it has none). Attributes are per thread; ``run`` does one unit of a worker's work inside
    the device workspace's context (its CUDA stream)."""

    def __init__(self, device_factory: Callable[[], Any] | None) -> None:
        self.host = Workspace()
        self.device = device_factory() if device_factory is not None else None

    def run(self, fn: Callable, item: Any) -> Any:
        if self.device is None:
            return fn(item)
        with self.device.activate():
            return fn(item)


COMPUTE_CHUNK = 1 << 20  # elements per kernel call: 4 MiB per float32 row, cache-sized


def bytes_per_element(job: TensorJob, n_models: int) -> int:
    """Working memory per element of a chunk: decoded inputs, raw reads (F32 is read straight into
    the decoded row), task vectors, output."""
    raw = sum(DTYPES[d].itemsize for d in job.in_dtypes if d != "F32")
    return compute_bytes_per_element(job, n_models) + raw


def compute_bytes_per_element(job: TensorJob, n_models: int) -> int:
    """Per element of a chunk: decoded inputs, task vectors, output (float32 and storage)."""
    return 4 * len(job.in_dtypes) + 4 * n_models + 4 + DTYPES[job.out_dtype].itemsize


def raw_bytes_per_element(job: TensorJob) -> int:
    """Per element of a span: the raw bytes of every input."""
    return sum(DTYPES[d].itemsize for d in job.in_dtypes)


def span_ranges(
    job: TensorJob, share: int, n_models: int, ranges: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(start, count) of every span: consecutive chunks of ``ranges`` whose raw bytes fit what is
    left of ``share`` after the buffers of one chunk (at least one chunk per span)."""
    largest = max(c for _, c in ranges)
    room = (share - largest * compute_bytes_per_element(job, n_models)) // raw_bytes_per_element(job)
    spans: list[tuple[int, int]] = []
    for start, count in ranges:
        if spans and spans[-1][1] + count <= room:
            spans[-1] = (spans[-1][0], spans[-1][1] + count)
        else:
            spans.append((start, count))
    return spans


def hint_start(job: TensorJob, inputs: Sequence[Checkpoint], share: int) -> None:
    """Ask the disk now for the start of ``job`` in every input: as many elements as a worker's span
    holds (or the whole tensor). A worker moving on to this tensor then finds it read or being read;
    a hint holds no memory of ours (it fills the page cache). Only for jobs that read one range of
    the same tensor in every input ("dense", "update"), not through a vocabulary map."""
    if job.kind not in ("dense", "update") or job.row_map is not None:
        return
    count = min(max(1, job.numel), max(1, share // raw_bytes_per_element(job)))
    for i, ckpt in enumerate(inputs[: len(job.in_dtypes)]):  # as ``TensorStream.load`` reads them
        ckpt.prefetch(job.source(i), 0, count)


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
    chunk = min(COMPUTE_CHUNK, max(min_chunk, share // per))
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
    task vectors ``tau`` [T, count] (None when the method does not use them); numpy arrays, or
    device tensors when the stream's workspace is resident."""

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
        spans: list[tuple[int, int]] | None = None,
    ) -> None:
        self.job, self.inputs, self.backend, self.ws = job, inputs, backend, workspace
        self.ranges, self.tau_from, self.n_models = ranges, tau_from, n_models
        self.check_stop = check_stop
        self._cached: tuple[int, Chunk] | None = None
        # without spans (a vocabulary row map, a device workspace, or a caller that does not give
        # them) every chunk is read on its own
        self.spans = spans if spans is not None and job.row_map is None and not workspace.resident else None
        self._raw0: np.ndarray | None = None  # host bytes of input 0 of the last chunk loaded
        self._means: dict[int, np.ndarray] = {}  # padding rows' mean per input (vocabulary maps)
        self._cpu: Backend | None = None  # host decoder for those rows (the backend may be a device's)

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
        nxt = self.ranges[k + 1] if k + 1 < len(self.ranges) and self.spans is None else None
        dec = self.load(start, count, nxt)
        tau = None
        if self.tau_from is not None:
            tau = self.ws.array("tau", (self.n_models, count), np.float32)
            self.tau_from.compute(self.backend, dec, tau)
        return Chunk(start, count, dec, tau)

    def load(self, start: int, count: int, ranges_next: tuple | None = None, n_inputs: int | None = None):
        """Decoded float32 inputs [n_inputs, count] for elements start:start+count (the first
        ``n_inputs`` inputs only, when given)."""
        job = self.job
        n_in = len(job.in_dtypes) if n_inputs is None else n_inputs
        dec = self.ws.array("dec", (n_in, count), np.float32)
        if job.row_map is not None:
            return self._load_rows(start, count, dec)
        span = self._hold_span(start, count, n_in)
        if span is not None:
            for i, dtype in enumerate(job.in_dtypes[:n_in]):
                raw = self._span_raw(i, span)[start - span[0] : start - span[0] + count]
                if i == 0:
                    self._raw0 = raw
                self._decode(i, raw, dtype, dec)
            return dec
        for i, (ckpt, dtype) in enumerate(zip(self.inputs[:n_in], job.in_dtypes[:n_in])):
            self.check_stop()
            source = job.source(i)
            raw = self._staging(i, count, dtype, dec)
            ckpt.read_into(source, start, raw)
            self._decode(i, raw, dtype, dec)
            if ranges_next is not None:
                ckpt.prefetch(source, *ranges_next)
        return dec

    def _hold_span(self, start: int, count: int, n_in: int) -> tuple[int, int] | None:
        """The span holding elements start:start+count, read (its first ``n_in`` inputs at least)
        unless held already; None when no span holds the whole range (it is then read directly)."""
        if self.spans is None:
            return None
        held = self._held()
        if held is not None and held[0] <= start and start + count <= held[0] + held[1] and held[2] >= n_in:
            return held[:2]
        j = next((j for j, (s, c) in enumerate(self.spans) if s <= start < s + c), None)
        if j is None or start + count > self.spans[j][0] + self.spans[j][1]:
            return None
        span = self.spans[j]
        self.ws.held = None  # a read that fails leaves nothing half-held
        for i in range(n_in):
            self.check_stop()
            self.inputs[i].read_into(self.job.source(i), span[0], self._span_raw(i, span))
            if j + 1 < len(self.spans):  # the disk reads ahead while this span is computed
                self.inputs[i].prefetch(self.job.source(i), *self.spans[j + 1])
        self.ws.held = (self, *span, n_in)
        return span

    def _held(self) -> tuple[int, int, int] | None:
        """(start, count, inputs) of the span this stream holds in the workspace, if any."""
        held = self.ws.held
        return held[1:] if held is not None and held[0] is self else None

    def _span_raw(self, i: int, span: tuple[int, int]) -> np.ndarray:
        return self.ws.get(f"span{i}", (span[1],), DTYPES[self.job.in_dtypes[i]].storage)

    def _staging(self, i: int, count: int, dtype: str, dec) -> np.ndarray:
        """Host buffer input ``i``'s raw bytes are read into (on the host path an F32 input is read
        straight into its decoded row)."""
        alias = dec[i] if dtype == "F32" and not self.ws.resident else None
        raw = self.ws.staging(f"raw{i}", (count,), DTYPES[dtype].storage, alias)
        if i == 0:
            self._raw0 = raw
        return raw

    def _decode(self, i: int, raw: np.ndarray, dtype: str, dec) -> None:
        """Raw bytes of input ``i`` -> float32 row ``dec[i]`` (one upload where the rows live)."""
        if dtype == "F32":
            self.ws.upload(raw, dec[i])
        else:
            self.backend.decode(self.ws.upload(raw), dtype, dec[i])

    def _load_rows(self, start: int, count: int, dec: np.ndarray) -> np.ndarray:
        """Gather whole rows by the vocabulary row map into each input's staging buffer (one read per
        run of consecutive source rows; -1 reads as zeros), decode once, then write the rows the map
        computes: fills (a mean of other inputs' rows) and padding rows (the input's mean row), made
        on the host and handed to wherever the chunk lives."""
        job = self.job
        cols, row_map = job.cols, job.row_map
        r0, n_rows = start // cols, count // cols
        end = n_rows if row_map.mean_from is None else max(0, min(n_rows, row_map.mean_from - r0))
        for i, dtype in enumerate(job.in_dtypes[: dec.shape[0]]):
            self.check_stop()
            raw = self._staging(i, count, dtype, dec)
            self._read_runs(i, r0, end, raw)
            raw[end * cols :] = 0
            self._decode(i, raw, dtype, dec)
            src = row_map.rows[r0 : r0 + end, i]
            for j in np.flatnonzero(src < 0):
                fill = row_map.fills.get(r0 + int(j))
                if fill:
                    dec[i, j * cols : (j + 1) * cols] = self.ws.asarray(self._fill_row(fill))
            if end < n_rows:
                mean = self.ws.asarray(self._mean_row(i))
                for j in range(end, n_rows):
                    dec[i, j * cols : (j + 1) * cols] = mean
        return dec

    def _read_runs(self, i: int, r0: int, n: int, raw: np.ndarray) -> None:
        """Raw rows ``r0 .. r0+n-1`` of input ``i`` as the map places them (zeros where it has none)."""
        job = self.job
        cols = job.cols
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

    def _host_rows(self, i: int, r0: int, n: int) -> np.ndarray:
        """Aligned rows ``r0 .. r0+n-1`` of input ``i`` as float32 on the host, fills included."""
        job = self.job
        cols, dtype = job.cols, job.in_dtypes[i]
        raw = np.empty(n * cols, DTYPES[dtype].storage)
        self._read_runs(i, r0, n, raw)
        rows = self._host_f32(raw, dtype)
        for j in np.flatnonzero(job.row_map.rows[r0 : r0 + n, i] < 0):
            fill = job.row_map.fills.get(r0 + int(j))
            if fill:
                rows[j * cols : (j + 1) * cols] = self._fill_row(fill)
        return rows

    def _fill_row(self, fill: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The float32 mean of rows (input, row), summed in order and divided once (mergekit's
        running sum)."""
        job = self.job
        out = np.zeros(job.cols, np.float32)
        for k, row in fill:
            raw = np.empty(job.cols, DTYPES[job.in_dtypes[k]].storage)
            self.inputs[k].read_into(job.source(k), row * job.cols, raw)
            out += self._host_f32(raw, job.in_dtypes[k])
        return out / np.float32(len(fill))

    def _host_f32(self, raw: np.ndarray, dtype: str) -> np.ndarray:
        """Raw storage -> a new float32 host array, with the CPU kernels' decoder: rows a vocabulary
        map computes are made on the host whatever the backend."""
        if dtype == "F32":
            return raw.copy()
        if self._cpu is None:
            from surgery.kernels import get_backend

            self._cpu = get_backend("cpu")
        return self._cpu.decode(raw, dtype, np.empty(raw.size, np.float32))

    def _mean_row(self, i: int) -> np.ndarray:
        """Input ``i``'s mean over its aligned rows 0..mean_from-1 (padding rows), once per stream:
        float64 sums of fixed blocks of rows, so the value does not depend on the chunking."""
        if i not in self._means:
            cols, n = self.job.cols, self.job.row_map.mean_from
            total = np.zeros(cols, np.float64)
            for r in range(0, n, _MEAN_BLOCK):
                self.check_stop()
                b = min(_MEAN_BLOCK, n - r)
                total += self._host_rows(i, r, b).reshape(b, cols).sum(axis=0, dtype=np.float64)
            self._means[i] = (total / n).astype(np.float32)
        return self._means[i]

    def raw0(self, chunk: Chunk) -> np.ndarray:
        """Raw bytes (host) of input 0 for the chunk just loaded."""
        assert self._raw0 is not None and self._raw0.size == chunk.count
        return self._raw0

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
