"""Reduce passes: whole-tensor (or whole-model) statistics streamed over chunks, as pure functions.

- exact rank bands per tensor (two histogram passes of radix select, ``ranks.py``) and over the whole
  model (``global_bands``: the same passes summed over every tensor, ties shared in plan order);
- the Gram matrix of the inputs or task vectors (SLERP's angle, Model Stock's cosines);
- the L1 norms LiNeS' automatic alpha needs;
- a keyed selection: the top entries of a whole-tensor key of the base (LIFT's principal weights).

Each takes streams and a backend and returns numbers; nothing here writes output or keeps state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from surgery.errors import RecipeError
from surgery.kernels import Backend
from surgery.plan import TensorJob
from surgery.ranks import (
    HIST,
    Band,
    band_ranks,
    count_above,
    count_at,
    edge_bins,
    fresh,
    high_bin,
    rank_count,
    sparse,
    threshold_from_hists,
    top_k_indices,
)
from surgery.stream import TensorStream


def _hist_high(stream: TensorStream, n_models: int, backend: Backend) -> np.ndarray:
    """Per model, the high-16-bit histogram of |tau| over the tensor (counted where the chunks live:
    on the device for a resident stream, brought back once per tensor)."""
    hist = stream.ws.counts((n_models, HIST))
    for k in range(len(stream.ranges)):
        tau = stream.read(k).tau
        for t in range(n_models):
            backend.abs_hist_high(tau[t], hist[t])
    return stream.ws.to_host(hist)


def _hist_low(stream: TensorStream, bins: list[list[int]], backend: Backend) -> list[dict[int, np.ndarray]]:
    """Per model t, the low-16-bit histogram inside each high bin of ``bins[t]``."""
    pairs = [(t, b) for t in range(len(bins)) for b in bins[t]]
    hist = stream.ws.counts((len(pairs), HIST))
    if pairs:
        for k in range(len(stream.ranges)):
            tau = stream.read(k).tau
            for row, (t, b) in enumerate(pairs):
                backend.abs_hist_low(tau[t], b, hist[row])
    host = stream.ws.to_host(hist)
    hists: list[dict[int, np.ndarray]] = [{} for _ in bins]
    for row, (t, b) in enumerate(pairs):
        hists[t][b] = host[row]
    return hists


def _band(high: np.ndarray, lows: dict[int, np.ndarray], r_hi: int, r_lo: int) -> Band:
    v_hi, t_hi = threshold_from_hists(high, r_hi, lows.__getitem__)
    v_lo, t_lo = threshold_from_hists(high, r_lo, lows.__getitem__)
    return Band(v_hi, t_hi, v_lo, t_lo)


def tensor_bands(stream: TensorStream, params: Mapping, n_models: int, backend: Backend) -> list[Band]:
    """One band per task vector over this tensor: ranks floor(outliers n)+1 .. + floor(density n).

    A tensor of one chunk is read once (the chunk is kept) and scanned twice. A tensor of several
    chunks is read once too when every band edge falls inside the window of high bins the first chunk
    predicts (``_hist_windowed``); otherwise a second read collects the missing low histograms. Either
    way the histograms, hence the bands, are exact and the same."""
    ranks = [band_ranks(params, stream.job.numel, t) for t in range(n_models)]
    if len(stream.ranges) == 1:
        highs = _hist_high(stream, n_models, backend)
        bins = [edge_bins(highs[t], *ranks[t]) for t in range(n_models)]
        lows = _hist_low(stream, bins, backend)
    else:
        highs, lows = _hist_windowed(stream, ranks, backend)
        missing = [[b for b in edge_bins(highs[t], *ranks[t]) if b not in lows[t]] for t in range(n_models)]
        if any(missing):
            for t, extra in enumerate(_hist_low(stream, missing, backend)):
                lows[t].update(extra)
    return [_band(highs[t], lows[t], *ranks[t]) for t in range(n_models)]


WINDOW = 4  # high bins kept on each side of an edge's estimate: +-3% in |x| (a bin spans 2^-7)


def window_bins(sample: np.ndarray, ranks: tuple[int, int], n: int) -> np.ndarray:
    """High bins around where each band edge falls, estimated from the histogram of a sample (the
    first chunk) of a tensor of ``n`` elements: the bin of the sample's rank r * size / n, +-WINDOW."""
    size = int(sample.sum())
    bins: set[int] = set()
    for r in ranks:
        if 0 < r < n and size:
            b = high_bin(sample, min(size, max(1, round(r * size / n))))[0]
            bins.update(range(max(0, b - WINDOW), min(HIST, b + WINDOW + 1)))
    return np.array(sorted(bins), np.int64)


