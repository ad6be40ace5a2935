"""The streaming engine: runs a plan tensor by tensor, chunk by chunk, under a memory budget.

A tensor is a stream of element chunks sized so that every buffer a worker needs fits its share of
``max_memory``. Methods that need whole-tensor statistics first run *reduce passes* over the chunks
(exact rank thresholds by radix select, Gram matrices for SLERP / Model Stock), then one *apply pass*
computes output chunks and writes them at their final offsets. When a tensor fits in one chunk it is
read once and the passes reuse it. Workers run whole tensors in parallel threads; the kernels, reads
and writes release the GIL, so reading, computing and writing overlap across tensors. Every result
is a pure function of the inputs and the recipe: chunk size, budget and thread count never change a
byte of the output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.dtypes import DTYPES
from surgery.errors import IncompatibleTensorsError, RecipeError, SurgeryError
from surgery.files import CARD, MANIFEST, RECIPE
from surgery.kernels import Backend, get_backend
from surgery.methods.dare import dare_key
from surgery.methods.interpolation import model_stock_k, slerp_coefficients
from surgery.methods.lines import make_schedule
from surgery.patch import INDICES, VALUES, PatchCursor, patch_layout, read_manifest
from surgery.plan import Plan, TensorJob, build_plan, input_paths
from surgery.ranks import (
    HIST,
    Band,
    band_ranks,
    count_above,
    count_at,
    edge_bins,
    sparse,
    threshold_from_hists,
)
from surgery.recipe import Recipe
from surgery.vocab import CARRY
from surgery.writer import CheckpointWriter, check_output_folder, fingerprint_of, prepare_output

ENGINE_VERSION = 1  # part of the resume fingerprint: bump when output bytes could change


@dataclass(frozen=True)
class EngineOptions:
    max_memory: int = 2 * 2**30  # bytes for all working buffers together
    threads: int | None = None  # default: one per CPU core
    device: str = "cpu"  # "cpu" (numba) or "cuda[:N]" (torch)
    overwrite: bool = False
    min_chunk: int = 1  # elements; tests use tiny budgets, real runs never hit this

    @property
    def workers(self) -> int:
        return max(1, self.threads or os.cpu_count() or 1)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    tensors: int
    resumed_tensors: int
    bytes_written: int
    seconds: float
    warnings: tuple[str, ...] = ()


class Interrupted(SurgeryError):
    """The run was stopped; the output folder holds a resumable partial run."""


# -- entry points ---------------------------------------------------------------------------------
def merge(
    recipe: Recipe,
    out: str | Path,
    options: EngineOptions | None = None,
    progress: Callable[[int, str | None], None] | None = None,
    card: Callable[[Plan], str] | None = None,
) -> MergeResult:
    """Plan and run ``recipe``, writing a complete checkpoint to ``out``."""
    plan = build_plan(recipe)
    try:
        return execute(plan, Path(out), options or EngineOptions(), progress, card)
    finally:
        plan.close()


def execute(
    plan: Plan,
    out: Path,
    options: EngineOptions,
    progress: Callable[[int, str | None], None] | None = None,
    card: Callable[[Plan], str] | None = None,
) -> MergeResult:
    """Run a checked plan.

    ``progress(nbytes, tensor)`` is called as output bytes are written; ``tensor`` is the name of a
    tensor just completed, else None.
    """
    start = time.perf_counter()
    check_output_folder(out, input_paths(plan))
    # The layout is a pure function of recipe and inputs, so they alone identify a partial run.
    fingerprint = fingerprint_of(
        {
            "engine": ENGINE_VERSION,
            "recipe": plan.recipe.to_dict(),
            "inputs": [c.fingerprint() for c in plan.inputs],
        }
    )
    resume = prepare_output(out, fingerprint, options.overwrite)
    runner = _Runner(plan, options, progress)
    runner.prepare()  # whole-model reduce passes: global ranks, LiNeS auto alpha, patch sizes
    if plan.layout is None:
        plan.layout = patch_layout(runner.patch_counts, plan.recipe.max_shard_size)
    writer = CheckpointWriter(out, plan.layout, resume)
    try:
        runner.writer = writer
        resumed = len(writer.done)
        if progress and resumed:
            progress(sum(plan.layout.tensors[n].nbytes for n in writer.done), None)
        runner.run()
        side = plan.side_files()
        side[RECIPE] = plan.recipe.to_yaml().encode()
        manifest = runner.manifest()
        if manifest is not None:
            side[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
        if card is not None:
            side[CARD] = card(plan).encode()
        writer.finalize(side)
    finally:
        writer.close()
    return MergeResult(
        out,
        len(plan.jobs),
        resumed,
        plan.layout.total_bytes,
        time.perf_counter() - start,
        tuple(runner.warnings),
    )


# -- buffers --------------------------------------------------------------------------------------
class _Workspace:
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


# -- running jobs ---------------------------------------------------------------------------------
class _Runner:
    def __init__(
        self,
        plan: Plan,
        options: EngineOptions,
        progress: Callable[[int, str | None], None] | None,
    ) -> None:
        self.plan = plan
        self.spec = plan.recipe.spec
        self.params = plan.recipe.parameters
        self.writer: CheckpointWriter | None = None  # set once the layout is known
        self.options = options
        self.progress = progress
        self.backend: Backend = get_backend(options.device)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.workers = options.workers
        self.share = max(1, options.max_memory // self.workers)
        # number of task vectors: transfer has one (old fine-tune - old base) from two inputs
        self.n_models = 1 if self.spec.tau_from == "pairs" else len(plan.recipe.models)
        self.global_bands: dict[str, list[Band]] = {}
        self.global_counts: dict[str, int] = {}
        self.lines = make_schedule(plan.recipe.lines)
        self.lines_alpha = 1.0
        self.patch_counts: dict[str, int] = {}
        self.warnings: list[str] = []
        # content hashes of input 0 (the base of a diff, the target of an apply), chunk by chunk
        self.hash_base = self.spec.output in ("update", "patch") or self.spec.command == "apply"
        self.hashes: dict[str, str] = {}

    # -- orchestration ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Reduce passes over the whole model, before any output is written."""
        granularity = self.params.get("granularity")
        if self.spec.sparsify == "band" and granularity == "global":
            self.global_bands = self._global_thresholds()
        if self.lines is not None:
            alpha = self.lines.alpha
            self.lines_alpha = self._resolve_lines_alpha() if alpha == "auto" else float(alpha)
            self.plan.resolved["lines_alpha"] = self.lines_alpha
            beta = self.lines.beta
            self.plan.resolved["lines_beta"] = (1.0 - self.lines_alpha) if beta is None else beta
        if self.spec.output == "patch":
            if granularity not in ("per_tensor", "global"):
                raise RecipeError(
                    f"a sparse patch ranks per tensor or globally, not {granularity}",
                    hint="use --granularity per_tensor or global",
                )
            for job in self.plan.merge_jobs:
                if granularity == "global":
                    self.patch_counts[job.name] = self.global_counts[job.name]
                else:
                    r_hi, r_lo = band_ranks(self._params(job), job.numel)
                    self.patch_counts[job.name] = r_lo - r_hi

    def run(self) -> None:
        assert self.writer is not None
        # Hashes are not journaled: a resumed diff or apply recomputes (and rewrites, identically)
        # every tensor it must hash.
        todo = [
            j
            for j in self.plan.jobs
            if not self._outputs(j) <= self.writer.done
            or (self.hash_base and j.action == "merge" and j.selected)
        ]
        todo.sort(key=lambda j: -j.numel)  # big tensors first balance the workers
        self._parallel(self._run_job, todo)
        if self.spec.command == "apply":
            self._check_target_hashes()

    def _outputs(self, job: TensorJob) -> set[str]:
        if self.spec.output != "patch":
            return {job.name}
        if not job.selected or job.action != "merge" or not self.patch_counts.get(job.name):
            return set()
        return {job.name + INDICES, job.name + VALUES}

    def _parallel(self, fn: Callable, items: list) -> list:
        if not items:
            return []
        if self.workers == 1:
            out = []
            for item in items:
                self._check_stop()
                out.append(fn(item))
            return out
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="surgery")
        futures = [pool.submit(fn, item) for item in items]
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

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("stopped")

    @property
    def ws(self) -> _Workspace:
        ws = getattr(self.local, "ws", None)
        if ws is None:
            ws = self.local.ws = _Workspace()
        return ws

    # -- chunking ---------------------------------------------------------------------------------
    def _bytes_per_element(self, job: TensorJob) -> int:
        n_in = len(job.in_dtypes)
        raw = sum(DTYPES[d].itemsize for d in job.in_dtypes if d != "F32")
        out = 4 + DTYPES[job.out_dtype].itemsize
        return 4 * n_in + raw + 4 * self.n_models + out

    def _chunk(self, job: TensorJob) -> int:
        """Elements per chunk: as many as fit this worker's share; whole rows for per-row masks."""
        n = max(1, job.numel)
        per = self._bytes_per_element(job)
        chunk = max(self.options.min_chunk, self.share // per)
        if self._per_row(job) or job.row_map is not None:
            cols = self._cols(job)
            chunk = max(cols, chunk // cols * cols)
        return min(n, chunk)

    def _params(self, job: TensorJob) -> dict:
        """The recipe's parameters with this tensor's own values (per-layer schedules) on top."""
        return self.params if not job.params else {**self.params, **job.params}

    def _per_row(self, job: TensorJob) -> bool:
        return (
            job.action == "merge"
            and self.spec.sparsify == "band"
            and self.params.get("granularity") == "per_row"
        )

    @staticmethod
    def _cols(job: TensorJob) -> int:
        return job.shape[-1] if job.shape else 1

    def _ranges(self, job: TensorJob) -> list[tuple[int, int]]:
        chunk = self._chunk(job)
        return [(s, min(chunk, job.numel - s)) for s in range(0, job.numel, chunk)]

    # -- reading ----------------------------------------------------------------------------------
    def _load(
        self, job: TensorJob, start: int, count: int, ranges_next: tuple | None, inputs: int | None = None
    ) -> np.ndarray:
        """Decoded float32 inputs [n_inputs, count] for elements start:start+count (the first
        ``inputs`` inputs only, when given)."""
        ws = self.ws
        n_in = len(job.in_dtypes) if inputs is None else inputs
        dec = ws.get("dec", (n_in, count), np.float32)
        if job.row_map is not None:
            return self._load_rows(job, start, count, dec)
        for i, (ckpt, dtype) in enumerate(zip(self.plan.inputs[:n_in], job.in_dtypes[:n_in])):
            self._check_stop()
            if dtype == "F32":
                ckpt.read_into(job.name, start, dec[i])
            else:
                raw = ws.get(f"raw{i}", (count,), DTYPES[dtype].storage)
                ckpt.read_into(job.name, start, raw)
                self.backend.decode(raw, dtype, dec[i])
            if ranges_next is not None:
                ckpt.prefetch(job.name, *ranges_next)
        return dec

    def _load_rows(self, job: TensorJob, start: int, count: int, dec: np.ndarray) -> np.ndarray:
        """Gather whole rows by the vocabulary row map (-1: zeros), one read per row."""
        cols = self._cols(job)
        r0 = start // cols
        rows = job.row_map.rows[r0 : r0 + count // cols]
        for i, (ckpt, dtype) in enumerate(zip(self.plan.inputs, job.in_dtypes)):
            self._check_stop()
            raw = self.ws.get(f"raw{i}", (count,), DTYPES[dtype].storage)
            for j, src in enumerate(rows[:, i]):
                if src < 0:
                    raw[j * cols : (j + 1) * cols] = 0
                else:
                    ckpt.read_into(job.name, int(src) * cols, raw[j * cols : (j + 1) * cols])
            if dtype == "F32":
                np.copyto(dec[i], raw)
            else:
                self.backend.decode(raw, dtype, dec[i])
        return dec

    def _fix_rows(self, job: TensorJob, dec: np.ndarray, start: int, count: int, out: np.ndarray) -> None:
        """Rows carried over from the fine-tune, or kept from the new base, bypass the arithmetic."""
        cols = self._cols(job)
        r0 = start // cols
        modes = job.row_map.mode[r0 : r0 + count // cols]
        for j in np.flatnonzero(modes):
            src = 2 if modes[j] == CARRY else 0
            out[j * cols : (j + 1) * cols] = dec[src, j * cols : (j + 1) * cols]

    # -- one tensor -------------------------------------------------------------------------------
    def _run_job(self, job: TensorJob) -> None:
        outputs = self._outputs(job)
        if job.action == "copy_from":
            self._copy_from_job(job)
        elif job.action != "merge":
            self._copy_job(job)
        elif not job.selected:
            self._keep_base_job(job)
        elif self.spec.output == "patch":
            self._patch_job(job)
        elif self.spec.output == "scatter":
            self._scatter_job(job)
        else:
            self._merge_job(job)
        with self.lock:
            for name in sorted(outputs - self.writer.done):
                self.writer.mark_done(name)
        if self.progress is not None:
            with self.lock:
                self.progress(0, job.name)

    def _write(self, job: TensorJob, start: int, raw: np.ndarray) -> None:
        self._write_named(job.name, start, raw)

    def _write_named(self, name: str, start: int, raw: np.ndarray) -> None:
        self.writer.write(name, start, raw)
        if self.progress is not None:
            with self.lock:
                self.progress(raw.nbytes, None)

    def _copy_job(self, job: TensorJob) -> None:
        """Integer tensors: equal in every input, copied. F8: copied from the first input."""
        ws = self.ws
        storage = DTYPES[job.out_dtype].storage
        n_check = len(self.plan.inputs) if job.action == "copy_equal" else 1
        for start, count in self._ranges(job):
            first = self.plan.inputs[0].read_into(job.name, start, ws.get("raw0", (count,), storage))
            for i in range(1, n_check):
                other = self.plan.inputs[i].read_into(job.name, start, ws.get("raw1", (count,), storage))
                if not np.array_equal(first, other):
                    raise IncompatibleTensorsError(
                        f"integer tensor {job.name!r} differs between {self.plan.inputs[0].source} "
                        f"and {self.plan.inputs[i].source}",
                        hint="integer tensors (ids, masks, buffers) cannot be merged; every input "
                        "must hold the same values",
                        tensor=job.name,
                    )
            self._write(job, start, first)

    def _copy_from_job(self, job: TensorJob) -> None:
        """Layer stacking: one input's tensor under a new name, in the output dtype."""
        ckpt, name, dtype = self.plan.inputs[job.copy_from], job.sources[0], job.in_dtypes[0]
        for start, count in self._ranges(job):
            raw = ckpt.read_into(name, start, self.ws.get("raw0", (count,), DTYPES[dtype].storage))
            if dtype != job.out_dtype:
                dec = self.backend.decode(raw, dtype, self.ws.get("out", (count,), np.float32))
                raw = self.backend.encode(
                    dec, job.out_dtype, self.ws.get("out_raw", (count,), DTYPES[job.out_dtype].storage)
                )
            self._write(job, start, raw)

    def _chunk_reader(self, job: TensorJob, ranges: list) -> tuple[Callable, dict]:
        """``read(k)`` -> (decoded inputs, tau) of chunk k, and its one-entry cache.

        A tensor that fits in one chunk is read once for all its passes; the caller clears the cache
        before it modifies tau in place.
        """
        cache: dict = {}
        needs_tau = self.plan.has_base and self.spec.combine in ("sum", "ties", "model_stock")
        tau_from = self.spec.tau_from

        def read(k: int) -> tuple[np.ndarray, np.ndarray | None]:
            if cache.get("k") == k:
                return cache["dec"], cache["tau"]
            start, count = ranges[k]
            nxt = ranges[k + 1] if k + 1 < len(ranges) else None
            dec = self._load(job, start, count, nxt)
            tau = None
            if needs_tau:
                tau = self.ws.get("tau", (self.n_models, count), np.float32)
                if tau_from == "given":  # the inputs are diffs already
                    np.copyto(tau, dec[1:])
                elif tau_from == "pairs":  # old fine-tune - old base
                    self.backend.subtract(dec[2:3], dec[1], tau)
                else:
                    self.backend.subtract(dec[1:], dec[0], tau)
            cache.update(k=k, dec=dec, tau=tau)
            return dec, tau

        return read, cache

    def _merged_chunks(self, job: TensorJob, lam: float, measure: np.ndarray | None = None, hasher=None):
        """Yield (start, count, float32 output chunk) of a merged tensor.

        With ``measure`` (LiNeS auto alpha), yield nothing and instead accumulate into ``measure``
        [||sum_t tau_t||_1, ||tau_merged||_1] of this tensor (float64).
        """
        ranges = self._ranges(job)
        read, cache = self._chunk_reader(job, ranges)
        bands = self._bands_for(job, ranges, read)
        coeffs = self._coefficients(job, ranges, read)
        for k, (start, count) in enumerate(ranges):
            dec, tau = read(k)
            cache.clear()  # tau is modified in place below
            if hasher is not None:
                hasher.update(self._raw0(job, dec, count))
            if measure is None:
                base = None
                if self.spec.output == "update":  # a diff: the update itself, b + tau - b would round
                    base = self._zeros(count)
                out = self._apply(job, dec, tau, start, count, bands, coeffs, lam, base=base)
                if job.row_map is not None:
                    self._fix_rows(job, dec, start, count, out)
                yield start, count, out
                continue
            base = dec[0]
            zeros = self._zeros(count)
            tmp = self.ws.get("update", (1, count), np.float32)
            ones = np.ones(self.n_models, np.float32)
            self.backend.combine_sum(zeros, tau if tau is not None else dec[1:] - base, ones,
                                     np.float32(1.0), tmp[0])  # fmt: skip
            self.backend.l1_accumulate(tmp, measure[0:1])
            if self.spec.combine in ("sum", "ties"):  # the update itself, without b + ... - b
                out = self._apply(job, dec, tau, start, count, bands, coeffs, 1.0, base=zeros)
                self.backend.l1_accumulate(out[None], measure[1:2])
            else:
                out = self._apply(job, dec, tau, start, count, bands, coeffs, 1.0)
                np.subtract(out, base, out=tmp[0])
                self.backend.l1_accumulate(tmp, measure[1:2])

    def _zeros(self, count: int) -> np.ndarray:
        """A float32 base of zeros: the combine kernels then yield the merged update itself."""
        zeros = self.ws.get("zeros", (count,), np.float32)
        zeros.fill(0.0)
        return zeros

    def _merge_job(self, job: TensorJob) -> None:
        lam = self._lines_scale(job)
        hasher = self._hasher(job)
        for start, count, out in self._merged_chunks(job, lam, hasher=hasher):
            raw = self.ws.get("out_raw", (count,), DTYPES[job.out_dtype].storage)
            self._write(job, start, self.backend.encode(out, job.out_dtype, raw))
        self._finish_hash(job, hasher)

    def _hasher(self, job: TensorJob):
        return hashlib.blake2b(digest_size=16) if self.hash_base else None

    def _finish_hash(self, job: TensorJob, hasher) -> None:
        if hasher is not None:
            with self.lock:
                self.hashes[job.name] = hasher.hexdigest()

    def _raw0(self, job: TensorJob, dec: np.ndarray, count: int) -> np.ndarray:
        """Raw bytes of input 0 for the chunk just loaded (F32 is read straight into ``dec``)."""
        if job.in_dtypes[0] == "F32":
            return dec[0]
        return self.ws.get("raw0", (count,), DTYPES[job.in_dtypes[0]].storage)

    def _keep_base_job(self, job: TensorJob) -> None:
        """A float tensor outside the region: the base's values in the output dtype."""
        for start, count in self._ranges(job):
            dec = self._load(job, start, count, None, inputs=1)
            raw = self.ws.get("out_raw", (count,), DTYPES[job.out_dtype].storage)
            self._write(job, start, self.backend.encode(dec[0], job.out_dtype, raw))

    def _patch_job(self, job: TensorJob) -> None:
        """Emit the selected entries of tau as (flat index, value), in index order."""
        ranges = self._ranges(job)
        read, cache = self._chunk_reader(job, ranges)
        bands = self._bands_for(job, ranges, read)
        assert bands is not None and len(bands) == 1
        band = bands[0]
        hasher = self._hasher(job)
        total = self.patch_counts.get(job.name, 0)
        written = 0
        for k, (start, count) in enumerate(ranges):
            dec, tau = read(k)
            cache.clear()
            if hasher is not None:
                hasher.update(self._raw0(job, dec, count))
            idx = self.ws.get("patch_idx", (count,), np.int64)
            val = self.ws.get("patch_val", (count,), np.float32)
            n = int(
                self.backend.band_select(
                    tau[0], band.v_hi, band.ties_hi, band.v_lo, band.ties_lo, band.seen, start, idx, val
                )
            )
            if n:
                self._write_named(job.name + INDICES, written, idx[:n])
                self._write_named(job.name + VALUES, written, val[:n])
                written += n
        assert written == total, (job.name, written, total)
        self._finish_hash(job, hasher)

    def _scatter_job(self, job: TensorJob) -> None:
        """out = b, plus scale * v_i at every patched index i (one float32 rounding)."""
        patch = self.plan.inputs[1]
        cursor = PatchCursor(patch, job.name, job.patch_count, job.numel)
        scale = np.float32(self._params(job)["scale"])
        hasher = self._hasher(job)
        for start, count in self._ranges(job):
            dec = self._load(job, start, count, None, inputs=1)
            if hasher is not None:
                hasher.update(self._raw0(job, dec, count))
            out = self.ws.get("out", (count,), np.float32)
            np.copyto(out, dec[0])
            idx, val = cursor.take(start + count)
            local = idx - start
            out[local] = out[local] + scale * val
            raw = self.ws.get("out_raw", (count,), DTYPES[job.out_dtype].storage)
            self._write(job, start, self.backend.encode(out, job.out_dtype, raw))
        self._finish_hash(job, hasher)

    # -- diff manifests -----------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """surgery_diff.json for a diff or patch output."""
        if self.spec.output not in ("update", "patch"):
            return None
        base, ft = self.plan.inputs[0], self.plan.inputs[-1]
        jobs = self.plan.merge_jobs
        total = sum(j.numel for j in jobs)
        kept = sum(self.patch_counts.values()) if self.spec.output == "patch" else total
        data = {
            "format": "surgery-diff",
            "version": 1,
            "kind": "patch" if self.spec.output == "patch" else "dense",
            "method": self.spec.name,
            "parameters": dict(self.params),
            "base": {
                "source": base.source,
                "tensors": {
                    j.name: {"dtype": j.in_dtypes[0], "shape": list(j.shape), "hash": self.hashes[j.name]}
                    for j in jobs
                },
            },
            "finetuned": {"source": ft.source},
            "kept": kept,
            "total": total,
            "fraction": kept / total if total else 0.0,
        }
        if self.spec.output == "patch":
            data["tensors"] = {
                j.name: {"shape": list(j.shape), "kept": self.patch_counts.get(j.name, 0)} for j in jobs
            }
        return data

    def _check_target_hashes(self) -> None:
        """apply: warn when the target is not the base the diff was taken from."""
        manifest = read_manifest(self.plan.inputs[1].root)
        if manifest is None:
            self.warnings.append(
                f"{self.plan.inputs[1].source} has no {MANIFEST}: cannot check that the target is its base"
            )
            return
        recorded = manifest.get("base", {}).get("tensors", {})
        differ = sorted(n for n, h in self.hashes.items() if n in recorded and recorded[n]["hash"] != h)
        if differ:
            self.warnings.append(
                f"the target differs from the base this diff was taken from "
                f"({manifest['base'].get('source')}) in {len(differ)} of {len(self.hashes)} tensors, "
                f"e.g. {differ[0]}: the result is a transfer, not a reconstruction"
            )

    # -- LiNeS --------------------------------------------------------------------------------------
    def _lines_scale(self, job: TensorJob) -> float:
        if self.lines is None:
            return 1.0
        return self.lines.scale(self.lines_alpha, job.depth)

    def _resolve_lines_alpha(self) -> float:
        """alpha = ||sum_t tau_t||_1 / (T * ||tau_merged||_1) over all merged tensors (auto)."""

        def measure(job: TensorJob) -> np.ndarray:
            acc = np.zeros(2, np.float64)
            for _ in self._merged_chunks(job, 1.0, measure=acc):
                pass
            return acc

        totals = np.zeros(2, np.float64)
        for acc in self._parallel(measure, self.plan.merge_jobs):  # summed in plan order
            totals += acc
        if totals[1] == 0.0:
            return 1.0  # the merge changes nothing: any alpha gives the base
        return float(totals[0] / (self.n_models * totals[1]))

    # -- reduce passes ----------------------------------------------------------------------------
    def _bands_for(self, job: TensorJob, ranges: list, chunk: Callable) -> list[Band] | None:
        if self.spec.sparsify != "band":
            return None
        granularity = self.params.get("granularity")
        if granularity == "per_row":
            return None
        if granularity == "global":
            return [Band(b.v_hi, b.ties_hi, b.v_lo, b.ties_lo) for b in self.global_bands[job.name]]
        r_hi, r_lo = band_ranks(self._params(job), job.numel)
        highs = self._hist_high(ranges, chunk)
        bins = [edge_bins(highs[t], r_hi, r_lo) for t in range(self.n_models)]
        lows = self._hist_low(ranges, chunk, bins)
        return [self._band(highs[t], lows[t], r_hi, r_lo) for t in range(self.n_models)]

    def _hist_high(self, ranges: list, chunk: Callable) -> np.ndarray:
        hist = np.zeros((self.n_models, HIST), np.int64)
        for k in range(len(ranges)):
            _, tau = chunk(k)
            for t in range(self.n_models):
                self.backend.abs_hist_high(tau[t], hist[t])
        return hist

    def _hist_low(self, ranges: list, chunk: Callable, bins: list[list[int]]) -> list[dict[int, np.ndarray]]:
        """Per model t, the low-16-bit histogram inside each high bin of ``bins[t]``."""
        hists = [{b: np.zeros(HIST, np.int64) for b in bins[t]} for t in range(self.n_models)]
        if any(bins):
            for k in range(len(ranges)):
                _, tau = chunk(k)
                for t in range(self.n_models):
                    for b, hist in hists[t].items():
                        self.backend.abs_hist_low(tau[t], b, hist)
        return hists

    @staticmethod
    def _band(high: np.ndarray, lows: dict[int, np.ndarray], r_hi: int, r_lo: int) -> Band:
        v_hi, t_hi = threshold_from_hists(high, r_hi, lows.__getitem__)
        v_lo, t_lo = threshold_from_hists(high, r_lo, lows.__getitem__)
        return Band(v_hi, t_hi, v_lo, t_lo)

    def _global_thresholds(self) -> dict[str, list[Band]]:
        """One band per model over ALL selected tensors, ties broken in (plan order, index) order.

        Pass 1 sums per-tensor high histograms; pass 2 collects each tensor's low histogram inside
        the edge bins. Per-tensor histograms are kept sparse (non-empty bins only), so memory stays
        small for models with hundreds of tensors. A tensor's share of the ties at an edge is what is
        left of the global tie budget after the tensors before it in plan order. Also sets
        ``global_counts``: how many entries each tensor keeps (the size of a sparse patch).
        """
        jobs = self.plan.merge_jobs
        T = self.n_models

        def pass_high(job: TensorJob) -> list[tuple[np.ndarray, np.ndarray]]:
            ranges = self._ranges(job)
            hist = self._hist_high(ranges, self._chunk_reader(job, ranges)[0])
            return [sparse(hist[t]) for t in range(T)]

        per_job_high = self._parallel(pass_high, jobs)
        highs = np.zeros((T, HIST), np.int64)
        for job_high in per_job_high:
            for t, (idx, cnt) in enumerate(job_high):
                highs[t, idx] += cnt
        n = sum(j.numel for j in jobs)
        r_hi, r_lo = band_ranks(self.params, n)
        bins = [edge_bins(highs[t], r_hi, r_lo) for t in range(T)]

        def pass_low(job: TensorJob) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
            ranges = self._ranges(job)
            hists = self._hist_low(ranges, self._chunk_reader(job, ranges)[0], bins)
            return [{b: sparse(h) for b, h in hists[t].items()} for t in range(T)]

        per_job_low = self._parallel(pass_low, jobs)
        result: dict[str, list[Band]] = {j.name: [] for j in jobs}
        self.global_counts = {j.name: 0 for j in jobs}
        for t in range(T):
            lows = {b: np.zeros(HIST, np.int64) for b in bins[t]}
            for job_low in per_job_low:
                for b, (idx, cnt) in job_low[t].items():
                    lows[b][idx] += cnt
            edges = self._band(highs[t], lows, r_hi, r_lo)
            v_hi, v_lo = edges.v_hi, edges.v_lo
            left_hi, left_lo = edges.ties_hi, edges.ties_lo
            for job, high, low in zip(jobs, per_job_high, per_job_low):
                eq_hi = count_at(low[t], v_hi)
                eq_lo = count_at(low[t], v_lo)
                band = Band(v_hi, min(left_hi, eq_hi), v_lo, min(left_lo, eq_lo))
                result[job.name].append(band)
                left_hi, left_lo = max(0, left_hi - eq_hi), max(0, left_lo - eq_lo)
                in_lo = count_above(high[t], low[t], v_lo, job.numel) + band.ties_lo
                in_hi = count_above(high[t], low[t], v_hi, job.numel) + band.ties_hi
                self.global_counts[job.name] += in_lo - in_hi  # T == 1 for patches
        return result

    def _coefficients(self, job: TensorJob, ranges: list, chunk: Callable) -> np.ndarray | None:
        """Per-tensor scalars of SLERP ([c0, c1]) and Model Stock ([k]) from a Gram-matrix pass."""
        combine = self.spec.combine
        if combine not in ("slerp", "model_stock"):
            return None
        size = 2 if combine == "slerp" else self.n_models
        gram = np.zeros((size, size), np.float64)
        for k in range(len(ranges)):
            dec, tau = chunk(k)
            self.backend.gram_accumulate(dec if combine == "slerp" else tau, gram)
        if combine == "slerp":
            params = self._params(job)
            return slerp_coefficients(gram, float(params["t"]), float(params["linear_above"]))
        return np.array([model_stock_k(gram, float(self.params["cos_min"]))], np.float32)

    # -- apply ------------------------------------------------------------------------------------
    def _apply(
        self,
        job: TensorJob,
        dec: np.ndarray,
        tau: np.ndarray | None,
        start: int,
        count: int,
        bands: list[Band] | None,
        coeffs: np.ndarray | None,
        lam: float,
        base: np.ndarray | None = None,
    ) -> np.ndarray:
        """Output chunk in float32. ``lam`` is the LiNeS scale of this tensor's update (1 = none);
        ``base`` replaces the base row in the final sum (zeros: the merged update itself)."""
        be = self.backend
        out = self.ws.get("out", (count,), np.float32)
        combine = self.spec.combine
        params = self._params(job)
        weights = np.asarray(params.get("weights") or [1.0] * self.n_models, np.float32)
        if combine in ("linear", "slerp", "model_stock"):
            if combine == "linear":
                models = dec[1:] if self.plan.has_base else dec
                w = np.asarray(params["weights"], np.float64)
                be.combine_weighted(models, (w / w.sum()).astype(np.float32), out)
            elif combine == "slerp":
                be.combine_weighted(dec, coeffs, out)
            else:
                be.combine_model_stock(dec[0], dec[1:], np.float32(coeffs[0]), out)
            if lam != 1.0:  # LiNeS on an interpolation: b + lambda * (out - b)
                be.rescale_update(dec[0], out, np.float32(lam))
            return out
        assert tau is not None
        if self.spec.sparsify == "band":
            if bands is None:  # per row
                r_hi, r_lo = band_ranks(params, self._cols(job))
                keys = self.ws.get("keys", (self._cols(job),), np.uint64)
                for t in range(self.n_models):
                    be.row_band_mask(tau[t], self._cols(job), r_hi, r_lo, keys)
            else:
                for t, b in enumerate(bands):
                    be.band_mask(tau[t], b.v_hi, b.ties_hi, b.v_lo, b.ties_lo, b.seen)
        elif self.spec.sparsify == "bernoulli":
            for t in range(self.n_models):
                key = dare_key(int(params["seed"]), job.name, t)
                be.dare_mask(tau[t], float(params["density"]), np.uint64(key), start)
        scale = np.float32(float(params.get("scale", 1.0)) * lam)  # one rounding of scale * lambda
        base = dec[0] if base is None else base
        if combine == "sum":
            be.combine_sum(base, tau, weights, scale, out)
        else:
            be.combine_ties(base, tau, weights, scale, out)
        return out
