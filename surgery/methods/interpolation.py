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
A pair with a zero task vector counts as cos 0. ``cos_min = -1`` drops the clamp (mergekit's
behaviour; k = 0 at the singularity).
"""

import math
from collections.abc import Mapping

from surgery.methods.spec import WEIGHTS, Combine, Method, Operands, Param


def linear_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    """w_t / sum_t w_t (float64, rounded once to float32)."""
    import numpy as np

    w = np.asarray(params["weights"], np.float64)
    return tuple(float(c) for c in (w / w.sum()).astype(np.float32))


def _linear_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_weighted(x.models, coeffs, out)


def slerp_coefficients(gram, params: Mapping[str, object], n_models: int = 2) -> tuple[float, float]:
    """[c0, c1] with out = c0 v0 + c1 v1 (float64 math; the engine rounds them once to float32);
    linear when |cos| > ``linear_above`` (mergekit uses 0.9995)."""
    t = float(params["t"])
    linear_above = float(params.get("linear_above", 1.0 - 1e-6))
    n0, n1 = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    if n0 == 0.0 or n1 == 0.0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, gram[0, 1] / (n0 * n1)))
    if abs(cos) > linear_above:
        return 1.0 - t, t
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def _slerp_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_weighted(x.inputs, coeffs, out)


def model_stock_k(gram, params: Mapping[str, object] | None = None, n_models: int = 0) -> tuple[float]:
    """(k,): k = T cos / (1 + (T-1) cos), cos = mean pairwise cosine of the task vectors clamped to
    [cos_min, 1] (default 0); k = 0 (the base) where the denominator vanishes (cos_min < 0 only)."""
    cos_min = float((params or {}).get("cos_min", 0.0))
    T = gram.shape[0]
    cosines = []
    for s in range(T):
        for t in range(s + 1, T):
            denom = math.sqrt(gram[s, s]) * math.sqrt(gram[t, t])
            cosines.append(gram[s, t] / denom if denom > 0 else 0.0)
    cos = min(1.0, max(cos_min, sum(cosines) / len(cosines)))
    denominator = 1.0 + (T - 1) * cos
    return (0.0 if abs(denominator) < 1e-6 else T * cos / denominator,)


def _model_stock_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_model_stock(x.inputs[0], x.models, coeffs[0], out)


WEIGHTED = Combine("linear", uses_tau=False, adds_update=False, apply=_linear_apply,
                   coefficients=linear_coefficients, on_device=True)  # fmt: skip
SPHERICAL = Combine("slerp", uses_tau=False, adds_update=False, apply=_slerp_apply,
                    coefficients=slerp_coefficients, gram_over="inputs", on_device=True)  # fmt: skip
STOCK = Combine("model_stock", uses_tau=True, adds_update=False, apply=_model_stock_apply,
                coefficients=model_stock_k, gram_over="tau", on_device=True)  # fmt: skip

LINEAR = Method(
    name="linear",
    title="Linear (weighted average)",
    paper="https://arxiv.org/abs/2203.05482",
    formula="out = sum_t w_t f_t / sum_t w_t",
    combine=WEIGHTED,
    needs_base=False,
    params=(WEIGHTS,),
)

SLERP = Method(
    name="slerp",
    title="Spherical linear interpolation",
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    formula="out = sin((1-t)w)/sin(w) v0 + sin(t w)/sin(w) v1",
    combine=SPHERICAL,
    needs_base=False,
    max_models=2,
    endpoints=2,
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
    combine=STOCK,
    min_models=2,
    params=(Param("cos_min", "float", 0.0, "lower clamp of the mean cosine (-1: no clamp, as mergekit)"),),
)