def _hist_windowed(
    stream: TensorStream, ranks: list[tuple[int, int]], backend: Backend
) -> tuple[np.ndarray, list[dict[int, np.ndarray]]]:
    """High histograms, and low histograms of the bins the first chunk predicts to hold the band
    edges, in one read of the tensor (the first chunk is scanned twice: to predict, then to count)."""
    T, ws = len(ranks), stream.ws  # counts live where the chunks do (a resident stream: the device)
    highs = ws.counts((T, HIST))
    slots = np.full((T, HIST), -1, np.int32)
    windows, lows = [], []
    for k in range(len(stream.ranges)):
        tau = stream.read(k).tau
        for t in range(T):
            if k == 0:
                sample = ws.counts((HIST,))
                backend.abs_hist_high(tau[t], sample)
                windows.append(window_bins(ws.to_host(sample), ranks[t], stream.job.numel))
                slots[t, windows[t]] = np.arange(windows[t].size, dtype=np.int32)
                lows.append(ws.counts((windows[t].size, HIST)))
            backend.abs_hist_high_low(tau[t], highs[t], slots[t], lows[t])
    lows = [ws.to_host(low) for low in lows]
    return ws.to_host(highs), [{int(b): lows[t][i] for i, b in enumerate(windows[t])} for t in range(T)]


@dataclass(frozen=True)
class GlobalBands:
    """Per tensor: one band per task vector, cut from the whole model's ranking; and how many
    entries each tensor keeps (the size of a sparse patch)."""

    bands: dict[str, list[Band]]
    counts: dict[str, int]

    def fresh(self, name: str) -> list[Band]:
        """The bands of ``name`` with new tie counters (each pass over a tensor counts from zero)."""
        return fresh(self.bands[name])


def global_bands(
    jobs: Sequence[TensorJob],
    open_stream: Callable[[TensorJob], TensorStream],
    params: Mapping,
    n_models: int,
    backend: Backend,
    pmap: Callable[[Callable, list], list],
) -> GlobalBands:
    """One band per model over ALL ``jobs``, ties broken in (plan order, index) order.

    Pass 1 sums per-tensor high histograms; pass 2 collects each tensor's low histogram inside the
    edge bins. Per-tensor histograms are kept sparse (non-empty bins only), so memory stays small for
    models with hundreds of tensors. A tensor's share of the ties at an edge is what is left of the
    global tie budget after the tensors before it in plan order. ``pmap`` runs a function over the
    jobs (in parallel) and returns the results in job order, so sums are taken in plan order.
    """
    T = n_models

    def pass_high(job: TensorJob) -> list[tuple[np.ndarray, np.ndarray]]:
        hist = _hist_high(open_stream(job), T, backend)
        return [sparse(hist[t]) for t in range(T)]

    per_job_high = pmap(pass_high, list(jobs))
    highs = np.zeros((T, HIST), np.int64)
    for job_high in per_job_high:
        for t, (idx, cnt) in enumerate(job_high):
            highs[t, idx] += cnt
    n = sum(j.numel for j in jobs)
    r_hi, r_lo = band_ranks(params, n)
    bins = [edge_bins(highs[t], r_hi, r_lo) for t in range(T)]

    def pass_low(job: TensorJob) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
        hists = _hist_low(open_stream(job), bins, backend)
        return [{b: sparse(h) for b, h in hists[t].items()} for t in range(T)]

    per_job_low = pmap(pass_low, list(jobs))
    result: dict[str, list[Band]] = {j.name: [] for j in jobs}
    counts = {j.name: 0 for j in jobs}
    for t in range(T):
        lows = {b: np.zeros(HIST, np.int64) for b in bins[t]}
        for job_low in per_job_low:
            for b, (idx, cnt) in job_low[t].items():
                lows[b][idx] += cnt
        edges = _band(highs[t], lows, r_hi, r_lo)
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
            counts[job.name] += in_lo - in_hi  # T == 1 for patches
    return GlobalBands(result, counts)


def gram(stream: TensorStream, over: str, backend: Backend) -> np.ndarray:
    """G[s, t] = <x_s, x_t> over the whole tensor (float64, upper triangle), x = the inputs or the
    task vectors (the models themselves when there is no base, hence no task vectors)."""
    size = len(stream.job.in_dtypes) if over == "inputs" else stream.n_models
    g = np.zeros((size, size), np.float64)
    for k in range(len(stream.ranges)):
        chunk = stream.read(k)
        vectors = chunk.inputs if over == "inputs" or chunk.tau is None else chunk.tau
        backend.gram_accumulate(vectors, g)
    return g


