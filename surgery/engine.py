"""The streaming engine: runs a plan tensor by tensor, chunk by chunk, under a memory budget.

Orchestration only. A tensor is a stream of chunks (``stream.py``) sized so that every buffer a
worker needs fits its share of ``max_memory``. Whole-model statistics come first from the reduce
passes (``reduce.py``: global rank bands, LiNeS' auto alpha, patch sizes) and are frozen into
``Prepared``; then every job runs its writer, chosen by ``job.kind`` (resolved by the planner), and
the method's stages (``spec.sparsify``, ``spec.combine``) compute each output chunk. The engine never
learns a method by name. Where the backend offers a device workspace and every stage of the method
runs on backend kernels only (``spec.on_device``), merged tensors stream through it: a chunk's arrays
stay on the device from the raw inputs' upload to the encoded output's download.
Workers run whole tensors in parallel threads; the kernels, reads and writes
release the GIL, so reading, computing and writing overlap across tensors. Every result is a pure
function of the inputs and the recipe: chunk size, budget and thread count never change a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from surgery import reduce
from surgery.card import card_for
from surgery.dtypes import DTYPES
from surgery.errors import IncompatibleTensorsError, Interrupted
from surgery.files import CARD, MANIFEST, RECIPE
from surgery.finite_check import nonfinite_from_finite, raise_nonfinite
from surgery.kernels import Backend, check_device, get_backend
from surgery.methods.lines import LinesResolved
from surgery.methods.spec import Operands, Slice
from surgery.output import open_output
from surgery.patch import (
    INDICES,
    VALUES,
    DiffSummary,
    manifest_for,
    patch_layout,
    target_warning,
)
from surgery.plan import MERGED, Plan, TensorJob, build_plan, input_paths
from surgery.ranks import Band, fresh
from surgery.recipe import Recipe
from surgery.select_jobs import key_patch, key_selection, pair_chunks, pick, scatter
from surgery.stream import Chunk, TensorStream, WorkerSpaces, Workspace, chunk_ranges, hint_start, span_ranges
from surgery.writer import CheckpointWriter, Layout, fingerprint_of

ENGINE_VERSION = 2  # part of the resume fingerprint: bump when output bytes could change
# 2: rescale: l1 sums element by element (a DARE L1 factor may move by one float32 ulp)

__all__ = ["ENGINE_VERSION", "EngineOptions", "Interrupted", "RunResult", "execute", "merge"]


@dataclass(frozen=True)
class EngineOptions:
    max_memory: int = 2 * 2**30  # bytes for all working buffers together
    threads: int | None = None  # default: one per CPU core
    device: str = "cpu"  # "cpu" (numba) or "cuda[:N]" (torch)
    overwrite: bool = False
    allow_nonfinite: bool = False  # write inf / NaN outputs that finite inputs produced
    min_chunk: int = 1  # elements; tests use tiny budgets, real runs never hit this

    @property
    def workers(self) -> int:
        return max(1, self.threads or os.cpu_count() or 1)


@dataclass(frozen=True)
class RunResult:
    """What a run did and settled: counts, time, warnings, the resolved LiNeS schedule, and for a
    diff or patch what it holds."""

    output: Path
    tensors: int
    resumed: int  # tensors found finished in a partial run
    bytes_written: int
    seconds: float
    warnings: tuple[str, ...] = ()
    lines: LinesResolved | None = None
    diff: DiffSummary | None = None


@dataclass(frozen=True)
class Prepared:
    """What the reduce passes settled before any output is written."""

    bands: reduce.GlobalBands | None  # granularity global: every tensor's share of the model's band
    counts: dict[str, int]  # sparse patch: entries kept per tensor
    lines: LinesResolved | None  # LiNeS with auto alpha measured; None without LiNeS
    picks: Mapping[str, Any] = field(default_factory=dict)  # output "pick": the spec's rule per tensor


# -- entry points ---------------------------------------------------------------------------------
def merge(
    recipe: Recipe,
    out: str | Path,
    options: EngineOptions | None = None,
    progress: Callable[[int, str | None], None] | None = None,
) -> RunResult:
    """Plan and run ``recipe``, writing a complete checkpoint to ``out`` (the same folder, card
    included, as the ``surgery`` command writes)."""
    plan = build_plan(recipe)
    try:
        return execute(plan, Path(out), options or EngineOptions(), progress)
    finally:
        plan.close()


def execute(
    plan: Plan,
    out: Path,
    options: EngineOptions | None = None,
    progress: Callable[[int, str | None], None] | None = None,
) -> RunResult:
    """Run a checked plan.

    ``progress(nbytes, tensor)`` is called as output bytes are written; ``tensor`` is the name of a
    tensor just completed, else None.
    """
    options = options or EngineOptions()
    start = time.perf_counter()
    check_device(options.device)  # before the output folder is touched
    with open_output(out, input_paths(plan), run_fingerprint(plan), overwrite=options.overwrite) as staged:
        run = _Run(plan, options, progress)
        prepared = run.prepare()
        layout = plan.layout or patch_layout(prepared.counts, plan.recipe.max_shard_size)
        writer = staged.writer(layout)
        resumed = len(writer.done)
        if progress and resumed:
            progress(sum(layout.tensors[n].nbytes for n in writer.done), None)
        hashes = run.run(prepared, writer)
        side, warnings, diff = _side_files(plan, prepared, hashes, layout)
        writer.finalize(side)
    seconds = time.perf_counter() - start
    return RunResult(
        out, len(plan.jobs), resumed, layout.total_bytes, seconds, warnings, prepared.lines, diff
    )


def run_fingerprint(plan: Plan) -> str:
    """The layout is a pure function of recipe and inputs, so they alone identify a partial run."""
    inputs = [c.fingerprint() for c in plan.inputs]
    return fingerprint_of({"engine": ENGINE_VERSION, "recipe": plan.recipe.to_dict(), "inputs": inputs})


def _side_files(
    plan: Plan, prepared: Prepared, hashes: dict[str, str], layout: Layout
) -> tuple[dict[str, bytes], tuple[str, ...], DiffSummary | None]:
    """Files written beside the weights (config, tokenizer, recipe, manifest, card), the run's
    warnings, and what a diff holds."""
    side = plan.side_files()
    side[RECIPE] = plan.recipe.to_yaml().encode()
    spec = plan.recipe.spec
    warnings, diff = [], None
    if spec.base_hashes == "record":
        manifest = manifest_for(plan.recipe, plan.inputs, plan.merge_jobs, hashes, prepared.counts)
        side[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
        size = sum(s.size for s in layout.shards)
        diff = DiffSummary(manifest["kind"], manifest["kept"], manifest["total"], manifest["fraction"], size)
    elif spec.base_hashes == "check":  # every diff or patch applied (composed patches: several)
        for applied in plan.inputs[1:]:
            warning = target_warning(applied, hashes)
            if warning:
                warnings.append(warning if len(plan.inputs) == 2 else f"{applied.source}: {warning}")
    side[CARD] = card_for(plan.recipe, prepared.lines).encode()
    return side, tuple(warnings), diff


def with_prepared_params(plan: Plan) -> Plan:
    """Run the method's one-off preparation (a calibration pass) and add its parameters to every job."""
    prepare = plan.recipe.spec.prepare
    if prepare is None:
        return plan
    extra = prepare(plan.recipe)
    return replace(plan, jobs=[replace(j, params={**j.params, **extra}) for j in plan.jobs])


