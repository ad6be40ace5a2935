"""The numba kernels' building blocks against torch and numpy."""

from __future__ import annotations

import numpy as np
import torch

from surgery.kernels import cpu, get_backend
from surgery.ranks import band_ranks, rank_count, threshold_from_hists


def special_floats(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-40, 38, n).astype(np.float64)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    x[:12] = [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.0039062, 1.0117188, 3.4e38, 1e-39, 1.5, -2.5]
    return x


def test_bf16_round_trip_matches_torch():
    x = special_floats(100_000)
    bits = np.empty(x.size, np.uint16)
    cpu.f32_to_bf16(x.view(np.uint32), bits)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    back = np.empty(x.size, np.float32)
    cpu.bf16_to_f32(bits, back)
    np.testing.assert_array_equal(back, torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float())


def test_bf16_nan_stays_nan():
    x = np.array([np.nan, -np.nan], np.float32)
    bits = np.empty(2, np.uint16)
    cpu.f32_to_bf16(x.view(np.uint32), bits)
    back = np.empty(2, np.float32)
    cpu.bf16_to_f32(bits, back)
    assert np.isnan(back).all()


def test_radix_threshold_is_exact_order_statistic():
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal(50_000) * 30).astype(np.float32) / 30  # many ties
    hist = np.zeros(65536, np.int64)
    cpu.abs_hist_high(x, hist)
    n = x.size
    for r in (0, 1, 7, 1000, 25_000, n - 1, n):

        def low(b):
            h = np.zeros(65536, np.int64)
            cpu.abs_hist_low(x, b, h)
            return h

        v, ties = threshold_from_hists(hist, r, low)
        bits = (x.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)
        order = np.lexsort((np.arange(n), -bits))
        in_top = np.zeros(n, bool)
        in_top[order[:r]] = True
        seen = np.cumsum(bits == v) - 1
        mine = (bits > v) | ((bits == v) & (seen < ties))
        np.testing.assert_array_equal(mine, in_top, err_msg=f"r={r}")


def _edge(bits_sorted_desc: np.ndarray, r: int) -> tuple[int, int]:
    """(v, ties) of rank r as radix select gives them: v = |x| bits of the r-th largest, ties = how many
    elements equal to v are among the top r (v = -1: every element; 2**32: none)."""
    if r == 0:
        return 2**32, 0
    if r == bits_sorted_desc.size:
        return -1, 0
    v = int(bits_sorted_desc[r - 1])
    return v, int((bits_sorted_desc[:r] == v).sum())


def test_band_mask_keeps_exactly_the_rank_band_in_any_chunking():
    """Ranks from a stable sort (larger |x| first, then lower index), against the blocked kernel: many
    ties (bf16-like steps), a tensor of several 4096-element blocks, chunks that split blocks, and tie
    budgets that run out inside a block, at a block's edge, or never."""
    rng = np.random.default_rng(3)
    n = 3 * 4096 + 517
    x = (np.round(rng.standard_normal(n) * 6) / 64).astype(np.float32)
    x[rng.random(n) < 0.05] = -0.0
    bits = (x.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)
    order = np.lexsort((np.arange(n), -bits))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(1, n + 1)
    desc = bits[order]
    for r_hi, r_lo in [(0, 2000), (0, n // 2), (150, 9000), (0, n), (0, 0), (n, n), (1, n - 1), (4096, 8192)]:
        (v_hi, t_hi), (v_lo, t_lo) = _edge(desc, r_hi), _edge(desc, r_lo)
        want = np.where((rank > r_hi) & (rank <= r_lo), x, np.float32(0))
        for cuts in ([], [4096, 8192], [1, 4095, 5000, 12_300], list(range(777, n, 777))):
            y, seen = x.copy(), np.zeros(2, np.int64)
            for part in np.split(y, cuts):
                cpu.band_mask(part, v_hi, t_hi, v_lo, t_lo, seen)
            np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32), err_msg=f"{r_hi} {r_lo}")
            ties = [(v_hi, t_hi), (v_lo, t_lo)]
            assert list(seen) == [int((bits == v).sum()) if 0 <= v < 2**31 else 0 for v, _ in ties]


