"""Spherical means from mergekit: NuSLERP, Multi-SLERP, Karcher mean; and NearSwap.

NuSLERP, Multi-SLERP and the Karcher mean only ever form linear combinations of their inputs, with
coefficients that depend on norms and dot products. So one Gram-matrix pass over the whole tensor
(float64) gives the coefficients, and the apply pass streams ``out = sum_k c_k input_k`` chunk by
chunk: exact whole-tensor semantics, bounded memory. With a base, mergekit works on task vectors
x_t = f_t - b and adds b back; their Gram matrix comes from the inputs' (G_tau = G_ff - G_fb - G_bf
+ G_bb, in float64).

NuSLERP (mergekit ``nuslerp``, flattened): t = w_2 / (w_1 + w_2) (0.5 when the sum is ~0), SLERP of
x_1, x_2 with cos from the unit vectors (norms clamped at 1e-7), linear when 1 - cos^2 <= 1e-16.
Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): weights normalised to sum
1, u_t = x_t / (|x_t| + eps), mean direction m = sum w_t u_t / |.|, tangent r = sum w_t (u_t -
(u_t.m) m), out = (m cos|r| + r sin|r| / |r|) * sum_t w_t |x_t| (|r| + eps, eps 1e-8).
Karcher mean: the iterative weighted Riemannian mean of the unit vectors (equal weights, max_iter,
tol), rescaled by the mean norm (mergekit's ``karcher``).
NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): per element,
w = clamp(t / max(|b - f|, 1e-6), 0, 1), out = w f + (1 - w) b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from surgery.methods.spec import WEIGHTS, Combine, Method, Operands, Param

MERGEKIT = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"


def _symmetric(gram):
    """The full Gram matrix from the engine's upper triangle (float64)."""
    import numpy as np

    g = np.triu(np.asarray(gram, np.float64))
    return g + np.triu(g, 1).T


def _vectors(gram, n_models: int):
    """(G, to_inputs): the Gram matrix of the vectors the method averages (task vectors when there is
    a base) and the map from their coefficients to coefficients over the inputs."""
    import numpy as np

    g = _symmetric(gram)
    if g.shape[0] == n_models:  # no base: the models themselves
        return g, lambda c: tuple(float(x) for x in c)
    gt = g[1:, 1:] - g[1:, :1] - g[:1, 1:] + g[0, 0]
    return gt, lambda c: (1.0 - float(np.sum(c)), *(float(x) for x in c))


def nuslerp_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    g, to_inputs = _vectors(gram, n_models)
    w = [float(x) for x in params["weights"]]
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    n0, n1 = max(math.sqrt(max(g[0, 0], 0.0)), 1e-7), max(math.sqrt(max(g[1, 1], 0.0)), 1e-7)
    cos = max(-1.0, min(1.0, g[0, 1] / (n0 * n1)))
    if 1.0 - cos * cos <= 1e-16:
        return to_inputs([1.0 - t, t])
    theta = math.acos(cos)
    s = math.sin(theta)
    return to_inputs([math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s])


def multislerp_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    import numpy as np

    g, to_inputs = _vectors(gram, n_models)
    T = g.shape[0]
    if T == 1:
        return to_inputs(np.ones(1))
    eps = float(params.get("eps", 1e-8))
    w = np.asarray(params["weights"], np.float64)
    if params.get("normalize_weights", "true") == "true":
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    units = np.diag(1.0 / (norms + eps))  # row t: u_t in coefficients over x
    mean = w @ units
    mean_norm = math.sqrt(max(mean @ g @ mean, 0.0))
    if mean_norm < eps:
        if T == 2:
            return to_inputs(w)
        from surgery.errors import IncompatibleTensorsError

        raise IncompatibleTensorsError(
            "multislerp: the weighted sum of the input directions is zero (opposite task vectors)",
            hint="change the weights",
        )
    mean = mean / mean_norm
    dots = units @ g @ mean
    tangent = w @ (units - dots[:, None] * mean[None, :])
    tangent_norm = math.sqrt(max(tangent @ g @ tangent, 0.0)) + eps
    result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return to_inputs(result * float(w @ norms))


