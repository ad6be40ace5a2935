"""STAR: Spectral Truncation and Rescale (Lee et al., NAACL 2025, arXiv 2502.10339).

Per task and matrix: keep the smallest rank k_t whose singular values hold eta of the nuclear norm
(sum s_i), rescale the kept values so the nuclear norm is preserved, then average the truncated task
vectors: out = b + scale * mean_t U_kt diag(s_kt * ||tau_t||_* / sum_{i<=kt} s_i) V_kt^T.
"""

from __future__ import annotations

from typing import Any

from surgery.methods.per_matrix import KEY_POLICY_PARAM, combine_for, require_torch
from surgery.methods.spec import SCALE, Method, Param

ETA = 0.4


def star_merge(
    base: Any, taus: Any, *, scale: float = 1.0, eta: float = ETA, device: str | None = None
) -> Any:
    """STAR of one matrix: ``base`` [m, n], ``taus`` [T, m, n]; numpy or torch, same kind out."""
    from surgery import spectral

    b = spectral.to_torch(base, device)
    tau = spectral.to_torch(taus, b.device)
    total = b * 0
    for t in range(tau.shape[0]):
        svd = spectral.thin_svd(tau[t])
        k = spectral.nuclear_rank(svd.s, eta)
        total = total + svd.with_spectrum(spectral.rescaled_to_nuclear(svd.s, k)).matrix()
    return spectral.like(b + scale * total / tau.shape[0], base)


STAR = Method(
    name="star",
    title="STAR (spectral truncation and rescale)",
    paper="https://arxiv.org/abs/2502.10339",
    formula="per block matrix: b + scale * mean_t of tau_t truncated to eta of its nuclear norm and "
    "rescaled to keep it; other tensors: b + scale * mean_t tau_t",
    combine=combine_for("star", star_merge, lambda p: {"eta": p["eta"]}),
    params=(
        SCALE,
        Param("eta", "float", ETA, "fraction of each task vector's nuclear norm kept"),
        KEY_POLICY_PARAM,
    ),
    prepare=require_torch,
)
