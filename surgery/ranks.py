"""Exact order statistics by radix select over float bit patterns, streamable over chunks.

|x| of a float32 viewed as uint32 (sign bit cleared) is monotone in |x|, so the element of rank r
(1 = largest) is found from a 65,536-bin histogram of the high 16 bits, then of the low 16 bits inside
the bin that holds it: two streaming passes, no copy, no sort. Ties are broken by lower index: with
``(v, ties)`` from :func:`threshold_from_hists`, the top r elements are those with bits > v plus the
first ``ties`` elements whose bits equal v, counted in index order across chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

NONE_ABOVE = 2**32  # threshold meaning "no element is in the top r" (r = 0)
ALL = -1  # threshold meaning "every element is in the top r" (r = n)
HIST = 65536


def rank_count(fraction: float, n: int) -> int:
    """floor(fraction * n), exact for the decimal the user wrote (0.29 * 100 is 29, not 28)."""
    return math.floor(Fraction(repr(float(fraction))) * n)


def per_model(value, model: int):
    """A parameter given once, or as one value per model (mergekit's per-model density)."""
    return value[model] if isinstance(value, list | tuple) else value


def band_ranks(params: dict, n: int, model: int = 0) -> tuple[int, int]:
    """(r_hi, r_lo): keep ranks r_hi+1..r_lo, i.e. drop the top ``outliers``, keep ``density``
    (each may be one value per model)."""
    r_hi = rank_count(per_model(params.get("outliers", 0.0), model), n)
    return r_hi, min(n, r_hi + rank_count(per_model(params["density"], model), n))


def high_bin(hist: np.ndarray, r: int) -> tuple[int, int]:
    """Bin holding the r-th largest value (1-based) and how many values lie in higher bins."""
    rev = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(rev, r))
    b = HIST - 1 - idx
    return b, int(rev[idx] - hist[b])


def edge_bins(hist_high: np.ndarray, r_hi: int, r_lo: int) -> list[int]:
    """The high bins holding the band edges r_hi and r_lo (none for r = 0 or r = n)."""
    n = int(hist_high.sum())
    return sorted({high_bin(hist_high, r)[0] for r in (r_hi, r_lo) if 0 < r < n})


def threshold_from_hists(hist_high: np.ndarray, r: int, low_hist_for: Callable) -> tuple[int, int]:
    """(v, ties): the top r elements are those with |x| bits > v, plus the first ``ties`` equal."""
    n = int(hist_high.sum())
    if r <= 0:
        return NONE_ABOVE, 0
    if r >= n:
        return ALL, 0
    b, above = high_bin(hist_high, r)
    low = low_hist_for(b)
    lb, above_low = high_bin(low, r - above)
    return (b << 16) | lb, r - above - above_low


@dataclass
class Band:
    """Per model: the (v, ties) of both band edges for one group, and the tie counters."""

    v_hi: int
    ties_hi: int
    v_lo: int
    ties_lo: int
    seen: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))


def fresh(bands: Sequence[Band]) -> list[Band]:
    """The same bands with new tie counters: each pass over a tensor counts its ties from zero."""
    return [Band(b.v_hi, b.ties_hi, b.v_lo, b.ties_lo) for b in bands]


def sparse(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(hist)
    return idx, hist[idx]


def count_at(lows: dict[int, tuple[np.ndarray, np.ndarray]], v: int) -> int:
    """How many elements have |x| bits == v, from sparse low histograms of the edge bins."""
    if v < 0 or v >= NONE_ABOVE:
        return 0
    sparse = lows.get(v >> 16)
    if sparse is None:
        return 0
    idx, cnt = sparse
    hit = np.flatnonzero(idx == (v & 0xFFFF))
    return int(cnt[hit[0]]) if hit.size else 0


def count_above(
    high: tuple[np.ndarray, np.ndarray], lows: dict[int, tuple[np.ndarray, np.ndarray]], v: int, n: int
) -> int:
    """How many elements have |x| bits > v (v = -1: all, v = 2**32: none)."""
    if v < 0:
        return n
    if v >= NONE_ABOVE:
        return 0
    idx, cnt = high
    above = int(cnt[idx > (v >> 16)].sum())
    low_idx, low_cnt = lows[v >> 16]  # the edge bin of v always has a low histogram
    return above + int(low_cnt[low_idx > (v & 0xFFFF)].sum())


def top_k_indices(backend, x: np.ndarray, k: int) -> np.ndarray:
    """Ascending flat indices of the k largest |x| of an in-memory array, ties by lower index
    (``backend``: a ``surgery.kernels.Backend``; two histogram passes and one select)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    k = max(0, min(int(k), x.size))
    high = np.zeros(HIST, np.int64)
    backend.abs_hist_high(x, high)
    lows = {b: np.zeros(HIST, np.int64) for b in edge_bins(high, 0, k)}
    for b, hist in lows.items():
        backend.abs_hist_low(x, b, hist)
    v, ties = threshold_from_hists(high, k, lows.__getitem__)
    band = Band(NONE_ABOVE, 0, v, ties)
    idx, val = np.empty(k, np.int64), np.empty(k, np.float32)
    n = int(backend.band_select(x, band.v_hi, band.ties_hi, band.v_lo, band.ties_lo, band.seen, 0, idx, val))
    assert n == k, (n, k)
    return idx


def group_bands(streams: Sequence[Callable[[], Iterable[np.ndarray]]], k: int, backend,
                pmap: Callable = lambda f, items: list(map(f, items))) -> list[Band]:  # fmt: skip
    """Top-k largest |x| over a group of tensors, each read as a stream of chunks (``streams[i]()``
    yields tensor i's chunks in index order), ties by (tensor order, index): per tensor, the Band
    that selects its part (``v_lo``, its share of the ties). Two passes; ``pmap`` may run the tensors
    in parallel (it must return results in order)."""

    def high(stream: Callable) -> tuple[np.ndarray, np.ndarray]:
        hist = np.zeros(HIST, np.int64)
        for x in stream():
            backend.abs_hist_high(x, hist)
        return sparse(hist)

    highs = pmap(high, streams)
    total = np.zeros(HIST, np.int64)
    for idx, cnt in highs:
        total[idx] += cnt
    bins = edge_bins(total, 0, k)

    def low(stream: Callable) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        hists = {b: np.zeros(HIST, np.int64) for b in bins}
        if bins:
            for x in stream():
                for b, hist in hists.items():
                    backend.abs_hist_low(x, b, hist)
        return {b: sparse(h) for b, h in hists.items()}

    lows = pmap(low, streams)
    low_total = {b: np.zeros(HIST, np.int64) for b in bins}
    for part in lows:
        for b, (idx, cnt) in part.items():
            low_total[b][idx] += cnt
    v, ties = threshold_from_hists(total, k, low_total.__getitem__)
    bands = []
    for part in lows:  # the tensors before take their equal elements first (lower position)
        equal = count_at(part, v)
        bands.append(Band(NONE_ABOVE, 0, v, min(ties, equal)))
        ties = max(0, ties - equal)
    return bands
