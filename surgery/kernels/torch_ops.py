"""torch twins of the numba kernels in :mod:`surgery.kernels.cpu`, for ``--device cuda``.

Every function takes the same numpy arguments as its numba twin and writes its results into the
same numpy outputs / state arrays in place: inputs go to the device, the math runs there as a few
vectorised torch ops per chunk, the result is copied back. The engine therefore cannot tell the two
backends apart, and the results are bit for bit the numba ones:

* integer / bit kernels (conversions, histograms, rank bands, DARE's random stream) are exact;
* float32 combinations do the numba loop's float32 operations in the same order (an explicit loop
  over the models ``t``, one separate rounding per multiply and add, never a fused or reordered
  reduction over ``t``), and use numba's type promotion for the scalars (a Python float scale is
  float64 there, an ``np.float32`` one float32);
* the two float64 statistics (``gram_accumulate``, ``l1_accumulate``) sum the chunk with torch's
  blocked reductions instead of numba's element-by-element order, so they may differ from numba in
  the last bits (relative error ~1e-15 of the sum of |terms|). Only reduce passes use them (SLERP's
  and Model Stock's Gram, LiNeS' auto alpha), and their results are rounded once to float32.

64-bit unsigned arithmetic (splitmix64) runs on int64: add and multiply wrap the same way, and a
logical right shift is an arithmetic one followed by a mask. Unsigned numpy arrays are viewed as the
signed type of the same width before they reach torch, so every copy is a bit copy.

Every kernel also accepts torch tensors already on its device (the device-resident pipeline of
:mod:`surgery.kernels.resident`): then nothing is copied, outputs are written in place on the device,
and a histogram given as a device tensor is accumulated there (``index_add_`` of int64 ones: exact,
no host synchronisation). Unsigned storage lives on the device as the signed type of the same width.

Importing this module needs torch but not CUDA; :func:`for_device` binds the kernels to a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from surgery.kernels.torch_combine import CombineKernels

_SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}
_ABS = 0x7FFFFFFF  # |x| of a float32 as its bits
_MAX_BITS = 0x7FFFFFFF


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _uniforms(n: int, key: int, start: int, device: torch.device) -> torch.Tensor:
    """u_i = (splitmix64(key + start + i) >> 11) / 2**53 in float64, exact: the numba kernels' draws."""
    z = torch.arange(n, dtype=torch.int64, device=device) + _s64(int(key) + int(start))
    z = z + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    z = z ^ _lsr(z, 31)
    return _lsr(z, 11).to(torch.float64) * (1.0 / 2.0**53)  # m < 2**53: exact in float64


