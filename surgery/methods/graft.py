"""Skill localization by grafting (Panigrahi et al., ICML 2023, arXiv 2302.06600), data-free, and
sparse patches.

    out = b + gamma * tau,   gamma = top ``density`` of |tau| over the whole region (one global rank)

The region defaults to the transformer blocks (not embeddings or head). A graft is best stored as a
sparse patch (``patch``: flat indices + values per tensor), a tiny file; ``apply_patch`` adds it to a
base. Sparse patches can also keep the top ``density`` per tensor, or a Breadcrumbs band.
"""

from dataclasses import replace

from surgery.methods.breadcrumbs import BAND
from surgery.methods.spec import REGION, SCALE, Method, Param, density, granularity, outliers

PAPER = "https://arxiv.org/abs/2302.06600"

PATCH = Method(
    name="patch",
    title="Sparse diff patch",
    paper=PAPER,
    formula="patch = {(i, tau_i) : i in selection}",
    sparsify=BAND,
    max_models=1,
    params=(density(0.01), outliers(0.0), granularity(), REGION),
    command="diff",
    roles="base: the model the diff is taken from; models: [the fine-tune]",
    output="patch",
    config_from="last",
    tokenizer_from="last",
    base_hashes="record",
)

APPLY_PATCH = Method(
    name="apply_patch",
    title="Apply a sparse patch",
    paper=PAPER,
    formula="out = b; out[i] = b[i] + scale * v_i for every (i, v_i) in the patch",
    max_models=1,
    params=(SCALE,),
    command="apply",
    roles="base: the target model; models: [a sparse patch written by `surgery diff --density/--graft`]",
    output="scatter",
    tokenizer_from="last",
    base_hashes="check",
)

# Several patches (or dense diffs) in one pass (Ansell et al., ACL 2022, arXiv 2110.07560): the same
# scatter output with per-patch scales; inputs taken from different bases are refused unless forced.
COMPOSE = replace(
    APPLY_PATCH,
    name="compose",
    title="Composed sparse patches",
    paper="https://arxiv.org/abs/2110.07560",
    formula="out = b + scale * sum_i s_i p_i (overlapping entries added; untouched entries keep b)",
    max_models=None,
    params=(
        SCALE,
        Param("scales", "weights", None, "per-patch multipliers s1,s2,... (default all 1)"),
        Param("force_base", "bool", False, "compose patches taken from different bases"),
    ),
    roles="base: the target model; models: sparse patches (or dense diffs) taken from that base",
)

GRAFT = Method(
    name="graft",
    title="Data-free skill graft",
    paper=PAPER,
    formula="out = b + gamma * tau, gamma = top-density |tau| over the region",
    sparsify=BAND,
    max_models=1,
    params=(
        density(0.01),
        Param("outliers", "fixed", 0.0, "(fixed) a graft keeps the largest entries"),
        Param("granularity", "fixed", "global", "(fixed) one ranking over the whole region"),
        REGION,
    ),
    command="graft",
    roles="base: the pre-trained model; models: [the fine-tune]",
)
