"""Merges on the hypersphere of flattened tensors: NuSLERP, Multi-SLERP and the Karcher mean.

All three are computed as mergekit 0.1.5 defines them. The vectors are the task vectors tau_i = f_i - b
when a base is given (the result is then added to b), otherwise the models themselves (Karcher: every
input, a base included, is a point).

NuSLERP: t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6), then SLERP of v0, v1:
    cos = v0.v1 / (max(|v0|, 1e-7) max(|v1|, 1e-7)), theta = arccos(cos)
    out = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1     (linear when 1 - cos^2 <= 1e-16)
over the flattened tensors (``vectors: flat``), or per row (``rows``: mergekit's nuslerp_flatten: false)
or per column (``columns``: nuslerp_row_wise: true, vectors along the first axis).

Multi-SLERP: mergekit projects the unit vectors u_i = v_i / (|v_i| + eps) onto the tangent space at
their weighted mean direction m and maps the weighted tangent mean back; that tangent mean
sum_i w_i (u_i - (u_i.m) m) is identically zero (sum_i w_i u_i = |sum_i w_i u_i| m), so the result is
    out = (sum_i w_i |v_i|) * m,    m = sum_i w_i u_i / |sum_i w_i u_i|
(w divided by its sum unless ``normalize_weights: false``)
(mergekit adds rounding noise of the zero tangent, about 1e-7 relative). Two opposite vectors with
|sum w_i u_i| < eps give the linear w1 v1 + w2 v2; more than two are refused, as in mergekit.

Karcher mean (weights 1/N): the iterative Riemannian mean of the unit vectors, at most ``max_iter``
steps, stopping when the tangent norm falls below ``tol``; rescaled by the mean norm.

Every result is a linear combination sum_i c_i v_i whose coefficients depend on the vectors only
through their Gram matrix (Karcher's iterate stays in the span of the u_i: dots and norms are
quadratic forms of G), so these methods stream: one Gram pass, then one combine pass. Per-row and
per-column NuSLERP need one angle per row, so they take the whole tensor (``whole_matrix``).
"""

import math
from collections.abc import Mapping

from surgery.errors import IncompatibleTensorsError
from surgery.methods.spec import WEIGHTS, Combine, Method, Operands, Param

VECTORS = ("flat", "rows", "columns")


def _symmetric(gram):
    import numpy as np

    return np.triu(gram) + np.triu(gram, 1).T


def _out(be, x: Operands, coeffs, out) -> None:
    """out = b + sum_i c_i tau_i with a base, else sum_i c_i v_i."""
    import numpy as np

    if x.tau is None:
        be.combine_weighted(x.models, coeffs, out)
    else:
        be.combine_sum(x.base, x.tau, coeffs, np.float32(1.0), out)


# -- NuSLERP ----------------------------------------------------------------------------------------
def nuslerp_t(weights) -> float:
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


def slerp_pair(t: float, dot: float, n0: float, n1: float) -> tuple[float, float]:
    """(c0, c1) of mergekit's nuslerp for vectors of norms n0, n1 and dot product ``dot``."""
    cos = max(-1.0, min(1.0, dot / (max(n0, 1e-7) * max(n1, 1e-7))))
    if 1.0 - cos * cos <= 1e-16:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def nuslerp_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    if params.get("vectors", "flat") != "flat":
        return (0.0, 0.0)  # one pair per row: computed by the apply from the whole tensor
    g = _symmetric(gram)
    return slerp_pair(nuslerp_t(params["weights"]), g[0, 1], math.sqrt(g[0, 0]), math.sqrt(g[1, 1]))


def _nuslerp_apply(be, x: Operands, coeffs, scale, out) -> None:
    if x.params.get("vectors", "flat") == "flat":
        return _out(be, x, coeffs, out)
    import numpy as np

    v = x.tau if x.tau is not None else x.models
    vecs = v.reshape((2, *x.shape))
    if x.params["vectors"] == "columns":  # mergekit's row_wise: vectors along the first axis
        vecs = np.swapaxes(vecs, 1, -1)
    moved = vecs.shape
    rows = vecs.reshape(2, -1, moved[-1])
    n = np.sqrt(np.einsum("tij,tij->ti", rows, rows, dtype=np.float64))
    dot = np.einsum("ij,ij->i", rows[0], rows[1], dtype=np.float64)
    cos = np.clip(dot / (np.maximum(n[0], 1e-7) * np.maximum(n[1], 1e-7)), -1.0, 1.0)
    t = nuslerp_t(x.params["weights"])
    linear = 1.0 - cos * cos <= 1e-16
    theta = np.arccos(np.where(linear, 0.0, cos))
    s = np.where(linear, 1.0, np.sin(theta))
    c0 = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / s).astype(np.float32)[:, None]
    c1 = np.where(linear, t, np.sin(t * theta) / s).astype(np.float32)[:, None]
    merged = (c0 * rows[0] + c1 * rows[1]).reshape(moved[1:])
    if x.params["vectors"] == "columns":
        merged = np.swapaxes(merged, 0, -1)
    merged = merged.reshape(-1)
    if x.tau is not None:
        merged = x.base + merged
    np.copyto(out, merged)


