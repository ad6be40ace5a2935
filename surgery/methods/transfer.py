"""Diff vectors as artifacts, fine-tuning transfer and data-free grafting.

Fine-tuning transfer (Lin et al. 2025, arXiv 2503.20110; Chat Vector, Huang et al. 2024):
    out = b_new + scale * (f_old - b_old)
The diff ``tau = f - b`` can also be written on its own (``diff``; float32 by default so bf16/f16
inputs are represented exactly) and applied later to any compatible base (``apply``).

Skill localization by grafting (Panigrahi et al., ICML 2023, arXiv 2302.06600), data-free:
    out = b + gamma * tau,   gamma = top ``density`` of |tau| over the whole region (one global rank)
The region defaults to the transformer blocks (not embeddings or head). A graft is best stored as a
sparse patch (``patch``: flat indices + values per tensor), a tiny file; ``apply_patch`` adds it to a
base. Sparse patches can also keep the top ``density`` per tensor, or a Breadcrumbs band.
"""

from dataclasses import replace

from surgery.methods.spec import REGION, SCALE, Method, Param, density, granularity, outliers

_TRANSFER_PAPER = "https://arxiv.org/abs/2503.20110"
_GRAFT_PAPER = "https://arxiv.org/abs/2302.06600"

DIFF = Method(
    name="diff",
    title="Diff vector (task vector)",
    paper="https://arxiv.org/abs/2212.04089",
    formula="tau = f - b",
    sparsify=None,
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(),
    command="diff",
    roles="base: the model the diff is taken from; models: [the fine-tune]",
    output="update",
)

PATCH = Method(
    name="patch",
    title="Sparse diff patch",
    paper=_GRAFT_PAPER,
    formula="patch = {(i, tau_i) : i in selection}",
    sparsify="band",
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(density(0.01), outliers(0.0), granularity(), REGION),
    command="diff",
    roles="base: the model the diff is taken from; models: [the fine-tune]",
    output="patch",
)

APPLY = Method(
    name="apply",
    title="Apply a diff",
    paper=_TRANSFER_PAPER,
    formula="out = b + scale * diff",
    sparsify=None,
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(SCALE,),
    command="apply",
    roles="base: the target model; models: [a dense diff written by `surgery diff`]",
    tau_from="given",
)

APPLY_PATCH = Method(
    name="apply_patch",
    title="Apply a sparse patch",
    paper=_GRAFT_PAPER,
    formula="out = b; out[i] = b[i] + scale * v_i for every (i, v_i) in the patch",
    sparsify=None,
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(SCALE,),
    command="apply",
    roles="base: the target model; models: [a sparse patch written by `surgery diff --density/--graft`]",
    output="scatter",
)

# Several patches (or dense diffs) in one pass: the same scatter output, with per-patch scales.
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
    roles="base: the target model; models: sparse patches (or dense diffs) taken from that base "
    "(Ansell et al., ACL 2022)",
)

TRANSFER = Method(
    name="transfer",
    title="Fine-tuning transfer",
    paper=_TRANSFER_PAPER,
    formula="out = b_new + scale * (f_old - b_old)",
    sparsify=None,
    combine="sum",
    needs_base=True,
    min_models=2,
    max_models=2,
    params=(
        SCALE,
        Param(
            "tokenizer_from",
            "choice",
            "finetuned",
            "vocabulary of the output: the old fine-tune's or the new base's",
            ("finetuned", "new-base"),
        ),
    ),
    command="transfer",
    roles="base: the NEW base release; models: [the old base, the old fine-tune]",
    tau_from="pairs",
)

GRAFT = Method(
    name="graft",
    title="Data-free skill graft",
    paper=_GRAFT_PAPER,
    formula="out = b + gamma * tau, gamma = top-density |tau| over the region",
    sparsify="band",
    combine="sum",
    needs_base=True,
    min_models=1,
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
