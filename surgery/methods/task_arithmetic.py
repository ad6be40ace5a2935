"""Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089).

out = b + scale * sum_t w_t * (f_t - b)
"""

from surgery.methods.spec import SCALE, WEIGHTS, Method

TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    formula="out = b + scale * sum_t w_t * tau_t",
    sparsify=None,
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=(SCALE, WEIGHTS),
)
