#!/usr/bin/env python3
"""Per-element cost of the numba kernels a merge's passes call, on one compute chunk.

    python benchmarks/bench_kernels.py [--elements 1048576] [--repeat 20] [--json OUT]

Builds a chunk as a merge sees it: a bf16 base and two bf16 fine-tunes (updates ~5% of the weights'
scale), decoded to float32 and turned into task vectors; the band edges are real rank edges of those
task vectors (density 0.2; breadcrumbs also drops the top 1%), so the many exact magnitude ties of
bf16 differences are there as in a real tensor. Prints nanoseconds per element of the chunk for each
kernel call (a call over both task vectors counts once), median of ``--repeat`` timed calls after a
warm-up. One thread: a merge runs one such call per worker thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from surgery.kernels import cpu
from surgery.ranks import NONE_ABOVE, threshold_from_hists
from surgery.reduce import window_bins
from surgery.stream import COMPUTE_CHUNK


def _edge(x: np.ndarray, hist: np.ndarray, r: int) -> tuple[int, int]:
    """(v, ties) of rank r, by the radix select the engine uses (``ranks.threshold_from_hists``)."""

    def low(b: int) -> np.ndarray:
        h = np.zeros(1 << 16, np.int64)
        cpu.abs_hist_low(x, b, h)
        return h

    return threshold_from_hists(hist, r, low)


def chunk(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 0.02).astype(np.float32)
    raw = np.empty((3, n), np.uint16)
    for i, x in enumerate([base, *(base + rng.standard_normal(n).astype(np.float32) * 1e-3 for _ in "ab")]):
        cpu.f32_to_bf16(np.ascontiguousarray(x).view(np.uint32), raw[i])
    dec = np.empty((3, n), np.float32)
    for i in range(3):
        cpu.bf16_to_f32(raw[i], dec[i])
    tau = np.empty((2, n), np.float32)
    cpu.subtract(dec[1:], dec[0], tau)
    return raw, dec, tau


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=COMPUTE_CHUNK)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.elements
    raw, dec, tau = chunk(n)
    hist = np.zeros(1 << 16, np.int64)
    cpu.abs_hist_high(tau[0], hist)
    (v_top, t_top), (v_lo, t_lo) = _edge(tau[0], hist, n // 100), _edge(tau[0], hist, n // 5)
    window = window_bins(hist, (0, n // 5), n)
    slot = np.full(1 << 16, -1, np.int32)
    slot[window] = np.arange(window.size, dtype=np.int32)
    lows = np.zeros((window.size, 1 << 16), np.int64)
    weights = np.ones(2, np.float32)
    out, out16, work = np.empty(n, np.float32), np.empty(n, np.uint16), np.empty_like(tau)
    one = np.float32(1.0)  # the scale, typed as the engine passes it

    def masked(kernel, *edges):
        def run():
            np.copyto(work, tau)  # the kernels mask in place: start from the same values every time
            for t in range(2):
                kernel(work[t], *edges, np.zeros(2, np.int64))

        return run

    calls = {
        "decode bf16 (3 inputs)": lambda: [cpu.bf16_to_f32(raw[i], dec[i]) for i in range(3)],
        "subtract (2 task vectors)": lambda: cpu.subtract(dec[1:], dec[0], tau),
        "abs_hist_high_low (2)": lambda: [cpu.abs_hist_high_low(tau[t], hist, slot, lows) for t in range(2)],
        "copy of 2 task vectors (in the band rows)": lambda: np.copyto(work, tau),
        "band_mask top-k (2) + copy": masked(cpu.band_mask, NONE_ABOVE, 0, v_lo, t_lo),
        "band_mask breadcrumbs band (2) + copy": masked(cpu.band_mask, v_top, t_top, v_lo, t_lo),
        "dare_mask (2)": lambda: [cpu.dare_mask(work[t], 0.2, np.uint64(7), 0) for t in range(2)],
        "combine_sum": lambda: cpu.combine_sum(dec[0], tau, weights, one, out),
        "combine_ties (dense task vectors)": lambda: cpu.combine_ties(dec[0], tau, weights, one, out),
        "combine_ties_variant (mergekit: weighted election)": (
            lambda: cpu.combine_ties_variant(dec[0], tau, weights, one, True, True, out)
        )
        if hasattr(cpu, "combine_ties_variant")
        else None,
        "encode bf16": lambda: cpu.f32_to_bf16(out.view(np.uint32), out16),
        "count_nonfinite": lambda: cpu.count_nonfinite(out16, np.uint16(0x7F80)),
    }
    rows = []
    for name, call in calls.items():
        if call is None:  # a kernel this version of surgery does not have
            continue
        call()  # compile / warm the caches
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        ns = statistics.median(times) / n * 1e9
        rows.append({"kernel": name, "ns_per_element": round(ns, 3)})
        print(f"{name:45s} {ns:7.2f} ns/element", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"elements": n, "repeat": args.repeat, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
