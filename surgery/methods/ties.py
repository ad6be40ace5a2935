"""TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Trim: keep the top ``density`` of |tau_t| (exact ranks, ties broken by lower index).
Elect: s = sign(sum_t trimmed_t) (unweighted, as in the paper).
Disjoint mean: per element, the weighted mean of the trimmed values whose sign is s,
    merged = sum_{t: sign = s} w_t * trimmed_t / sum_{t: sign = s} w_t
(the paper's disjoint mean when all w_t = 1; weights applied after election).
    out = b + scale * merged
"""

from dataclasses import replace

from surgery.methods.breadcrumbs import BAND, BREADCRUMBS
from surgery.methods.spec import (
    SCALE,
    WEIGHTS,
    Combine,
    Method,
    Operands,
    density,
    granularity,
    weights_or_ones,
)


def _ties_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_ties(x.base, x.tau, coeffs, scale, out)


# Sign election and disjoint mean over the (sparsified) task vectors.
TIES_COMBINE = Combine(
    "ties", uses_tau=True, adds_update=True, apply=_ties_apply, coefficients=weights_or_ones
)

TIES = Method(
    name="ties",
    title="TIES-merging",
    paper="https://arxiv.org/abs/2306.01708",
    formula="out = b + scale * disjoint_mean(elect(topk_density(tau_t)))",
    sparsify=BAND,  # a band with outliers = 0 is a top-k
    combine=TIES_COMBINE,
    params=(density(0.2), granularity(), SCALE, WEIGHTS),
)

# Breadcrumbs' band (arXiv 2312.06795) with TIES' election: a variant is data.
BREADCRUMBS_TIES = replace(
    BREADCRUMBS,
    name="breadcrumbs_ties",
    title="Model Breadcrumbs with TIES sign election",
    formula="out = b + scale * disjoint_mean(elect(band_mask_t * tau_t))",
    combine=TIES_COMBINE,
)
