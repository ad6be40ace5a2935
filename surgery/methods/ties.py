"""TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Trim: keep the top ``density`` of |tau_t| (exact ranks, ties broken by lower index).
Elect: s = sign(sum_t trimmed_t) (unweighted, as in the paper).
Disjoint mean: per element, the weighted mean of the trimmed values whose sign is s,
    merged = sum_{t: sign = s} w_t * trimmed_t / sum_{t: sign = s} w_t
(the paper's disjoint mean when all w_t = 1; weights applied after election).
    out = b + scale * merged

mergekit's variant (``elect: weighted``): s = +1 where sum_t w_t trimmed_t >= 0, else -1 (weights
before election, zero sums elect +; mergekit's ``get_mask``); ``disjoint: sum`` leaves out the
division by sum_{t: sign = s} w_t (mergekit's ``normalize: false``); ``rescale: l1`` brings each trimmed
task vector back to the L1 norm of tau before the election (mergekit's ``rescale: true``).
"""

from dataclasses import replace

from surgery.methods.breadcrumbs import BAND, BREADCRUMBS, RESCALE_L1
from surgery.methods.spec import (
    RANK_COUNTS,
    SCALE,
    WEIGHTS,
    Combine,
    Method,
    Operands,
    Param,
    density,
    granularity,
    weights_or_ones,
)


def _paper_ties(params) -> bool:
    """The paper's election and mean (``combine_ties``); anything else is mergekit's variant."""
    return params.get("elect", "unweighted") == "unweighted" and params.get("disjoint", "mean") == "mean"


def _ties_apply(be, x: Operands, coeffs, scale, out) -> None:
    if _paper_ties(x.params):
        be.combine_ties(x.base, x.tau, coeffs, scale, out)
    else:
        weighted = x.params.get("elect") == "weighted"
        mean = x.params.get("disjoint", "mean") == "mean"
        be.combine_ties_variant(x.base, x.tau, coeffs, scale, weighted, mean, out)


ELECT = Param("elect", "choice", "unweighted", "sign election on sum tau_t, or on sum w_t tau_t (mergekit)",
              ("unweighted", "weighted"))  # fmt: skip
DISJOINT = Param("disjoint", "choice", "mean", "agreeing updates: weighted mean (paper), or sum (mergekit)",
                 ("mean", "sum"))  # fmt: skip

# Sign election and disjoint mean over the (sparsified) task vectors.
TIES_COMBINE = Combine(
    "ties", uses_tau=True, adds_update=True, apply=_ties_apply, coefficients=weights_or_ones,
    on_device=True,
)  # fmt: skip

TIES = Method(
    name="ties",
    title="TIES-merging",
    paper="https://arxiv.org/abs/2306.01708",
    formula="out = b + scale * disjoint_mean(elect(topk_density(tau_t)))",
    sparsify=BAND,  # a band with outliers = 0 is a top-k
    combine=TIES_COMBINE,
    params=(density(0.2), granularity(), SCALE, WEIGHTS, ELECT, DISJOINT, RESCALE_L1, RANK_COUNTS),
)

# Breadcrumbs' band (arXiv 2312.06795) with TIES' election: a variant is data.
BREADCRUMBS_TIES = replace(
    BREADCRUMBS,
    name="breadcrumbs_ties",
    title="Model Breadcrumbs with TIES sign election",
    formula="out = b + scale * disjoint_mean(elect(band_mask_t * tau_t))",
    combine=TIES_COMBINE,
    params=(*BREADCRUMBS.params, ELECT, DISJOINT),
)
