"""SCE: Select, Calculate, Erase (FuseChat, Wan et al. 2024, arXiv 2408.07990), as mergekit 0.1.5
computes it, over the task vectors tau_t = f_t - b of one tensor:

Select: with density < 1, keep the k = floor(density * #{var != 0}) entries of largest variance of
    tau across the models (population variance; ties: lower index first), zero the others in every tau_t.
Calculate: w_t = mean(tau_t^2) / sum_s mean(tau_s^2) over the whole tensor (1/T when that sum is
    below 1e-6).
Erase: s = +1 where sum_t tau_t >= 0, else -1; keep tau_t where sign(tau_t) = s (TIES' election).
    out = b + sum_t w_t m_t tau_t / max(sum_t w_t m_t, 1e-6),   m_t the kept mask.

The variance ranks and the mean squares are taken over the whole tensor, so SCE takes each tensor
whole (``whole_matrix``: a tensor too big for one worker's share of the budget is an error naming the
memory it needs).
"""

from surgery.errors import RecipeError
from surgery.methods.spec import Combine, Method, Operands, Param


def sce_select(tau, density: float):
    """tau with every entry outside the top-k variance across the models zeroed (a copy)."""
    import numpy as np

    if density >= 1.0:
        return tau
    var = tau.var(axis=0, dtype=np.float64).astype(np.float32)
    k = int(np.count_nonzero(var) * density)
    mask = np.zeros(var.shape, bool)
    if k:
        mask[np.argsort(-var, kind="stable")[:k]] = True
    return np.where(mask, tau, np.float32(0.0))


def sce_weights(tau):
    """w_t = mean(tau_t^2) normalised to sum 1 (float32); 1/T when the sum is below 1e-6."""
    import numpy as np

    means = np.square(tau, dtype=np.float64).mean(axis=1)
    total = means.sum()
    if abs(total) < 1e-6:
        return np.full(tau.shape[0], 1.0 / tau.shape[0], np.float32)
    return (means / total).astype(np.float32)


def _one_density(value) -> float:
    """The selection ranks entries across all models at once: one density."""
    if isinstance(value, list | tuple):
        if len(set(value)) > 1:
            raise RecipeError(
                f"sce selects entries by their variance across the models: one density, not {list(value)}",
                hint="give one --density (mergekit: select_topk)",
            )
        value = value[0]
    return float(value)


def _sce_apply(be, x: Operands, coeffs, scale, out) -> None:
    import numpy as np

    tau = sce_select(x.tau, _one_density(x.params["density"]))
    positive = tau.sum(axis=0, dtype=np.float32) >= 0
    kept = np.where(positive, tau > 0, tau < 0)
    weights = np.where(kept, sce_weights(tau)[:, None], np.float32(0.0))
    merged = (tau * weights).sum(axis=0, dtype=np.float32)
    merged /= np.maximum(weights.sum(axis=0, dtype=np.float32), np.float32(1e-6))
    np.add(x.base, scale * merged, out=out)


SCE = Method(
    name="sce",
    title="SCE (select by variance, calculate weights, erase sign conflicts)",
    paper="https://arxiv.org/abs/2408.07990",
    formula="out = b + sum_t w_t m_t sel(tau_t) / sum_t w_t m_t, w_t ~ mean(sel(tau_t)^2), m_t: TIES signs",
    combine=Combine("sce", uses_tau=True, adds_update=True, apply=_sce_apply, whole_matrix=True),
    params=(Param("density", "float", 1.0, "fraction of entries KEPT, by variance across the models"),),
)