def _row_ranks(a: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Flat descending rank of each |x| bits in its row (0 = largest; equal |x|: lower column first),
    a stable descending sort, as the numba kernels' distinct keys order them."""
    order = torch.sort(a.view(rows, cols), dim=1, descending=True, stable=True).indices
    ranks = torch.arange(cols, device=a.device).expand(rows, cols)
    return torch.empty_like(order).scatter_(1, order, ranks).reshape(-1)


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _numel(x: np.ndarray | torch.Tensor) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else x.size


def _ones(a: torch.Tensor) -> torch.Tensor:
    """int64 ones, one per element of ``a``, without allocating them (a broadcast scalar)."""
    return torch.ones((), dtype=torch.int64, device=a.device).expand(a.numel())


def _count_high_low(a: torch.Tensor, slot: torch.Tensor, hist, lows) -> None:
    """hist[h] += #{|x| bits >> 16 == h}; lows[slot[h], l] += #{|x| bits == (h << 16) | l} for the
    bins with slot[h] >= 0. Device-tensor counts are accumulated on the device (no sync); numpy
    counts get the device's counts added once."""
    if not isinstance(hist, torch.Tensor):
        h = torch.zeros(hist.shape, dtype=torch.int64, device=a.device)
        low = torch.zeros(lows.shape, dtype=torch.int64, device=a.device)
        _count_high_low(a, slot, h, low)
        hist += h.cpu().numpy()
        lows += low.cpu().numpy()
        return
    high = (a >> 16).long()
    hist.index_add_(0, high, _ones(a))
    if lows.shape[0]:
        slots = slot[high]
        flat = slots.clamp(min=0) * 0x10000 + (a & 0xFFFF).long()
        lows.view(-1).index_add_(0, flat, (slots >= 0).to(torch.int64))


def _in_top(a: torch.Tensor, v: int, ties: int, seen: int) -> tuple[torch.Tensor | bool, int]:
    """(mask of elements in the top r, number equal to v) for one (v, ties) threshold.

    Equal elements are in while fewer than ``ties`` equal ones came before them, counting the
    ``seen`` of earlier chunks. A bool mask means every / no element.
    """
    v = int(v)
    if v < 0:  # "every element"; |x| bits are >= 0, so none equals v
        return True, 0
    if v > _MAX_BITS:  # "no element"
        return False, 0
    greater = a > v
    equal = a == v
    n_equal = int(equal.sum())
    budget = int(ties) - int(seen)  # equal elements of this chunk still in
    if n_equal == 0 or budget <= 0:
        return greater, n_equal
    if budget >= n_equal:
        return greater | equal, n_equal
    before = torch.cumsum(equal, 0, dtype=torch.int32)  # inclusive running count
    return greater | (equal & (before <= budget)), n_equal


@dataclass(frozen=True)
class TorchKernels(CombineKernels):
    """The kernel table bound to one torch device (same names and signatures as ``cpu.py``; the
    float32 combinations come from ``CombineKernels``)."""

    device: torch.device

    # -- transfers --------------------------------------------------------------------------------
    def _dev(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        """numpy -> tensor on the device, unsigned ints as the signed type of the same width (bits);
        a tensor already on the device is used as it is."""
        if isinstance(a, torch.Tensor):
            return a.to(self.device)
        a = np.asarray(a)
        if a.dtype in _SIGNED:
            a = a.view(_SIGNED[a.dtype])
        if not a.flags.writeable:  # torch.from_numpy needs a writeable buffer
            a = a.copy()
        return torch.from_numpy(a).to(self.device)

    @staticmethod
    def _put(out: np.ndarray | torch.Tensor, t: torch.Tensor) -> None:
        """Copy a device result into the engine's buffer (bits for unsigned outputs): a numpy array
        on the host, or in place on the device for a device tensor."""
        if isinstance(out, torch.Tensor):
            out.copy_(t.reshape(out.shape))
            return
        if out.dtype in _SIGNED:
            out = out.view(_SIGNED[out.dtype])
        torch.from_numpy(out).copy_(t.reshape(out.shape))

    def _scalar(self, value: object, dtype: torch.dtype) -> torch.Tensor:
        """A 0-dim device tensor (exact: values are float32 or float64 already). Filled on the
        device: a host tensor copied over would make a CUDA stream wait (pageable memory)."""
        return torch.full((), float(value), dtype=dtype, device=self.device)

    def _scalars(self, w: np.ndarray, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-model weights as 0-dim device tensors of ``dtype`` (always a widening: exact)."""
        return [self._scalar(v, dtype) for v in np.asarray(w).reshape(-1)]

    def _zero(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=self.device)

    # -- dtype conversion -------------------------------------------------------------------------
    def cast_in(self, raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
        """F16 / F64 storage -> float32 (exact for F16, one round-to-nearest-even for F64)."""
        self._put(out, self._dev(raw).to(torch.float32))

    def cast_out(self, x: np.ndarray, dtype: str, out: np.ndarray) -> None:
        """float32 -> F32 (a copy) or F16 storage (round to nearest even, overflow to inf)."""
        self._put(out, self._dev(x).to(torch.float32 if dtype == "F32" else torch.float16))

    def bf16_to_f32(self, src: np.ndarray, dst: np.ndarray) -> None:
        """bf16 bits -> float32: the bits become the high half (little-endian pair (0, bits))."""
        s = self._dev(src).reshape(-1)
        pair = torch.stack((torch.zeros_like(s), s), dim=-1)
        self._put(dst, pair.view(torch.float32).reshape(-1))

    def f32_to_bf16(self, src_bits: np.ndarray, dst: np.ndarray) -> None:
        """float32 bits -> bf16 bits, round to nearest even; NaN stays a quiet NaN."""
        b = self._dev(src_bits).reshape(-1)
        if b.is_floating_point():  # a float32 device tensor: its bits
            b = b.view(torch.int32)
        is_nan = (b & _ABS) > 0x7F800000
        # The arithmetic shifts keep the low 16 bits of the logical ones, and their results fit
        # int16. No int32 overflow for non-NaN inputs (|bits| + 0x8000 < 2**31); NaN lanes are
        # discarded by the where.
        rounded = (b + (((b >> 16) & 1) + 0x7FFF)) >> 16
        self._put(dst, torch.where(is_nan, (b >> 16) | 0x0040, rounded).to(torch.int16))

    # -- task vectors and exact order statistics --------------------------------------------------
    def subtract(self, models: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
        """out[t] = models[t] - base (float32)."""
        m = self._dev(models)
        b = self._dev(base).reshape(-1)
        self._put(out, m.reshape(m.shape[0], -1) - b)

    def _abs_bits(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x on the device, |x| as int32 bits), both flat."""
        xt = self._dev(x).reshape(-1)
        return xt, xt.view(torch.int32) & _ABS

    def abs_hist_high(self, x: np.ndarray, hist: np.ndarray) -> None:
        """hist[h] += #{i : (|x_i| bits) >> 16 == h}."""
        _, a = self._abs_bits(x)
        if isinstance(hist, torch.Tensor):  # accumulated on the device: no copy, no sync
            hist.index_add_(0, a >> 16, _ones(a))
            return
        counts = torch.bincount(a >> 16, minlength=(_MAX_BITS >> 16) + 1)
        hist[: counts.numel()] += counts.cpu().numpy()

    def abs_hist_low(self, x: np.ndarray, high: int, hist: np.ndarray) -> None:
        """hist[l] += #{i : |x_i| bits == (high << 16) | l}."""
        high = int(high)
        if not 0 <= high <= _MAX_BITS >> 16:
            return
        _, a = self._abs_bits(x)
        if isinstance(hist, torch.Tensor):  # adds 1 inside the bin, 0 elsewhere: no sync
            hist.index_add_(0, a & 0xFFFF, ((a >> 16) == high).to(torch.int64))
            return
        low = a[(a >> 16) == high] & 0xFFFF  # few elements: one high bin
        counts = torch.bincount(low, minlength=0x10000)
        hist[: counts.numel()] += counts.cpu().numpy()

    def abs_hist_high_low(self, x: np.ndarray, hist, slot: np.ndarray, lows) -> None:
        """``abs_hist_high`` plus the low-16-bit histograms of the bins h with ``slot[h] >= 0``."""
        _, a = self._abs_bits(x)
        _count_high_low(a, self._dev(slot).long(), hist, lows)

    def band_mask(
        self, x: np.ndarray, v_hi: int, ties_hi: int, v_lo: int, ties_lo: int, seen: np.ndarray
    ) -> None:
        """Zero every element whose rank is not in (r_hi, r_lo], in place; ``seen`` is carried."""
        xt, a = self._abs_bits(x)
        in_hi, eq_hi = _in_top(a, v_hi, ties_hi, seen[0])
        in_lo, eq_lo = _in_top(a, v_lo, ties_lo, seen[1])
        seen[0] += eq_hi
        seen[1] += eq_lo
        if in_hi is True or in_lo is False:
            x[...] = 0.0  # numpy array or device tensor alike
            return
        if in_hi is False:
            if in_lo is True:
                return
            drop = ~in_lo
        else:
            drop = in_hi if in_lo is True else in_hi | ~in_lo
        self._put(x, torch.where(drop, self._zero(xt.dtype), xt))

    def band_select(
        self, x: np.ndarray, v_hi: int, ties_hi: int, v_lo: int, ties_lo: int, seen: np.ndarray,
        start: int, idx_out: np.ndarray, val_out: np.ndarray,
    ) -> int:  # fmt: skip
        """Emit (start + i, x[i]) for the kept ranks, in index order; return how many."""
        xt, a = self._abs_bits(x)
        in_hi, eq_hi = _in_top(a, v_hi, ties_hi, seen[0])
        in_lo, eq_lo = _in_top(a, v_lo, ties_lo, seen[1])
        seen[0] += eq_hi
        seen[1] += eq_lo
        n = xt.numel()
        lo = torch.full((n,), bool(in_lo), device=xt.device) if isinstance(in_lo, bool) else in_lo
        hi = torch.full((n,), bool(in_hi), device=xt.device) if isinstance(in_hi, bool) else in_hi
        keep = (lo & ~hi).nonzero().reshape(-1)
        k = int(keep.numel())
        idx_out[:k] = (keep + int(start)).cpu().numpy()
        val_out[:k] = xt.reshape(-1)[keep].cpu().numpy()
        return k

    def row_band_mask(self, x: np.ndarray, cols: int, r_hi: int, r_lo: int, keys: np.ndarray) -> None:
        """Per row of ``cols`` elements keep ranks r_hi+1..r_lo, zero the rest (``keys``: unused scratch)."""
        cols, r_hi, r_lo = int(cols), int(r_hi), int(r_lo)
        flat = x.reshape(-1)
        rows = _numel(flat) // cols
        if rows == 0:
            return
        part = flat[: rows * cols]
        xt, a = self._abs_bits(part)
        rank = _row_ranks(a, rows, cols)
        drop = (rank < r_hi) | (rank >= r_lo)
        self._put(part, torch.where(drop, self._zero(xt.dtype), xt))

    # -- DARE: counter-based randomness -----------------------------------------------------------
    def dare_mask(self, x: np.ndarray, density: float, key: int, start: int) -> None:
        """Keep x[i] iff splitmix64(key + start + i) >> 11 < density * 2**53, rescaled by 1/density."""
        density = float(density)
        inv = 1.0 / density  # ZeroDivisionError at 0, as in numba
        xt = self._dev(x).reshape(-1)
        keep = _uniforms(xt.numel(), key, start, xt.device) < density
        scaled = (xt.to(torch.float64) * inv).to(torch.float32)
        self._put(x, torch.where(keep, scaled, self._zero(torch.float32)))

    def della_mask(self, x: np.ndarray, cols: int, density: float, epsilon: float, key: int, start: int,
                   keys: np.ndarray, inverse: bool) -> None:  # fmt: skip
        """DELLA's MAGPRUNE per row (``cpu.della_mask``): keep with p = density - epsilon + 2 epsilon *
        ascending rank / (cols - 1), DARE's random stream; ``inverse``: kept values times 1/p."""
        cols, density, epsilon = int(cols), float(density), float(epsilon)
        rows = _numel(x) // cols
        if rows == 0:
            return
        part = x.reshape(-1)[: rows * cols]
        xt, a = self._abs_bits(part)
        if cols == 1:
            p = torch.full((rows,), density, dtype=torch.float64, device=xt.device)
        else:  # the numba loop's float64 operations, in its order
            ascending = (cols - 1 - _row_ranks(a, rows, cols)).to(torch.float64)
            p = (density - epsilon) + (2.0 * epsilon) * (ascending / float(cols - 1))
        keep = _uniforms(xt.numel(), key, start, xt.device) < p
        kept = (xt.to(torch.float64) * (1.0 / p)).to(torch.float32) if inverse else xt
        self._put(part, torch.where(keep, kept, self._zero(torch.float32)))

    # -- other float32 kernels --------------------------------------------------------------------
    def rescale_update(self, base: np.ndarray, out: np.ndarray, lam: np.float32) -> None:
        """out = base + lam * (out - base) in float32, each op rounded separately as in numba."""
        b = self._dev(base).reshape(-1)
        o = self._dev(out).reshape(-1)
        self._put(out, b + self._scalar(lam, torch.float32) * (o - b))

    def count_nonfinite(self, bits: np.ndarray, exp_mask: int) -> int:
        """How many values are inf or NaN (all exponent bits set); ``bits`` as in ``cpu.py`` (a
        float device tensor is viewed as the integers of its width here)."""
        b = self._dev(bits).reshape(-1)
        if b.is_floating_point():
            b = b.view(_INT_OF_WIDTH[b.element_size()])
        m = int(exp_mask)  # every exponent mask is below the signed maximum of its width
        return int(((b & m) == m).sum())

    # -- float64 statistics (reduction order differs from numba: last-bit differences) ------------
    def gram_accumulate(self, x: np.ndarray, gram: np.ndarray) -> None:
        """gram[s, t] += sum_i x[s, i] * x[t, i] for t >= s, in float64 (upper triangle only)."""
        xt = self._dev(x)
        xd = xt.reshape(xt.shape[0], -1).to(torch.float64)
        g = (xd @ xd.T).cpu().numpy()
        upper = np.triu_indices(xd.shape[0])
        gram[upper] += g[upper]

    def l1_accumulate(self, x: np.ndarray, acc: np.ndarray) -> None:
        """acc[t] += sum_i |x[t, i]| in float64."""
        xt = self._dev(x)
        xt = xt.reshape(xt.shape[0], -1)
        acc += xt.abs().sum(dim=1, dtype=torch.float64).cpu().numpy()


@cache
def _for(device: str) -> TorchKernels:
    return TorchKernels(torch.device(device))


def for_device(device: str | torch.device = "cpu") -> TorchKernels:
    """The kernel table bound to ``device`` ("cpu", "cuda", "cuda:1", ...); one per device."""
    return _for(str(torch.device(device)))