# -- one run ---------------------------------------------------------------------------------------
class _Run:
    """Orchestration state of one run: options, backend, the stop flag and lock shared by the
    worker threads, each thread's workspace, and (while jobs run) the writer and prepared values."""

    def __init__(
        self, plan: Plan, options: EngineOptions, progress: Callable[[int, str | None], None] | None
    ) -> None:
        self.plan = plan
        self.spec = plan.recipe.spec
        self.options = options
        self.progress = progress
        self.backend: Backend = get_backend(options.device)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.spaces = WorkerSpaces(self.backend.workspace)  # per thread
        self.workers = options.workers
        self.share = max(1, options.max_memory // self.workers)
        self.n_models = self.spec.tau_from.task_vectors(len(plan.recipe.models))
        self.lines = plan.recipe.lines
        self.hash_base = self.spec.base_hashes is not None
        self.writer: CheckpointWriter | None = None
        self.prepared = Prepared(None, {}, None)
        self.hashes: dict[str, str] = {}
        self.nonfinite: dict[str, int] = {}  # tensor -> inf/NaN outputs that finite inputs produced

    # -- phases -----------------------------------------------------------------------------------
    def prepare(self) -> Prepared:
        """Reduce passes over the whole model, before any output is written."""
        params = self.plan.recipe.parameters
        jobs = self.plan.merge_jobs
        sparsify = self.spec.sparsify
        bands = None
        if sparsify is not None and sparsify.needs_ranks and params.get("granularity") == "global":
            bands = reduce.global_bands(jobs, self.stream, params, self.n_models, self.backend, self.parallel)
        if self.spec.combine.whole_matrix:  # refuse a matrix over the budget before writing anything
            for job in jobs:
                self.stream(job)
        self.plan = with_prepared_params(self.plan)
        self.prepared = Prepared(bands, {}, None)
        lines = None
        if self.lines is not None:
            alpha = self._auto_alpha() if self.lines.alpha == "auto" else float(self.lines.alpha)
            beta = (1.0 - alpha) if self.lines.beta is None else self.lines.beta
            lines = LinesResolved(alpha, beta, self.lines.outside, self.lines.alpha)
        counts = reduce.patch_counts([j for j in jobs if j.kind == "patch"], params, sparsify, bands)
        picks = {}
        if self.spec.pick is not None:
            picks = self.spec.pick.rules(
                jobs, params, self.backend, self.parallel, partial(pair_chunks, self)
            )
        self.prepared = Prepared(bands, counts, lines, picks)
        return self.prepared

    def run(self, prepared: Prepared, writer: CheckpointWriter) -> dict[str, str]:
        """Run every job not yet journaled; return the content hashes of input 0 (if recorded)."""
        self.prepared, self.writer = prepared, writer
        # Hashes are not journaled: a resumed diff or apply recomputes (and rewrites, identically)
        # every tensor it must hash.
        todo = [
            j
            for j in self.plan.jobs
            if not self.outputs(j) <= writer.done or (self.hash_base and j.kind in MERGED)
        ]
        self.run_jobs(todo)
        if self.nonfinite:
            raise_nonfinite(self.plan, self.nonfinite)
        return self.hashes

    def run_jobs(self, jobs: list[TensorJob]) -> None:
        """``run_job`` for each job on the worker threads, big tensors first (they balance the
        workers). A worker starting job k asks the disk for the start of job k + workers, the next
        one no worker has taken, so the disk keeps reading while every worker computes."""
        jobs = sorted(jobs, key=lambda j: -j.numel)

        def run_ahead(k: int) -> None:
            if k + self.workers < len(jobs):
                nxt = jobs[k + self.workers]
                hint_start(nxt, self.plan.inputs_of(nxt), self.share)
            self.run_job(jobs[k])

        self.parallel(run_ahead, list(range(len(jobs))))

    def run_job(self, job: TensorJob) -> None:
        self.local.nonfinite = 0  # counted by encode(): this job runs on this thread only
        match job.kind:
            case "copy_equal" | "copy_base":
                _copy(self, job)
            case "keep_base":
                _keep_base(self, job)
            case "dense" | "update":
                _merge(self, job)
            case "patch":
                _patch(self, job)
            case "scatter":
                scatter(self, job)
            case "pick":
                pick(self, job)
            case _:
                raise AssertionError(f"unknown job kind {job.kind!r}")
        bad = nonfinite_from_finite(self, job, self.local.nonfinite)
        with self.lock:
            if bad:  # not journaled: a re-run computes (and checks) it again
                self.nonfinite[job.name] = bad
            for name in sorted(self.outputs(job) - self.writer.done if not bad else ()):
                self.writer.mark_done(name)
            if self.progress is not None:
                self.progress(0, job.name)

    def outputs(self, job: TensorJob) -> set[str]:
        if job.kind != "patch":
            return {job.name}
        if not self.prepared.counts.get(job.name):
            return set()
        return {job.name + INDICES, job.name + VALUES}

    # -- threads ----------------------------------------------------------------------------------
    def parallel(self, fn: Callable, items: list) -> list:
        """``[fn(x) for x in items]`` on the worker threads, results in item order."""
        if not items:
            return []
        if self.workers == 1:
            out = []
            for item in items:
                self.check_stop()
                out.append(self.spaces.run(fn, item))
            return out
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="surgery")
        futures = [pool.submit(self.spaces.run, fn, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        except BaseException:
            self.stop.set()
            for fut in futures:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("stopped")

    @property
    def ws(self) -> Workspace:
        """This worker thread's host workspace."""
        return self.spaces.host

    def workspace(self, job: TensorJob) -> Workspace:
        """Where ``job``'s chunks live: on the device for a merged tensor whose stages all run on
        backend kernels, else in host buffers (the torch kernels then copy per call)."""
        resident = job.kind in ("dense", "update") and self.spec.on_device(job.params)
        return self.spaces.device if resident and self.spaces.device is not None else self.spaces.host

    # -- streams and chunks -------------------------------------------------------------------------
    def stream(self, job: TensorJob) -> TensorStream:
        sparsify = self.spec.sparsify
        ranked = job.kind in MERGED and sparsify is not None and sparsify.needs_ranks
        dense = job.kind in ("dense", "update")
        per_row = ranked and job.params.get("granularity") == "per_row"
        per_row = per_row or (dense and self.spec.combine.wants_rows(job.params))
        whole = dense and self.spec.combine.wants_whole(job.name, job.shape, job.params)
        ranges = chunk_ranges(job, self.share, self.n_models, per_row, self.options.min_chunk, whole)
        spans = span_ranges(job, self.share, self.n_models, ranges)
        uses_tau = self.plan.has_base and self.spec.combine.uses_tau
        tau_from = self.spec.tau_from if uses_tau else None
        ws = self.workspace(job)
        return TensorStream(job, self.plan.inputs_of(job), self.backend, ws, ranges, tau_from, self.n_models,
                            self.check_stop, spans)  # fmt: skip

    def write(self, name: str, start: int, raw: np.ndarray) -> None:
        self.writer.write(name, start, raw)
        if self.progress is not None:
            with self.lock:
                self.progress(raw.nbytes, None)

    def encode(self, job: TensorJob, out: np.ndarray) -> np.ndarray:
        """float32 chunk -> output storage; counts its inf / NaN after the cast (so an overflow to
        inf in F16 / BF16 is seen) for the finiteness check of the job. Returns host bytes (a
        device chunk is encoded on the device and only its output comes back)."""
        ws = self.workspace(job)
        raw = ws.array("out_raw", tuple(out.shape), DTYPES[job.out_dtype].storage)
        self.backend.encode(out, job.out_dtype, raw)
        self.local.nonfinite += self.backend.nonfinite(raw, job.out_dtype)
        return ws.download(raw, "out_raw")

    def zeros(self, ws, count: int) -> np.ndarray:
        """A float32 base of zeros: the combine kernels then yield the merged update itself."""
        zeros = ws.array("zeros", (count,), np.float32)
        zeros[...] = 0.0
        return zeros

    def hasher(self):
        return hashlib.blake2b(digest_size=16) if self.hash_base else None

    def finish_hash(self, job: TensorJob, hasher) -> None:
        if hasher is not None:
            with self.lock:
                self.hashes[job.name] = hasher.hexdigest()

    def bands(self, job: TensorJob, stream: TensorStream) -> list[Band] | None:
        """Rank bands of this tensor for each task vector; None when ranks are taken per row (or
        the method has no rank-based stage)."""
        sparsify = self.spec.sparsify
        if sparsify is None or not sparsify.needs_ranks:
            return None
        granularity = job.params.get("granularity")
        if granularity == "per_row":
            return None
        if granularity == "global":
            return self.prepared.bands.fresh(job.name)
        return reduce.tensor_bands(stream, job.params, self.n_models, self.backend)

    def coefficients(self, job: TensorJob, stream: TensorStream) -> np.ndarray | None:
        combine = self.spec.combine
        if combine.coefficients is None or combine.wants_rows(job.params):  # per-row: from each chunk
            return None
        gram = reduce.gram(stream, combine.gram_over, self.backend) if combine.gram_over else None
        return np.asarray(combine.coefficients(gram, job.params, self.n_models), np.float32)

    def apply(
        self,
        job: TensorJob,
        chunk: Chunk,
        bands: list[Band] | None,
        coeffs: np.ndarray | None,
        lam: float,
        zero_base: bool = False,
        factors: np.ndarray | None = None,
        selected: np.ndarray | None = None,
    ) -> np.ndarray:
        """Output chunk in float32: sparsify each task vector in place, then combine. ``lam`` is the
        LiNeS scale of this tensor's update (1 = none); ``zero_base``: the merged update itself;
        ``selected``: a keyed sparsify stage's flat indices of this tensor (``key_selection``)."""
        be, spec, count, ws = self.backend, self.spec, chunk.count, self.workspace(job)
        out = ws.array("out", (count,), np.float32)
        dec, tau = chunk.inputs, chunk.tau
        models = dec[1:] if self.plan.has_base else dec
        shape = job.shape if count == job.numel else (count,)
        if not spec.combine.adds_update:
            spec.combine.apply(be, Operands(dec, models, tau, dec[0], shape, job), coeffs, None, out)
            if lam != 1.0:  # LiNeS on an interpolation: b + lambda * (out - b)
                be.rescale_update(dec[0], out, np.float32(lam))
            return out
        _sparsify(self, job, chunk, bands, selected)
        if factors is not None:  # each sparsified task vector back to its L1 norm
            tau *= ws.asarray(factors)[:, None]
        scale = np.float32(float(job.params.get("scale", 1.0)) * lam)  # one rounding of scale * lambda
        base = self.zeros(ws, count) if zero_base else dec[0]
        spec.combine.apply(be, Operands(dec, models, tau, base, shape, job), coeffs, scale, out)
        return out

    # -- LiNeS --------------------------------------------------------------------------------------
    def lines_scale(self, job: TensorJob) -> float:
        if self.lines is None:
            return 1.0
        return self.lines.scale(self.prepared.lines.alpha, job.depth)

    def _auto_alpha(self) -> float:
        """alpha = ||sum_t tau_t||_1 / (T * ||tau_merged||_1) over all merged tensors."""

        def measure(job: TensorJob) -> np.ndarray:
            selected = key_selection(self, job)
            stream = self.stream(job)
            bands, coeffs = self.bands(job, stream), self.coefficients(job, stream)
            factors = _l1_factors(self, job, stream, bands, selected)

            def merged_update(chunk: Chunk, tmp: np.ndarray) -> np.ndarray:
                if self.spec.combine.adds_update:  # the update itself, without b + ... - b
                    return self.apply(job, chunk, bands, coeffs, 1.0, zero_base=True, factors=factors,
                                      selected=selected)  # fmt: skip
                out = self.apply(job, chunk, bands, coeffs, 1.0, selected=selected)
                self.backend.subtract(out[None], chunk.inputs[0], tmp[None])
                return tmp

            ws = stream.ws
            scratch = lambda count: ws.array("update", (1 + self.n_models, count), np.float32)  # noqa: E731
            zeros = partial(self.zeros, ws)
            return reduce.update_l1(stream, merged_update, self.backend, zeros, scratch)

        totals = np.zeros(2, np.float64)
        for acc in self.parallel(measure, self.plan.merge_jobs):  # summed in plan order
            totals += acc
        if totals[1] == 0.0:
            return 1.0  # the merge changes nothing: any alpha gives the base
        return float(totals[0] / (self.n_models * totals[1]))


def _sparsify(run: _Run, job: TensorJob, chunk: Chunk, bands: list[Band] | None, selected=None) -> None:
    """The method's sparsify stage on each task vector of the chunk, in place (``selected``: a keyed
    stage's flat indices of this tensor)."""
    sparsify = run.spec.sparsify
    if sparsify is None:
        return
    scratch = run.ws.get("keys", (job.cols,), np.uint64) if bands is None and sparsify.needs_ranks else None
    for t in range(run.n_models):
        band = bands[t] if bands is not None else None
        where = Slice(job.name, t, chunk.start, job.cols, band, job.params, scratch, selected)
        sparsify.apply(run.backend, chunk.tau[t], where)


# -- job writers: one per job kind ------------------------------------------------------------------
def _copy(run: _Run, job: TensorJob) -> None:
    """Integer tensors: equal in every input, copied. Otherwise copied from input ``job.copy_from`` (F8,
    layer stacking), converted (one rounding) when the dtype differs or times the job's ``scale``."""
    inputs, src = run.plan.inputs_of(job), job.copy_from
    scale = np.float32(job.params.get("scale", 1.0)) if job.kind == "copy_base" else np.float32(1.0)
    convert = job.kind == "copy_base" and (job.in_dtypes[src] != job.out_dtype or scale != 1.0)
    storage = DTYPES[job.in_dtypes[src] if convert else job.out_dtype].storage
    n_check = len(inputs) if job.kind == "copy_equal" else 1
    for start, count in chunk_ranges(job, run.share, run.n_models, False, run.options.min_chunk):
        first = inputs[src].read_into(job.source(src), start, run.ws.get("raw0", (count,), storage))
        for i in range(1, n_check):
            other = inputs[i].read_into(job.source(i), start, run.ws.get("raw1", (count,), storage))
            if not np.array_equal(first, other):
                raise IncompatibleTensorsError(
                    f"integer tensor {job.name!r} differs between {inputs[0].source} and {inputs[i].source}",
                    hint="integer tensors (ids, masks, buffers) cannot be merged; every input "
                    "must hold the same values",
                    tensor=job.name,
                )
        if convert:
            dec = run.backend.decode(first, job.in_dtypes[src], run.ws.get("out", (count,), np.float32))
            first = run.encode(job, dec if scale == 1.0 else np.multiply(dec, scale, out=dec))
        run.write(job.name, start, first)


def _keep_base(run: _Run, job: TensorJob) -> None:
    """A float tensor outside the region: the base's values in the output dtype."""
    stream = run.stream(job)
    for start, count in stream.ranges:
        dec = stream.load(start, count, None, n_inputs=1)
        run.write(job.name, start, run.encode(job, dec[0]))


def _merge(run: _Run, job: TensorJob) -> None:
    """The method's output (kind dense), or the merged update alone (kind update: a diff)."""
    selected = key_selection(run, job)
    stream = run.stream(job)
    bands, coeffs = run.bands(job, stream), run.coefficients(job, stream)
    factors = _l1_factors(run, job, stream, bands, selected)
    lam = run.lines_scale(job)
    hasher = run.hasher()
    for k in range(len(stream.ranges)):
        chunk = stream.take(k)  # tau is masked in place
        if hasher is not None:
            hasher.update(stream.raw0(chunk))
        # a diff is the update itself: b + tau - b would round
        out = run.apply(job, chunk, bands, coeffs, lam, zero_base=job.kind == "update", factors=factors,
                        selected=selected)  # fmt: skip
        stream.fix_rows(chunk, out)
        run.write(job.name, chunk.start, run.encode(job, out))
    run.finish_hash(job, hasher)


def _l1_factors(run: _Run, job: TensorJob, stream: TensorStream, bands, selected) -> np.ndarray | None:
    """``rescale: l1``: each ||tau_t||_1 / ||sparsified tau_t||_1 (one more pass, own tie counters)."""
    if job.params.get("rescale", "none") != "l1" or run.spec.sparsify is None:
        return None
    counted = fresh(bands) if bands is not None else None
    return reduce.l1_rescale(stream, lambda c: _sparsify(run, job, c, counted, selected), run.n_models)


def _patch(run: _Run, job: TensorJob) -> None:
    """Emit the selected entries of tau as (flat index, value), in index order."""
    selected = key_selection(run, job)
    if selected is not None:
        return key_patch(run, job, selected)
    stream = run.stream(job)
    bands = run.bands(job, stream)
    assert bands is not None and len(bands) == 1
    band = bands[0]
    hasher = run.hasher()
    total = run.prepared.counts.get(job.name, 0)
    written = 0
    for k in range(len(stream.ranges)):
        chunk = stream.take(k)
        if hasher is not None:
            hasher.update(stream.raw0(chunk))
        idx = run.ws.get("patch_idx", (chunk.count,), np.int64)
        val = run.ws.get("patch_val", (chunk.count,), np.float32)
        n = int(run.backend.band_select(chunk.tau[0], band.v_hi, band.ties_hi, band.v_lo, band.ties_lo,
                                        band.seen, chunk.start, idx, val))  # fmt: skip
        if n:
            run.write(job.name + INDICES, written, idx[:n])
            run.write(job.name + VALUES, written, val[:n])
            written += n
    assert written == total, (job.name, written, total)
    run.finish_hash(job, hasher)
