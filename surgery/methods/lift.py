"""LIFT principal weights as a patch selector ("LIFT the Veil for the Truth: Principal Weights Emerge
after Rank Reduction", 2025, arXiv 2506.00772).

For each block matrix W of the BASE, W_r is its best rank-r approximation (truncated SVD); the
principal weights are the entries with the largest |W_r|. As surgery, the top ``density`` fraction of
those positions (exact count floor(density * m * n), ties by lower flat index as everywhere) selects
where the fine-tune's diff is kept:

    patch = {(i, tau_i) : i in top-density |W_r|}          (lift_patch: a sparse patch)
    out   = b + tau * mask                                 (lift_graft: a full checkpoint)

Only 2-D tensors inside the region (default: the transformer blocks) are selected; vectors and
everything else keep the base. The SVD is ``surgery.spectral.truncated_svd`` (randomized with a fixed
seed when r is small against the matrix, exact otherwise), in float32: positions whose |W_r| lie within
float32 rounding of the threshold may swap against an exact-arithmetic ranking.
"""

from __future__ import annotations

from dataclasses import replace

from surgery.errors import RecipeError
from surgery.methods.graft import GRAFT, PATCH
from surgery.methods.spec import REGION, Param, Slice, Sparsify, density

_PAPER = "https://arxiv.org/abs/2506.00772"
RANK = Param("lift_rank", "int", None, "rank r of the base matrix's approximation W_r (LIFT)")


def lift_key(base, params) -> object:
    """|W_r|: the magnitude of the rank-r approximation of the base matrix (float32)."""
    import numpy as np

    from surgery.spectral import truncated_svd

    rank = params.get("lift_rank")
    if not isinstance(rank, int) or rank < 1:
        raise RecipeError(f"LIFT needs a rank of at least 1, got {rank!r}", hint="pass --lift-rank R")
    return np.abs(truncated_svd(base, rank).matrix()).astype(np.float32)


def _keep_selected(be, tau, s: Slice) -> None:
    """tau_t := tau_t at the selected flat indices of this chunk, 0 elsewhere."""
    import numpy as np

    lo, hi = np.searchsorted(s.selected, [s.start, s.start + tau.size])
    local = s.selected[lo:hi] - s.start
    keep = tau[local]
    tau.fill(0.0)
    tau[local] = keep


# Positions ranked by the base's principal weights, not by |tau|.
PRINCIPAL = Sparsify("lift", needs_ranks=False, apply=_keep_selected, key=lift_key)

LIFT_PATCH = replace(
    PATCH,
    name="lift_patch",
    title="LIFT principal-weight patch",
    paper=_PAPER,
    formula="patch = {(i, tau_i) : i in top-density |W_r| of the base's rank-r approximation}",
    sparsify=PRINCIPAL,
    params=(density(0.05), RANK, REGION),
)

LIFT_GRAFT = replace(
    GRAFT,
    name="lift_graft",
    title="LIFT principal-weight graft",
    paper=_PAPER,
    formula="out = b + tau * mask, mask = top-density |W_r| of the base's rank-r approximation",
    sparsify=PRINCIPAL,
    params=(density(0.05), RANK, REGION),
)
