"""Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089).

out = b + scale * sum_t w_t * (f_t - b)

Its combine stage, ``SUM``, is every spec's default and lives in ``spec.py``.
"""

from surgery.methods.spec import SCALE, SUM, WEIGHTS, Method

TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    formula="out = b + scale * sum_t w_t * tau_t",
    combine=SUM,
    params=(SCALE, WEIGHTS),
)
