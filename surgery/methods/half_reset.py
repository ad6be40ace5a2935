"""Half reset: the operation behind Half Fine-Tuning (HFT, Hui et al., "HFT: Half Fine-Tuning for
Large Language Models", arXiv 2404.18466), as surgery.

HFT freezes half of each block's parameter matrices at their pre-trained values while fine-tuning;
resetting part of a fine-tune's parameters to the base afterwards restores forgotten knowledge. Per
block, with n units (its matrices, or with ``by: element`` the elements of its matrices):

    exactly floor(fraction * n) units := base,  the rest := fine-tune     (bit for bit)

chosen by a seeded counter-based permutation or by the size of the relative update (``select``).
Vectors and tensors outside the blocks keep the fine-tune. The selection itself (permutation,
relative updates, exact block-wide ranks) is in ``surgery/reset.py``.
"""

from surgery.methods.spec import SEED, Method, Param, Pick

SELECTIONS = ("random", "smallest-update", "largest-update")


def _rules(jobs, params, backend, parallel, chunks):
    from surgery.reset import pick_rules

    return pick_rules(jobs, params, backend, parallel, chunks)


HALF_RESET = Method(
    name="half_reset",
    title="Half reset (Half Fine-Tuning as surgery)",
    paper="https://arxiv.org/abs/2404.18466",
    formula="per block: floor(fraction * n) of its n matrices (or elements) := base, the rest := fine-tune",
    max_models=1,
    params=(
        Param("fraction", "float", 0.5, "fraction of each block's matrices (or elements) reset to the base"),
        Param(
            "by",
            "choice",
            "matrix",
            "unit of the reset: whole matrices or single elements",
            ("matrix", "element"),
        ),  # fmt: skip
        Param(
            "select",
            "choice",
            "random",
            "which units: a seeded permutation or by relative update",
            SELECTIONS,
        ),  # fmt: skip
        SEED,
    ),
    command="reset",
    roles="base: the pre-trained model; models: [the fine-tune]",
    output="pick",
    pick=Pick("half_reset", _rules),
    config_from="last",  # the output is a variant of the fine-tune: its config and tokenizer
    tokenizer_from="last",
)
