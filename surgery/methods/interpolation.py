"""Weight-space interpolation: linear averaging, SLERP and Model Stock.

Linear: out = sum_t w_t f_t / sum_t w_t.

SLERP (Shoemake 1985; as popularised for LLM merging): for two endpoints v0, v1 (flattened tensors)
    cos = v0.v1 / (|v0||v1|), omega = arccos(cos)
    out = sin((1-t) omega)/sin(omega) * v0 + sin(t omega)/sin(omega) * v1
falling back to (1-t) v0 + t v1 when |cos| > 1 - 1e-6 (nearly parallel) or a norm is 0. With --base
and one model the endpoints are (base, model), otherwise the two models; t = 0 gives the first.

Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): per tensor, cos = mean pairwise cosine of the
task vectors, k = T cos / (1 + (T-1) cos), out = k * mean_t f_t + (1 - k) * b. cos is clamped to
[0, 1]: the paper's geometry assumes fine-tunes at similar angles; for opposed task vectors the
formula would extrapolate away from both (and divide by zero at cos = -1/(T-1)), so we return b.
``cos_min = -1`` drops the clamp (mergekit's behaviour; k = 0 at the singularity).
A pair with a zero task vector counts as cos 0.
"""

import math

import numpy as np

from surgery.methods.spec import WEIGHTS, Method, Param

LINEAR = Method(
    name="linear",
    title="Linear (weighted average)",
    paper="https://arxiv.org/abs/2203.05482",
    formula="out = sum_t w_t f_t / sum_t w_t",
    sparsify=None,
    combine="linear",
    needs_base=False,
    min_models=1,
    max_models=None,
    params=(WEIGHTS,),
)

SLERP = Method(
    name="slerp",
    title="Spherical linear interpolation",
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    formula="out = sin((1-t)w)/sin(w) v0 + sin(t w)/sin(w) v1",
    sparsify=None,
    combine="slerp",
    needs_base=False,
    min_models=1,
    max_models=2,
    params=(
        Param("t", "float", 0.5, "interpolation factor: 0 = first endpoint, 1 = second"),
        Param("linear_above", "float", 1.0 - 1e-6, "|cos| above which SLERP interpolates linearly"),
    ),
)

MODEL_STOCK = Method(
    name="model_stock",
    title="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    formula="k = T cos / (1 + (T-1) cos); out = k * mean_t f_t + (1 - k) * b",
    sparsify=None,
    combine="model_stock",
    needs_base=True,
    min_models=2,
    max_models=None,
    params=(Param("cos_min", "float", 0.0, "lower clamp of the mean cosine (-1: no clamp, as mergekit)"),),
)


def slerp_coefficients(gram: np.ndarray, t: float, linear_above: float = 1.0 - 1e-6) -> np.ndarray:
    """[c0, c1] with out = c0 v0 + c1 v1 (float64 math, rounded once to float32); linear when
    |cos| > ``linear_above`` (mergekit uses 0.9995)."""
    n0, n1 = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    if n0 == 0.0 or n1 == 0.0:
        return np.array([1.0 - t, t], np.float32)
    cos = max(-1.0, min(1.0, gram[0, 1] / (n0 * n1)))
    if abs(cos) > linear_above:
        return np.array([1.0 - t, t], np.float32)
    omega = math.acos(cos)
    s = math.sin(omega)
    return np.array([math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s], np.float32)


def model_stock_k(gram: np.ndarray, cos_min: float = 0.0) -> float:
    """k = T cos / (1 + (T-1) cos), cos = mean pairwise cosine of the task vectors clamped to
    [cos_min, 1]; k = 0 (the base) where the denominator vanishes (cos_min < 0 only)."""
    T = gram.shape[0]
    cosines = []
    for s in range(T):
        for t in range(s + 1, T):
            denom = math.sqrt(gram[s, s]) * math.sqrt(gram[t, t])
            cosines.append(gram[s, t] / denom if denom > 0 else 0.0)
    cos = min(1.0, max(cos_min, sum(cosines) / len(cosines)))
    denominator = 1.0 + (T - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else T * cos / denominator
