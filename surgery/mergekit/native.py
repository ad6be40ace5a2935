"""A resolved mergekit config as one of our recipes, where the same math exists.

mergekit's options are translated onto our parameters so that the numbers are mergekit's, not the
papers' (our own recipes keep the papers' semantics):

    task_arithmetic   b + lambda * sum_t w_t tau_t [/ sum_t w_t if normalize]      -> task_arithmetic
    linear            sum_t w_t f_t / sum_t w_t (the base, when named, is an input)  -> linear
    ties              TIES with mergekit's weighted election: equals ours when the weights are equal
    dare_linear       masks without rescale: weights w_t * density (ours divides by density)
    breadcrumbs(_ties) density >= 1 keeps everything (gamma is then ignored), as in mergekit

Whatever has no exact translation yet (per-tensor values, layer stacking, L1 rescale, ...) is listed,
all reasons at once, in one ``not supported yet`` error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from surgery.errors import RecipeError
from surgery.mergekit.config import MergekitConfig
from surgery.mergekit.methods import MkMethod, require_runnable
from surgery.mergekit.resolve import TensorSpec
from surgery.ranks import rank_count
from surgery.recipe import Recipe, make_recipe

_NO_EFFECT = {"int8_mask"}  # mask dtype only


def native_recipe(
    config: MergekitConfig, method: MkMethod, specs: list[TensorSpec], numel: Callable[[str], int]
) -> Recipe:
    """Our recipe computing what mergekit computes for this config, or an error listing why not."""
    require_runnable(method)
    reasons: list[str] = []
    first = specs[0]
    if any(s.models != first.models or s.sources != (s.name,) * len(s.sources) for s in specs):
        reasons.append(
            "slices that stack or move layers (output layers read from other layer indices or models)"
        )
    shared, per_model = _uniform(specs, reasons)
    tok = config.tokenizer_source
    if tok not in (None, "base") and not (first.has_base and tok == str(first.models[0])):
        reasons.append(f"tokenizer_source: {tok} (a tokenizer other than the base's)")
    if reasons:
        raise _refuse(method, reasons)
    models = [m.source for m in first.models]
    base = models.pop(0) if first.has_base else None
    name, params = _translate(method.name, shared, per_model, [numel(s.name) for s in specs], reasons)
    if reasons:
        raise _refuse(method, reasons)
    dtype = config.out_dtype or config.dtype
    return make_recipe(name, models, base, params, dtype)


def _refuse(method: MkMethod, reasons: list[str]) -> RecipeError:
    listed = "; ".join(reasons)
    return RecipeError(
        f"mergekit config: merge_method {method.name} with {listed} is not supported yet",
        hint="see README.md, 'Coming from mergekit', for what runs as is",
    )


def _uniform(specs: list[TensorSpec], reasons: list[str]) -> tuple[dict, dict]:
    """The one value of each parameter over all tensors; a reason for each that varies."""
    shared, per_model = dict(specs[0].shared), dict(specs[0].per_model)
    for key in shared:
        if key not in _NO_EFFECT and len({s.shared[key] for s in specs}) > 1:
            reasons.append(f"per-tensor values of {key!r} (a gradient or filter)")
    for key in per_model:
        if len({s.per_model[key] for s in specs}) > 1:
            reasons.append(f"per-tensor values of {key!r} (a gradient or filter)")
    return shared, per_model


def _translate(
    name: str, shared: dict, per_model: dict, numels: list[int], reasons: list[str]
) -> tuple[str, dict]:
    if name == "linear":
        if not shared["normalize"]:
            reasons.append("normalize: false")
        return "linear", {"weights": list(per_model["weight"])}
    if name == "passthrough":
        if per_model["scale"][0] is not None:
            reasons.append("scale")
        return "linear", {}
    if name in ("slerp", "model_stock"):
        reasons.append(
            "mergekit's numerics (slerp: linear above |cos| 0.9995; model_stock: no clamp of cos to [0, 1])"
        )
        return name, {}
    return _task_arithmetic_family(name, shared, per_model, numels, reasons)


def _task_arithmetic_family(
    name: str, shared: dict, per_model: dict, numels: list[int], reasons: list[str]
) -> tuple[str, dict]:
    weights = [float(w) for w in per_model["weight"]]
    divisor = sum(weights) if shared["normalize"] and abs(sum(weights)) >= 1e-8 else 1.0
    params: dict = {"scale": float(shared["lambda"])}
    density = _one(per_model, "density", reasons)
    gamma = _one(per_model, "gamma", reasons) if "gamma" in per_model else 0.0
    sparsified = name != "task_arithmetic" and density < 1.0
    if shared["rescale"] and sparsified:
        reasons.append("rescale: true (mergekit rescales to the tensor's L1 norm)")
    ties = name in ("ties", "dare_ties", "breadcrumbs_ties")
    if ties:
        if not shared["normalize"]:
            reasons.append("normalize: false with sign consensus (the sum of the agreeing updates)")
        if len(set(weights)) > 1 or weights[0] <= 0:
            reasons.append("unequal weights with sign consensus (mergekit elects on weighted updates)")
        params["weights"] = [1.0] * len(weights)
    else:
        params["weights"] = [w / divisor for w in weights]
    if not sparsified:
        if ties:  # consensus without trimming is our TIES keeping everything
            return "ties", {**params, "density": 1.0}
        return "task_arithmetic", params
    if name in ("dare_linear", "dare_ties"):
        if ties:
            params["scale"] *= density  # ours divides the kept entries by density; mergekit does not
        else:
            params["weights"] = [w * density for w in params["weights"]]
        return ("dare_ties" if ties else "dare"), {**params, "density": density}
    # magnitude (ties) and magnitude_outliers (breadcrumbs): mergekit counts int(x * n) in floats
    at_least_one = name == "ties"
    for n in numels:
        keep = int(density * n)
        top = int(gamma * n)
        ours = rank_count(density, n)
        if (max(1, keep) if at_least_one else keep) != ours or top != rank_count(gamma, n) or keep + top > n:
            reasons.append(f"density {density} / gamma {gamma} on a tensor of {n} entries (rank rounding)")
            break
    params.update(density=density, granularity="per_tensor")
    if name == "ties":
        return "ties", params
    return name, {**params, "outliers": gamma}


def _one(per_model: dict, key: str, reasons: list[str]) -> float:
    values = set(per_model[key])
    if len(values) > 1:
        reasons.append(f"different {key} per model")
    value = float(min(values))
    if not math.isfinite(value):
        reasons.append(f"{key} {value}")
    return value
