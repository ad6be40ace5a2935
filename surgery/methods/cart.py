"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al., arXiv 2412.12153).

avg = b + mean_t tau_t. For block linear weights: D_t = f_t - avg = tau_t - mean_s tau_s; keep the
rank k = max(1, int(rho r)) truncation of each D_t (exact SVD); out = avg + lambda * sum_t LR_k(D_t).
Other tensors: avg (the key policy's mean with scale 1). Defaults rho 0.12, lambda 2.0 (the paper's
8-task configs). T = 1 gives f_1 exactly; identical fine-tunes give f.
"""

from __future__ import annotations

from typing import Any

RHO = 0.12
LAMBDA = 2.0


def cart_merge(
    base: Any,
    taus: Any,
    *,
    scale: float = LAMBDA,
    rho: float = RHO,
    device: str | None = None,
) -> Any:
    """CART of one matrix (``scale`` is the paper's lambda): ``base`` [m, n], ``taus`` [T, m, n]."""
    from surgery import spectral

    b = spectral.to_torch(base, device)
    tau = spectral.to_torch(taus, b.device)
    n_tasks, m, n = tau.shape
    k = max(1, int(rho * min(m, n)))
    mean = tau.mean(0)
    low_rank = sum(spectral.thin_svd(tau[t] - mean).truncate(k).matrix() for t in range(n_tasks))
    return spectral.like(b + mean + scale * low_rank, base)
