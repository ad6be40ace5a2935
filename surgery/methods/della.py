"""DELLA-Merging (Deep, Bhardwaj & Poria, 2024, arXiv 2406.11617): MAGPRUNE, then TIES or a sum.

MAGPRUNE drops task-vector entries at random, the larger ones less often. In each row (a node's
incoming weights; a 1-D tensor is one row) of n entries, with a_i the ascending rank of |tau_i|
(0 = smallest; equal magnitudes ordered by index, the lower index ranking higher, as our rank bands
do), entry i is kept with probability

    p_i = (density - epsilon) + 2 epsilon * a_i / (n - 1)        (p_i = density when n = 1)

so the keep probabilities spread linearly over [density - epsilon, density + epsilon] and average
density. Kept entries are rescaled by 1/p_i (``rescale: none``, the paper: E[tau'] = tau). With
epsilon = 0 this is DARE, and it draws DARE's random stream (keyed by seed, tensor, model and element
index), so DELLA at epsilon 0 gives DARE's bytes (both with the 1/p rescale). ``density`` >= 1 keeps
every entry unchanged.

    della         out = b + scale * disjoint_mean(elect(magprune(tau_t)))     (TIES' election + mean)
    della_linear  out = b + scale * sum_t w_t * magprune(tau_t)

mergekit's variant (its ``della``/``della_linear``): ``rescale: l1`` (the kept entries, unscaled,
times ||tau||_1 / ||kept||_1 per tensor) or ``rescale: off`` (mergekit's ``rescale: false``: kept
entries unscaled), with TIES' ``elect: weighted`` and ``disjoint``. Ranks need a whole row, so the
engine streams whole rows (``granularity`` is fixed at per_row): exact ranks, any budget.
"""

from dataclasses import replace

from surgery.methods.dare import dare_key
from surgery.methods.spec import SCALE, SEED, SUM, WEIGHTS, Method, Param, Slice, Sparsify, density
from surgery.methods.ties import DISJOINT, ELECT, TIES_COMBINE


def _magprune_apply(be, tau, s: Slice) -> None:
    import numpy as np

    from surgery.ranks import per_model

    keep = float(per_model(s.params["density"], s.model))
    if keep >= 1.0:  # every entry kept, nothing to rescale (mergekit skips the stage too)
        return
    eps = float(per_model(s.params["epsilon"], s.model))
    key = np.uint64(dare_key(int(s.params["seed"]), s.tensor, s.model))
    inverse = s.params.get("rescale", "none") == "none"
    be.della_mask(tau, s.cols, keep, eps, key, s.start, s.scratch, inverse)


MAGPRUNE = Sparsify("magprune", needs_ranks=True, apply=_magprune_apply, on_device=True)

EPSILON = Param(
    "epsilon", "float", 0.15, "keep probabilities spread over density +/- epsilon by |tau| rank in the row"
)
RESCALE = Param(
    "rescale", "choice", "none", "after the mask: none (kept tau / p_i, the paper), l1: back to the L1 norm "
    "of tau (mergekit), or off: kept tau as is (mergekit's rescale: false)", ("none", "l1", "off")
)  # fmt: skip
PER_ROW = Param("granularity", "fixed", "per_row", "(fixed) ranks are taken in each row")

DELLA = Method(
    name="della",
    title="DELLA (magnitude-based drop) + TIES sign election",
    paper="https://arxiv.org/abs/2406.11617",
    formula="out = b + scale * disjoint_mean(elect(m_t * tau_t / p_t)), P(m_ti) = p_ti by |tau| rank",
    sparsify=MAGPRUNE,
    combine=TIES_COMBINE,
    params=(density(0.5), EPSILON, SEED, SCALE, WEIGHTS, RESCALE, ELECT, DISJOINT, PER_ROW),
)

DELLA_LINEAR = replace(
    DELLA,
    name="della_linear",
    title="DELLA (magnitude-based drop) + task arithmetic",
    formula="out = b + scale * sum_t w_t * m_t * tau_t / p_t, P(m_ti) = p_ti by |tau| rank",
    combine=SUM,
    params=(density(0.5), EPSILON, SEED, SCALE, WEIGHTS, RESCALE, PER_ROW),
)
