"""TSV-M: Task Singular Vectors merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per matrix, with r = min(m, n) and k = max(1, floor(r / T)): keep each task vector's top-k singular
triplets, concatenate U = [U_1k | ... | U_Tk], s = [s_1k; ...], V^T = [V_1k^T; ...], replace U and V^T by
their polar factors (the nearest matrices with orthonormal columns / rows, which removes the overlap
between the tasks' subspaces), and out = b + scale * U' diag(s) V'^T.
Triplets whose singular value is numerically zero (a rank-deficient, LoRA-like tau_t) are dropped
before the polar step: their vectors are arbitrary and would rotate the other tasks' directions
(our guard; the authors' code has none, and for full-rank task vectors it changes nothing).
Authors' code: AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py (alpha tuned in (0, 3]).
"""

from __future__ import annotations

from typing import Any

from surgery.methods.per_matrix import KEY_POLICY_PARAM, combine_for, require_torch
from surgery.methods.spec import SCALE, Method


def tsv_merge(base: Any, taus: Any, *, scale: float = 1.0, device: str | None = None) -> Any:
    """TSV-M of one matrix: ``base`` [m, n], ``taus`` [T, m, n]; numpy or torch, same kind out."""

    from surgery import spectral

    b = spectral.to_torch(base, device)
    tau = spectral.to_torch(taus, b.device)
    n_tasks, m, n = tau.shape
    k = max(1, min(m, n) // n_tasks)
    parts = []
    for t in range(n_tasks):
        svd = spectral.thin_svd(tau[t])
        parts.append(svd.truncate(min(k, spectral.numerical_rank(svd.s))))
    union = spectral.orthogonal_union(parts)
    if union is None:  # every task vector is zero
        return spectral.like(b.clone(), base)
    return spectral.like(b + scale * union.matrix(), base)


TSV_MERGE = Method(
    name="tsv_merge",
    title="TSV-Merge (task singular vectors)",
    paper="https://arxiv.org/abs/2412.00081",
    formula="per block matrix: b + scale * polar(U) diag(s) polar(V^T) of each tau_t's top r/T "
    "singular triplets; other tensors: b + scale * mean_t tau_t",
    combine=combine_for("tsv_merge", tsv_merge, lambda p: {}),
    params=(SCALE, KEY_POLICY_PARAM),
    prepare=require_torch,
)