def karcher_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    """mergekit's karcher_merge_tensors in coefficient space (every input is averaged, equal weights)."""
    import numpy as np

    g = _symmetric(gram)
    n = g.shape[0]
    if n == 1:
        return (1.0,)
    tol, max_iter = float(params.get("tol", 1e-5)), int(params.get("max_iter", 10))
    alphas = np.full(n, 1.0 / n)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return (0.0,) * n
    units = {i: np.eye(n)[i] / norms[i] for i in valid}
    a = alphas[valid] / alphas[valid].sum()

    def norm(c):
        return math.sqrt(max(c @ g @ c, 0.0))

    mean = sum(ai * units[i] for ai, i in zip(a, valid))
    mean = units[valid[0]].copy() if norm(mean) < tol else mean / norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros(n)
        for ai, i in zip(a, valid):
            dot = max(-1.0, min(1.0, float(mean @ g @ units[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += ai * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = norm(mean)
        if un > tol:
            mean = mean / un
    return tuple(float(x) for x in mean * float(alphas @ norms))


def _weighted_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_weighted(x.inputs, coeffs, out)


def _nearswap_apply(be, x: Operands, coeffs, scale, out) -> None:
    import numpy as np

    base, model = x.inputs[0], x.inputs[1]
    t = np.float32(x.params["t"])
    w = np.clip(t / np.maximum(np.abs(base - model), np.float32(1e-6)), 0, 1).astype(np.float32)
    np.copyto(out, w * model + (1 - w) * base)


def _combine(name: str, coefficients) -> Combine:
    return Combine(name, uses_tau=False, adds_update=False, apply=_weighted_apply,
                   coefficients=coefficients, gram_over="inputs")  # fmt: skip


NUSLERP = Method(
    name="nuslerp",
    title="NuSLERP (mergekit): SLERP of two task vectors (or models) with weights",
    paper=MERGEKIT,
    formula="b + slerp(w2 / (w1 + w2), f_1 - b, f_2 - b)",
    combine=_combine("nuslerp", nuslerp_coefficients),
    needs_base=False,
    min_models=2,
    max_models=2,
    params=(WEIGHTS,),
)

MULTISLERP = Method(
    name="multislerp",
    title="Multi-SLERP (mergekit): barycentric interpolation on the hypersphere",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    formula="b + exp_m(sum_t w_t log_m(u_t)) * sum_t w_t |f_t - b|",
    combine=_combine("multislerp", multislerp_coefficients),
    needs_base=False,
    params=(
        WEIGHTS,
        Param("normalize_weights", "choice", "true", "divide the weights by their sum", ("true", "false")),
        Param("eps", "float", 1e-8, "numerical floor of norms"),
    ),
)

KARCHER = Method(
    name="karcher",
    title="Karcher mean (mergekit): Riemannian mean of the inputs' directions",
    paper="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    formula="argmin_m sum_t d(m, u_t)^2 on the sphere, times mean_t |f_t|",
    combine=_combine("karcher", karcher_coefficients),
    needs_base=False,
    params=(
        Param("max_iter", "int", 10, "iterations of the Riemannian gradient step"),
        Param("tol", "float", 1e-5, "stop when the tangent step is shorter"),
    ),
)

NEARSWAP = Method(
    name="nearswap",
    title="NearSwap (mergekit): take the model where it is within t of the base",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    formula="w = clamp(t / |b - f|, 0, 1); out = w f + (1 - w) b",
    combine=Combine("nearswap", uses_tau=False, adds_update=False, apply=_nearswap_apply),
    max_models=1,
    params=(Param("t", "float", 0.001, "distance below which the model's value is taken"),),
)
