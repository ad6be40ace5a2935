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
memory it needs); the stage masks the task vectors in place and works one model at a time, so its
temporaries are a few rows (the variance ranking: float64 and int64 of one row), not T rows.
"""

from surgery.errors import RecipeError
from surgery.methods.spec import Combine, Method, Operands, Param


def sce_select(tau, density: float) -> None:
    """Zero, in place in every tau_t, the entries outside the top-k variance across the models."""
    import numpy as np

    if density >= 1.0:
        return
    # population variance in float64, one model at a time (temporaries of one row, not T rows)
    mean = tau.sum(axis=0, dtype=np.float64) / tau.shape[0]
    var = np.zeros(tau.shape[1], np.float64)
    for row in tau:
        var += np.square(row - mean)
    var = (var / tau.shape[0]).astype(np.float32)
    del mean
    k = int(np.count_nonzero(var) * density)
    keep = np.zeros(var.shape, bool)
    if k:
        keep[np.argsort(-var, kind="stable")[:k]] = True
    tau *= keep


def sce_weights(tau):
    """w_t = mean(tau_t^2) normalised to sum 1 (float32); 1/T when the sum is below 1e-6."""
    import numpy as np

    means = np.array([np.dot(row, row.astype(np.float64)) / row.size for row in tau])
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
    """In float32, model by model (temporaries of one row); tau is the stream's to mask in place."""
    import numpy as np

    tau = x.tau
    sce_select(tau, _one_density(x.params["density"]))
    weights = sce_weights(tau)
    positive = tau.sum(axis=0, dtype=np.float32) >= 0
    num = np.zeros_like(out)
    den = np.zeros_like(out)
    for row, w in zip(tau, weights):
        kept = np.where(positive, row > 0, row < 0)
        num += np.where(kept, row * w, np.float32(0.0))
        den += np.where(kept, w, np.float32(0.0))
    num /= np.maximum(den, np.float32(1e-6))
    np.add(x.base, scale * num, out=out)


SCE = Method(
    name="sce",
    title="SCE (select by variance, calculate weights, erase sign conflicts)",
    paper="https://arxiv.org/abs/2408.07990",
    formula="out = b + sum_t w_t m_t sel(tau_t) / sum_t w_t m_t, w_t ~ mean(sel(tau_t)^2), m_t: TIES signs",
    combine=Combine("sce", uses_tau=True, adds_update=True, apply=_sce_apply, whole_matrix=True),
    params=(Param("density", "float", 1.0, "fraction of entries KEPT, by variance across the models"),),
)
