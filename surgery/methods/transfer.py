"""Diff vectors as artifacts and fine-tuning transfer.

Fine-tuning transfer (Lin et al. 2025, arXiv 2503.20110; Chat Vector, Huang et al. 2024):
    out = b_new + scale * (f_old - b_old)
The diff ``tau = f - b`` can also be written on its own (``diff``; float32 by default so bf16/f16
inputs are represented exactly) and applied later to any compatible base (``apply``).
"""

from surgery.methods.spec import SCALE, TAU_GIVEN, TAU_PAIRS, Method, Param

PAPER = "https://arxiv.org/abs/2503.20110"

DIFF = Method(
    name="diff",
    title="Diff vector (task vector)",
    paper="https://arxiv.org/abs/2212.04089",
    formula="tau = f - b",
    max_models=1,
    command="diff",
    roles="base: the model the diff is taken from; models: [the fine-tune]",
    output="update",
    config_from="last",  # the config and tokenizer of the fine-tune the diff describes
    tokenizer_from="last",
    base_hashes="record",
)

APPLY = Method(
    name="apply",
    title="Apply a diff",
    paper=PAPER,
    formula="out = b + scale * diff",
    max_models=1,
    params=(SCALE,),
    command="apply",
    roles="base: the target model; models: [a dense diff written by `surgery diff`]",
    tau_from=TAU_GIVEN,
    tokenizer_from="last",  # a diff carries the fine-tune's tokenizer
    base_hashes="check",
)

TRANSFER = Method(
    name="transfer",
    title="Fine-tuning transfer",
    paper=PAPER,
    formula="out = b_new + scale * (f_old - b_old)",
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
    tau_from=TAU_PAIRS,
    tokenizer_from="last",  # the old fine-tune's, unless the tokenizer_from parameter says new-base
)
