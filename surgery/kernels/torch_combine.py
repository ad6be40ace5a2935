"""The float32 combinations of the torch twins (``surgery.kernels.torch_ops``), and numba's type
promotion they follow.

Each does the numba loop's float32 operations in the same order: an explicit loop over the models
``t``, one separate rounding per multiply and add, never a fused or reordered reduction over ``t``;
scalars are typed as numba types them (a Python float scale is float64 there, an ``np.float32`` one
float32). A mixin of ``TorchKernels``: it uses that class's transfers (``_dev``, ``_put``,
``_scalar``, ``_scalars``, ``_zero``).
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_FLOAT = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


def _np_dtype(value: object) -> np.dtype:
    """The dtype numba gives an argument: arrays and numpy scalars keep theirs, Python floats are float64."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype
    if isinstance(value, bool):
        return np.dtype(np.bool_)
    if isinstance(value, int):
        return np.dtype(np.int64)
    return np.dtype(np.float64)


_NUMPY_FLOAT = {v: k for k, v in _TORCH_FLOAT.items()}


def _float_type(*dtypes: np.dtype | type | torch.dtype) -> torch.dtype:
    """torch float type of numba's promotion of the operands (numpy rules on dtypes, never on values)."""
    return _TORCH_FLOAT[np.result_type(*(_NUMPY_FLOAT.get(d, d) for d in dtypes))]


class CombineKernels:
    """combine_sum, combine_ties (and mergekit's variant), combine_weighted, combine_model_stock."""

    def _weighted_acc(self, w: np.ndarray, v: np.ndarray, acc_type: torch.dtype) -> torch.Tensor:
        """acc = 0; for t: acc += w[t] * v[t]  (each multiply and add rounded in acc_type)."""
        wt = self._scalars(w, acc_type)
        vt = self._dev(v)
        vt = vt.reshape(vt.shape[0], -1)
        acc = torch.zeros(vt.shape[1], dtype=acc_type, device=vt.device)
        for t in range(vt.shape[0]):
            acc += wt[t] * vt[t].to(acc_type)
        return acc

    def combine_sum(
        self, base: np.ndarray, tau: np.ndarray, weights: np.ndarray, scale: float, out: np.ndarray
    ) -> None:
        """out = base + scale * sum_t w_t * tau_t."""
        acc_type = _float_type(np.float32, weights.dtype, tau.dtype)
        acc = self._weighted_acc(weights, tau, acc_type)
        res_type = _float_type(base.dtype, _np_dtype(scale), acc_type)
        b = self._dev(base).reshape(-1).to(res_type)
        self._put(out, b + self._scalar(scale, res_type) * acc.to(res_type))

    def combine_ties(
        self, base: np.ndarray, tau: np.ndarray, weights: np.ndarray, scale: float, out: np.ndarray
    ) -> None:
        """TIES: s = sign(sum_t tau_t); disjoint weighted mean of the tau_t whose sign is s."""
        self._ties(base, tau, weights, scale, False, True, True, out)

    def combine_ties_variant(self, base, tau, weights, scale, weighted: bool, mean: bool, out) -> None:
        """mergekit's TIES (``cpu.combine_ties_variant``): election on sum_t w_t tau_t (>= 0 elects +)
        or on sum_t tau_t; the agreeing w_t tau_t summed, divided by their weights when ``mean``."""
        self._ties(base, tau, weights, scale, weighted, mean, False, out)

    def _ties(self, base, tau, weights, scale, weighted: bool, mean: bool, paper: bool, out) -> None:
        """``cpu._ties``: the paper's sums start at +0.0 (adding +0.0 where a model is not selected
        leaves them as numba's select does), the variant's at task 0's term."""
        tt = self._dev(tau)
        tt = tt.reshape(tt.shape[0], -1)
        n_models, n = tt.shape
        num_type = _float_type(np.float32, weights.dtype, tau.dtype)
        den_type = _float_type(np.float32, weights.dtype)
        wn = self._scalars(weights, num_type)
        wd = self._scalars(weights, den_type)
        wv = [wn[t] * tt[t].to(num_type) for t in range(n_models)]
        total = torch.zeros(n, dtype=torch.float32, device=tt.device)  # cpu: a float32 block
        for t in range(n_models):  # each add in the operands' type, then stored in float32
            total = (total + (wv[t] if weighted else tt[t])).to(torch.float32)
        zero_num, zero_den = self._zero(num_type), self._zero(den_type)
        num = torch.zeros(n, dtype=num_type, device=tt.device) if paper else None
        den = torch.zeros(n, dtype=den_type, device=tt.device) if paper else None
        for t in range(n_models):
            if weighted:  # a NaN total elects -, as numba's select
                agrees = torch.where(total >= 0, wv[t] > 0, wv[t] < 0)
            else:  # a NaN or zero total: nothing agrees
                agrees = ((tt[t] > 0) & (total > 0)) | ((tt[t] < 0) & (total < 0))
            term_num = torch.where(agrees, wv[t], zero_num)
            term_den = torch.where(agrees, wd[t].expand(n), zero_den)
            num = term_num if num is None else num + term_num
            den = term_den if den is None else den + term_den
        q_type = _float_type(num_type, den_type)
        merged = num.to(q_type)
        if mean:
            merged = merged / torch.where(den != 0, den, self._scalar(1.0, den_type)).to(q_type)
        if paper:
            merged = torch.where(den != 0, merged, self._zero(q_type))
        res_type = _float_type(base.dtype, _np_dtype(scale), q_type)
        b = self._dev(base).reshape(-1).to(res_type)
        self._put(out, b + self._scalar(scale, res_type) * merged.to(res_type))

    def combine_weighted(self, models: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        """out = sum_t w_t * models_t."""
        acc_type = _float_type(np.float32, weights.dtype, models.dtype)
        self._put(out, self._weighted_acc(weights, models, acc_type))

    def combine_model_stock(self, base: np.ndarray, models: np.ndarray, k: float, out: np.ndarray) -> None:
        """out = k * mean_t f_t + (1 - k) * base."""
        mt = self._dev(models)
        mt = mt.reshape(mt.shape[0], -1)
        n_models, n = mt.shape
        k_np = _np_dtype(k)
        acc_type = _float_type(np.float32, models.dtype)
        acc = torch.zeros(n, dtype=acc_type, device=mt.device)
        for t in range(n_models):
            acc += mt[t].to(acc_type)
        inv_t = np.float32(1.0) / np.float32(n_models)  # float32, as numba
        mean_type = _float_type(acc_type, np.float32)
        mean = acc.to(mean_type) * self._scalar(inv_t, mean_type)
        left_type = _float_type(k_np, mean_type)
        left = self._scalar(k, left_type) * mean.to(left_type)
        omk_type = _float_type(np.float32, k_np)
        one_minus_k = np.float64(1.0) - np.float64(k) if omk_type == torch.float64 else np.float32(1.0) - k
        right_type = _float_type(omk_type, base.dtype)
        right = self._scalar(one_minus_k, right_type) * self._dev(base).reshape(-1).to(right_type)
        res_type = _float_type(left_type, right_type)
        self._put(out, left.to(res_type) + right.to(res_type))