def test_row_band_mask_quickselect():
    rng = np.random.default_rng(2)
    rows, cols = 40, 97
    x = np.round(rng.standard_normal(rows * cols) * 8).astype(np.float32)
    keys = np.empty(cols, np.uint64)
    for r_hi, r_lo in [(0, 10), (3, 30), (0, cols), (5, 5), (0, 0)]:
        y = x.copy()
        cpu.row_band_mask(y, cols, r_hi, r_lo, keys)
        for r in range(rows):
            row = x[r * cols : (r + 1) * cols]
            order = np.lexsort((np.arange(cols), -np.abs(row)))
            keep = np.zeros(cols, bool)
            keep[order[r_hi:r_lo]] = True
            np.testing.assert_array_equal(y[r * cols : (r + 1) * cols], np.where(keep, row, 0))


def test_rank_count_is_exact_for_decimals():
    assert rank_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert rank_count(0.1, 1000) == 100
    assert rank_count(0.01, 50) == 0
    assert band_ranks({"density": 0.9, "outliers": 0.2}, 10) == (2, 10)  # capped at n


def test_decode_encode_f16_and_f32():
    be = get_backend("cpu")
    x = special_floats(1000).astype(np.float16)
    dec = be.decode(x.view(np.float16), "F16", np.empty(1000, np.float32))
    np.testing.assert_array_equal(dec, x.astype(np.float32))
    enc = be.encode(dec, "F16", np.empty(1000, np.float16))
    np.testing.assert_array_equal(enc.view(np.uint16), x.view(np.uint16))


def _ties_variant_reference(base, tau, w, scale, weighted, mean):
    """mergekit's TIES in numpy, whole arrays (the formula of ``surgery.methods.ties``)."""
    wt = tau * w[:, None]
    if weighted:
        total = np.zeros(base.size, np.float32)
        for t in range(len(w)):
            total += wt[t]
        selected = np.where(total >= 0, wt > 0, wt < 0)
    else:
        total = tau.sum(axis=0, dtype=np.float32)
        selected = ((tau > 0) & (total > 0)) | ((tau < 0) & (total < 0))
    num = np.where(selected, wt, np.float32(0)).sum(axis=0, dtype=np.float32)
    if mean:
        den = np.where(selected, w[:, None], np.float32(0)).sum(axis=0, dtype=np.float32)
        num = num / np.where(den == 0, np.float32(1), den)
    return base + np.float32(scale) * num


def test_ties_variant_kernel_equals_the_numpy_formula_bit_for_bit():
    """Weighted / plain election x mean / sum, with weights that cancel (a zero divisor), a zero weight,
    exact zero sums, -0.0, inf and NaN, over several 4096-element blocks and in chunks."""
    rng = np.random.default_rng(5)
    n = 2 * 4096 + 300
    tau = (rng.integers(-3, 4, size=(3, n)) * 0.25).astype(np.float32)
    tau[:, :40] = np.float32([[1.0], [-1.0], [0.0]])  # plain sums of exactly zero
    tau[0, 40:50], tau[1, 50:55], tau[2, 55:60] = -0.0, np.inf, np.nan
    base = rng.standard_normal(n).astype(np.float32)
    base[60:70] = -0.0
    for w in ([1.0, -1.0, 0.5], [0.0, 1.0, 2.0], [0.3, 0.3, 0.4]):
        w = np.asarray(w, np.float32)
        for weighted in (False, True):
            for mean in (False, True):
                want = _ties_variant_reference(base, tau, w, 0.8, weighted, mean)
                out = np.full(n, 7.0, np.float32)
                for s, e in [(0, 100), (100, 4200), (4200, n)]:
                    t = np.ascontiguousarray(tau[:, s:e])
                    cpu.combine_ties_variant(base[s:e], t, w, np.float32(0.8), weighted, mean, out[s:e])
                np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
