"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795).

Per task vector keep the middle band of magnitudes: drop the ``outliers`` fraction of largest |tau|,
keep the next ``density`` fraction, drop everything smaller. Ranks are exact order statistics (ties
broken by lower index), so a group of n entries keeps exactly floor(density * n) of them: the ranks
floor(outliers*n)+1 .. floor(outliers*n)+floor(density*n). Then task arithmetic on the masked vectors,
or TIES sign election (``breadcrumbs_ties``).

    out = b + scale * sum_t w_t * mask_t * tau_t
"""

from surgery.methods.spec import SCALE, WEIGHTS, Method, density, granularity, outliers

_PARAMS = (density(0.10), outliers(0.01), granularity(), SCALE, WEIGHTS)

BREADCRUMBS = Method(
    name="breadcrumbs",
    title="Model Breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    formula="out = b + scale * sum_t w_t * band_mask_t * tau_t",
    sparsify="band",
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=_PARAMS,
)

BREADCRUMBS_TIES = Method(
    name="breadcrumbs_ties",
    title="Model Breadcrumbs with TIES sign election",
    paper="https://arxiv.org/abs/2312.06795",
    formula="out = b + scale * disjoint_mean(elect(band_mask_t * tau_t))",
    sparsify="band",
    combine="ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=_PARAMS,
)
