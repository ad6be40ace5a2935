"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al., arXiv 2412.12153).

avg = b + mean_t tau_t. For block linear weights: D_t = f_t - avg = tau_t - mean_s tau_s; keep the
rank k = max(1, int(rho r)) truncation of each D_t (exact SVD); out = avg + lambda * sum_t LR_k(D_t).
Other tensors: avg (the key policy's mean with scale 1). Defaults rho 0.12, lambda 2.0 (the paper's
8-task configs). T = 1 gives f_1 exactly; identical fine-tunes give f.
"""

from __future__ import annotations

from typing import Any

from surgery.methods.per_matrix import KEY_POLICY, combine_for, require_torch
from surgery.methods.spec import Method, Param

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


CART = Method(
    name="cart",
    title="CART (centered arithmetic with rank-reduced task vectors)",
    paper="https://arxiv.org/abs/2412.12153",
    formula="avg = b + mean_t tau_t; per block matrix: avg + scale * sum_t LR_k(f_t - avg), "
    "k = max(1, int(rho r)); other tensors: avg",
    combine=combine_for(
        "cart", cart_merge, lambda p: {"scale": p["scale"], "rho": p["rho"]}, adds_update=False
    ),
    params=(
        Param("scale", "float", LAMBDA, "CART's lambda: multiplier of the summed low-rank residuals"),
        Param("rho", "float", RHO, "rank kept of each centred residual, as a fraction of min(m, n)"),
        Param(
            "key_policy", "fixed", KEY_POLICY.replace("b + scale * mean_t tau_t", "avg"), "tensors per matrix"
        ),
    ),
    prepare=require_torch,
)
