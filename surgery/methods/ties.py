"""TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Trim: keep the top ``density`` of |tau_t| (exact ranks, ties broken by lower index).
Elect: s = sign(sum_t trimmed_t) (unweighted, as in the paper).
Disjoint mean: per element, the weighted mean of the trimmed values whose sign is s,
    merged = sum_{t: sign = s} w_t * trimmed_t / sum_{t: sign = s} w_t
(the paper's disjoint mean when all w_t = 1; weights applied after election).
    out = b + scale * merged
"""

from surgery.methods.spec import SCALE, WEIGHTS, Method, density, granularity

TIES = Method(
    name="ties",
    title="TIES-merging",
    paper="https://arxiv.org/abs/2306.01708",
    formula="out = b + scale * disjoint_mean(elect(topk_density(tau_t)))",
    sparsify="band",  # a band with outliers = 0 is a top-k
    combine="ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=(density(0.2), granularity(), SCALE, WEIGHTS),
)
