"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959).

Iso-C per matrix: D = sum_t tau_t = U S V^T; D_iso = mean(s) U V^T; out = b + scale * D_iso. The
spectrum is flattened over D's numerical rank only (s_i > eps * s_max): for a rank-deficient D (sums of
LoRA-like updates) the authors' code would give arbitrary null-space directions the mean singular value.

Iso-CTS: a common subspace of rank k_c = r - round((r - floor(0.8 r)) / T) * T from D's top singular
vectors, plus each task's top (r - k_c) / T directions of tau_t projected off that subspace;
concatenate (tasks first, then the common part, as the authors do), orthogonalise both bases by their
polar factors as in TSV-M, and flatten the concatenated spectrum to its mean. Directions whose singular
value is numerically zero are dropped before that (same guard as Iso-C; our choice).
Authors' code: danielm1405/iso-merging, src/utils/iso.py. Iso-C does not return f_1 for T = 1.
"""

from __future__ import annotations

from typing import Any

from surgery.methods.per_matrix import KEY_POLICY_PARAM, combine_for, require_torch
from surgery.methods.spec import SCALE, Method

COMMON_FRACTION = 0.8


def iso_c(base: Any, taus: Any, *, scale: float = 1.0, device: str | None = None) -> Any:
    """Iso-C of one matrix: ``base`` [m, n], ``taus`` [T, m, n]; numpy or torch, same kind out."""
    from surgery import spectral

    b = spectral.to_torch(base, device)
    d = spectral.to_torch(taus, b.device).sum(0)
    svd = spectral.thin_svd(d)
    k = spectral.numerical_rank(svd.s)
    return spectral.like(b + scale * svd.with_spectrum(spectral.flat_spectrum(svd.s, k)).matrix(), base)


def common_rank(r: int, n_tasks: int, fraction: float = COMMON_FRACTION) -> int:
    """k_c = r - round((r - floor(fraction r)) / T) * T (Python's round, as the authors')."""
    return r - round((r - int(fraction * r)) / n_tasks) * n_tasks


def iso_cts(
    base: Any,
    taus: Any,
    *,
    scale: float = 1.0,
    common_fraction: float = COMMON_FRACTION,
    device: str | None = None,
) -> Any:
    """Iso-CTS of one matrix: ``base`` [m, n], ``taus`` [T, m, n]; numpy or torch, same kind out."""
    import torch

    from surgery import spectral

    b = spectral.to_torch(base, device)
    tau = spectral.to_torch(taus, b.device)
    n_tasks, m, n = tau.shape
    r = min(m, n)
    k_c = common_rank(r, n_tasks, common_fraction)
    per_task = (r - k_c) // n_tasks
    common = spectral.thin_svd(tau.sum(0)).truncate(k_c)
    parts = []
    for t in range(n_tasks):
        specific = tau[t] - common.u @ (common.u.T @ tau[t])
        parts.append(spectral.thin_svd(specific).truncate(per_task))
    parts.append(common)
    s_max = max((float(p.s.max()) for p in parts if p.s.numel()), default=0.0)
    union = spectral.orthogonal_union(parts, min_s=torch.finfo(torch.float32).eps * r * s_max)
    if union is None:
        return spectral.like(b.clone(), base)
    merged = (union.u * union.s.mean()) @ union.vh
    return spectral.like(b + scale * merged, base)


ISO_C = Method(
    name="iso_c",
    title="Iso-C (isotropic merging)",
    paper="https://arxiv.org/abs/2502.04959",
    formula="per block matrix: b + scale * mean(s) U V^T of sum_t tau_t = U S V^T (numerical rank); "
    "other tensors: b + scale * mean_t tau_t",
    combine=combine_for("iso_c", iso_c, lambda p: {}),
    params=(SCALE, KEY_POLICY_PARAM),
    prepare=require_torch,
)

ISO_CTS = Method(
    name="iso_cts",
    title="Iso-CTS (isotropic merging, common and task-specific subspaces)",
    paper="https://arxiv.org/abs/2502.04959",
    formula="per block matrix: b + scale * mean(s) polar(U) polar(V^T) over the common top 80% of "
    "sum_t tau_t and each task's top directions off it; other tensors: b + scale * mean_t tau_t",
    combine=combine_for("iso_cts", iso_cts, lambda p: {}),
    params=(SCALE, KEY_POLICY_PARAM),
    prepare=require_torch,
)