def _per_row(tensor: str, shape: tuple[int, ...], params: Mapping[str, object]) -> bool:
    return params.get("vectors", "flat") != "flat"


NUSLERP_COMBINE = Combine("nuslerp", uses_tau=True, adds_update=False, apply=_nuslerp_apply,
                          coefficients=nuslerp_coefficients, gram_over="tau",
                          whole_matrix=_per_row)  # fmt: skip

NUSLERP = Method(
    name="nuslerp",
    title="NuSLERP (SLERP of task vectors, weights as the interpolation factor)",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    formula="t = w2/(w1+w2); out = [b +] slerp(t, v1, v2), v = tau (with a base) or the models",
    combine=NUSLERP_COMBINE,
    needs_base=False,
    min_models=2,
    max_models=2,
    params=(
        WEIGHTS,
        Param("vectors", "choice", "flat", "slerp the flattened tensors, each row, or each column", VECTORS),
    ),
    roles="base (optional): task vectors are taken from it; models: the two endpoints",
)


# -- Multi-SLERP ------------------------------------------------------------------------------------
def multislerp_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    import numpy as np

    if n_models == 1:
        return (1.0,)
    g = _symmetric(gram)
    eps = float(params["eps"])
    w = np.asarray(params["weights"], np.float64)
    if params.get("normalize_weights", "true") == "true":
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w / (norms + eps)  # the weighted mean of the unit vectors, as coefficients of the v_i
    mean_norm = math.sqrt(max(0.0, float(a @ g @ a)))
    if mean_norm < eps:
        if n_models == 2:
            return tuple(float(c) for c in w)
        raise IncompatibleTensorsError(
            "multislerp: the weighted mean of the unit vectors is zero (opposite vectors whose "
            "weights cancel)",
            hint="use other weights",
        )
    return tuple(float(c) for c in float(w @ norms) * a / mean_norm)


def _multislerp_apply(be, x: Operands, coeffs, scale, out) -> None:
    if x.models.shape[0] == 1:  # mergekit returns the one model itself
        out[...] = x.models[0]
    else:
        _out(be, x, coeffs, out)


MULTISLERP = Method(
    name="multislerp",
    title="Multi-SLERP (barycentric interpolation on the hypersphere)",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    formula="out = [b +] (sum_i w_i |v_i|) * normalize(sum_i w_i v_i / |v_i|)",
    combine=Combine(
        "multislerp",
        uses_tau=True,
        adds_update=False,
        apply=_multislerp_apply,
        coefficients=multislerp_coefficients,
        gram_over="tau",
    ),  # fmt: skip
    needs_base=False,
    params=(
        WEIGHTS,
        Param("normalize_weights", "choice", "true", "divide the weights by their sum", ("true", "false")),
        Param("eps", "float", 1e-8, "added to each norm before dividing"),
    ),
    roles="base (optional): task vectors are taken from it; models: the points",
)


# -- Karcher mean -----------------------------------------------------------------------------------
def karcher_coefficients(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    """Coefficients c of out = sum_i c_i x_i over every input x_i; the iteration runs on the
    coefficients of the unit vectors, with dots and norms taken through their Gram matrix."""
    import numpy as np

    n = gram.shape[0]
    if n == 1:
        return (1.0,)
    g = _symmetric(gram)
    max_iter, tol = int(params["max_iter"]), float(params["tol"])
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    inv = np.where(norms > 0.0, 1.0 / np.where(norms > 0.0, norms, 1.0), 0.0)
    gu = g * inv[:, None] * inv[None, :]  # Gram matrix of the unit vectors (zero vectors stay zero)
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return (0.0,) * n
    alpha = np.zeros(n)
    alpha[valid] = 1.0 / len(valid)

    def norm(c) -> float:
        return math.sqrt(max(0.0, float(c @ gu @ c)))

    mean = alpha.copy()
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = np.zeros(n)
        mean[valid[0]] = 1.0
    else:
        mean /= mean_norm
    for _ in range(max_iter):
        dots = gu @ mean
        tangent = np.zeros(n)
        for i in valid:
            dot = min(1.0, max(-1.0, float(dots[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = -dot * mean
            step[i] += 1.0
            tangent += alpha[i] * (theta / math.sin(theta)) * step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean /= unit_norm
    scale = float(norms.sum()) / n  # sum_i (1/N) |x_i|, zero vectors included
    return tuple(float(c) for c in scale * mean * inv)


def _karcher_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_weighted(x.inputs, coeffs, out)


KARCHER = Method(
    name="karcher",
    title="Karcher mean (Riemannian centre of mass on the hypersphere)",
    paper="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    formula="out = mean_i |x_i| * argmin_m sum_i arccos(m.x_i/|x_i|)^2, |m| = 1 (Riemannian iteration)",
    combine=Combine(
        "karcher",
        uses_tau=False,
        adds_update=False,
        apply=_karcher_apply,
        coefficients=karcher_coefficients,
        gram_over="inputs",
    ),  # fmt: skip
    needs_base=False,
    params=(
        Param("max_iter", "int", 10, "most iterations of the Riemannian mean"),
        Param("tol", "float", 1e-5, "stop when the tangent step is shorter than this"),
    ),
    roles="models: the points (a base, when given, is one more point)",
)