def l1_rescale(stream: TensorStream, sparsify: Callable[[object], None], n_models: int) -> np.ndarray:
    """``rescale: l1`` (mergekit's rescale of DARE, DELLA, TIES and breadcrumbs): per task vector
    ||tau||_1 / ||sparsified tau||_1 over the whole tensor (float64 sums), 1 where either is below
    1e-7 (as mergekit). The sparsify stage is reproducible (rank bands, counter-based masks), so the
    apply pass masks the same entries; ``sparsify`` must bring its own tie counters (``ranks.fresh``).
    The sums run on the host, element by element in index order (numba's ``l1_accumulate`` whatever
    the backend), so neither the chunking nor the device changes them."""
    from surgery.kernels.cpu import l1_accumulate

    before = np.zeros(n_models, np.float64)
    after = np.zeros(n_models, np.float64)
    for k in range(len(stream.ranges)):
        chunk = stream.take(k)  # sparsify masks tau in place
        l1_accumulate(np.ascontiguousarray(stream.ws.to_host(chunk.tau)), before)
        sparsify(chunk)
        l1_accumulate(np.ascontiguousarray(stream.ws.to_host(chunk.tau)), after)
    ok = (before >= 1e-7) & (after >= 1e-7)
    return np.where(ok, before / np.where(ok, after, 1.0), 1.0).astype(np.float32)


def update_l1(
    stream: TensorStream,
    merged_update: Callable[[object, np.ndarray], np.ndarray],
    backend: Backend,
    zeros: Callable[[int], np.ndarray],
    scratch: Callable[[int], np.ndarray],
) -> np.ndarray:
    """[||sum_t tau_t||_1, ||update_merged||_1] of one tensor (float64), for LiNeS' automatic alpha.

    ``merged_update(chunk, tmp)`` returns the merged update of a chunk (it may mask tau in place, so
    the sum of the task vectors is taken first); ``tmp`` is a scratch row it may use.
    ``scratch(count)`` gives a [1 + T, count] float32 buffer where the stream's chunks live.
    """
    acc = np.zeros(2, np.float64)
    ones = np.ones(stream.n_models, np.float32)
    for k in range(len(stream.ranges)):
        chunk = stream.take(k)
        tmp = scratch(chunk.count)
        base = chunk.inputs[0]
        tau = chunk.tau
        if tau is None:  # the models' differences to the base (tmp[1:] has room for them)
            tau = tmp[1:]
            backend.subtract(chunk.inputs[1:], base, tau)
        backend.combine_sum(zeros(chunk.count), tau, ones, np.float32(1.0), tmp[0])
        backend.l1_accumulate(tmp[:1], acc[0:1])
        update = merged_update(chunk, tmp[0])
        backend.l1_accumulate(update[None], acc[1:2])
    return acc


def key_count(job: TensorJob) -> int:
    """Entries a keyed sparsify stage keeps: floor(density * numel) of a matrix, none of other shapes."""
    return rank_count(float(job.params["density"]), job.numel) if len(job.shape) == 2 else 0


def key_selection(stream: TensorStream, job: TensorJob, key: Callable, backend: Backend) -> np.ndarray:
    """Ascending flat indices of the top ``key_count`` entries of ``key(base tensor, params)``, ties
    by lower index (radix select). Holds the whole base tensor and its key."""
    k = key_count(job)
    if k == 0:
        return np.empty(0, np.int64)
    base = stream.load(0, job.numel, None, n_inputs=1)[0].reshape(job.shape).copy()
    return top_k_indices(backend, key(base, job.params), k)


def patch_counts(patches: list[TensorJob], params, sparsify, bands) -> dict[str, int]:
    """Entries each sparse-patch tensor keeps: its band's count, or a keyed stage's floor(D * numel)."""
    keyed = sparsify is not None and sparsify.key is not None
    if patches and not keyed and params.get("granularity") not in ("per_tensor", "global"):
        raise RecipeError(
            f"a sparse patch ranks per tensor or globally, not {params.get('granularity')}",
            hint="use --granularity per_tensor or global",
        )
    counts = {}
    for job in patches:
        if keyed:
            counts[job.name] = key_count(job)
        elif bands is not None:
            counts[job.name] = bands.counts[job.name]
        else:
            r_hi, r_lo = band_ranks(job.params, job.numel)
            counts[job.name] = r_lo - r_hi
    return counts
