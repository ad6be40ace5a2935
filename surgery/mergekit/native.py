"""A resolved mergekit config as one of our recipes, where the same math exists.

mergekit's options are translated onto our parameters so that the numbers are mergekit's, not the
papers' (our own recipes keep the papers' semantics):

    task_arithmetic   b + lambda * sum_t w_t tau_t [/ sum_t w_t if normalize]      -> task_arithmetic
    linear            sum_t w_t f_t [/ sum_t w_t if normalize] (the base, when named, is an input)
    ties              elect: weighted (w_t tau_t before election), disjoint: mean | sum (normalize)
    ties, breadcrumbs rank_counts: mergekit (max(1, int(density n)) in floats; outliers cut back)
    slerp             linear_above 0.9995 (mergekit's threshold)
    model_stock       cos_min -1 (no clamp), filter_wise (one k per row)
    dare_linear       rescale: l1 (mergekit's default), or without rescale weights w_t * density
    della(_linear)    rescale: l1 (mergekit's default) | off; epsilon per model; della elects as ties
    ties, breadcrumbs rescale: true -> rescale: l1 (each trimmed tau back to the L1 norm of tau)
    breadcrumbs(_ties) density >= 1 keeps everything (gamma is then ignored), as in mergekit
    passthrough       the slices' layer ranges, stacked and renumbered; scale -> per_tensor scale
    nearswap          t -> distance;  sce  select_topk -> density;  karcher  max_iter, tol
    nuslerp           weights; nuslerp_flatten / nuslerp_row_wise -> vectors: flat | rows | columns
    multislerp        weights, normalize_weights, eps
    arcee_fusion      as is (whole tensors; exact quartiles where mergekit samples above 1M entries)

Per-tensor values (gradients, filters) become the recipe's ``per_tensor`` entries; a merge of
``slices:`` becomes the recipe's ``layer_slices`` (each input's block range per output slice, so
sources may sit at other layer indices, and each slice may name its own models). Whatever has no
exact translation yet (slices merging different numbers of models, ...) is listed, all reasons at
once, in one ``not supported yet`` error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from surgery.errors import RecipeError
from surgery.mergekit.config import MergekitConfig, ModelRef, OutputSlice
from surgery.mergekit.methods import MkMethod, get_mk_method, require_runnable
from surgery.mergekit.resolve import TensorSpec
from surgery.recipe import Recipe, make_recipe


def native_recipe(
    config: MergekitConfig,
    method: MkMethod,
    specs: list[TensorSpec],
    shape: Callable[[str], tuple[int, ...]],
    slices: tuple[OutputSlice, ...] = (),
    extras: dict | None = None,
) -> Recipe:
    """Our recipe computing what mergekit computes for this config, or an error listing why not.

    Values that differ between tensors (gradients, filters) go to the recipe's ``per_tensor``;
    passthrough's slices become the recipe's ``slices``. ``extras``: recipe fields passed through
    (tokenizer, chat template, adapter bases: ``mergekit.tokenizer.recipe_extras``)."""
    require_runnable(method)
    reasons: list[str] = []
    extras = extras or {}
    if method.name == "passthrough":
        return _stack(config, specs, slices, reasons, extras)
    first = specs[0]
    if any(len(s.models) != len(first.models) or s.has_base != first.has_base for s in specs):
        reasons.append("slices that merge different numbers of models (or one with a base, one without)")
    layer_slices = _layer_slices(method, config, slices) if config.slices else None
    translated = [_translate(method.name, s.shared, s.per_model, shape(s.name), reasons) for s in specs]
    if reasons:
        raise _refuse(method, reasons)
    name, params = translated[0]
    per_tensor = {}
    for spec, (_, p) in zip(specs, translated):
        own = {k: v for k, v in p.items() if v != params[k]}
        if own:
            per_tensor[spec.name] = own
    models = [m.input for m in first.models]
    base = models.pop(0) if first.has_base else None
    dtype = config.out_dtype or config.dtype
    return make_recipe(name, models, base, params, dtype, per_tensor=per_tensor,
                       layer_slices=layer_slices, **extras)  # fmt: skip


def _layer_slices(method: MkMethod, config: MergekitConfig, slices: tuple[OutputSlice, ...]) -> list[dict]:
    """mergekit's slices as the recipe's layer_slices: per slice, each input's layer range in engine
    order (the slice's base first, then its models in config order, as ``resolve`` orders them), and
    the slice's own models when they are not the first slice's."""
    out = []
    first_models = None
    for s in slices:
        base = s.base_model or config.base_model
        sources = list(s.sources)
        if method.base != "ignored" and base is not None:
            sources.sort(key=lambda src: src.model != base)
        models = [src.model.input for src in sources]
        first_models = first_models or models
        entry: dict = {"ranges": [list(src.layer_range) for src in sources]}
        out.append(entry | ({"inputs": models} if models != first_models else {}))
    return out


def _stack(
    config: MergekitConfig,
    specs: list[TensorSpec],
    slices: tuple[OutputSlice, ...],
    reasons: list[str],
    extras: dict,
) -> Recipe:
    """passthrough: the slices' models (each once, in order of appearance) and their layer ranges;
    ``scale`` (per tensor: gradients and filters allowed) becomes the tensors' own ``scale``."""
    scales = {s.name: float(s.per_model["scale"][0]) for s in specs if s.per_model["scale"][0] is not None}
    if config.tokenizer_source not in (None, "base"):
        reasons.append(f"tokenizer_source: {config.tokenizer_source}")
    if config.tokens or config.pad_to_multiple_of:
        reasons.append("tokenizer.tokens / pad_to_multiple_of")
    if reasons:
        raise _refuse(get_mk_method("passthrough"), reasons)
    extras = {k: v for k, v in extras.items() if k != "tokenizer"}  # layer stacks keep one model's
    models: list[ModelRef] = []
    for s in slices:
        if s.sources[0].model not in models:
            models.append(s.sources[0].model)
    stack = [
        {"model": models.index(s.sources[0].model), "layers": list(s.sources[0].layer_range)} for s in slices
    ]
    dtype = config.out_dtype or config.dtype
    per_tensor = {name: {"scale": v} for name, v in scales.items() if v != 1.0}
    return make_recipe("passthrough", [m.input for m in models], None, {}, dtype, per_tensor=per_tensor,
                       slices=stack, **extras)  # fmt: skip


def _refuse(method: MkMethod, reasons: list[str]) -> RecipeError:
    listed = "; ".join(dict.fromkeys(reasons))
    return RecipeError(
        f"mergekit config: merge_method {method.name} with {listed} is not supported yet",
        hint="see README.md, 'Coming from mergekit', for what runs as is",
    )


def _translate(
    name: str, shared: dict, per_model: dict, shape: tuple[int, ...], reasons: list[str]
) -> tuple[str, dict]:
    if name == "linear":  # normalize: false sums w_t f_t (no division)
        return "linear", {"weights": list(per_model["weight"]), "normalize": bool(shared["normalize"])}
    if name == "slerp":  # mergekit: linear above |cos| 0.9995 (ours: 1 - 1e-6)
        return "slerp", {"t": float(shared["t"]), "linear_above": 0.9995}
    if name == "model_stock":  # mergekit does not clamp the mean cosine to [0, 1]
        return "model_stock", {"cos_min": -1.0, "filter_wise": bool(shared["filter_wise"])}
    if name in _SPHERICAL:
        return name, _SPHERICAL[name](shared, per_model, reasons)
    if name == "arcee_fusion":  # no parameters; exact quartiles (mergekit samples above 1M entries)
        return "arcee_fusion", {}
    return _task_arithmetic_family(name, shared, per_model, shape, reasons)


def _nuslerp(shared: dict, per_model: dict, reasons: list[str]) -> dict:
    """nuslerp_flatten (default) slerps whole tensors; otherwise per row, or per column (vectors
    along the first axis) with nuslerp_row_wise."""
    vectors = "flat" if shared["nuslerp_flatten"] else "columns" if shared["nuslerp_row_wise"] else "rows"
    return {"weights": [float(w) for w in per_model["weight"]], "vectors": vectors}


def _multislerp(shared: dict, per_model: dict, reasons: list[str]) -> dict:
    normalize = "true" if shared["normalize_weights"] else "false"
    weights = [float(w) for w in per_model["weight"]]
    return {"weights": weights, "normalize_weights": normalize, "eps": float(shared["eps"])}


def _sce(shared: dict, per_model: dict, reasons: list[str]) -> dict:
    """select_topk is the fraction kept (>= 1: all; int8_mask changes memory only)."""
    topk = float(shared["select_topk"])
    if topk <= 0.0:
        reasons.append(f"select_topk {topk} (keeps nothing: the base)")
    return {"density": min(1.0, max(topk, 1e-6))}


def _karcher(shared: dict, per_model: dict, reasons: list[str]) -> dict:
    max_iter = float(shared["max_iter"])
    if max_iter != int(max_iter) or max_iter < 0:
        reasons.append(f"max_iter {max_iter}")
    return {"max_iter": max(0, int(max_iter)), "tol": float(shared["tol"])}


# mergekit's spherical methods, SCE and NearSwap: the same math under our parameter names.
_SPHERICAL: dict[str, Callable[[dict, dict, list[str]], dict]] = {
    "nearswap": lambda shared, per_model, reasons: {"distance": float(shared["t"])},
    "nuslerp": _nuslerp,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "sce": _sce,
}


_NATIVE = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
}


def _task_arithmetic_family(
    name: str, shared: dict, per_model: dict, shape: tuple[int, ...], reasons: list[str]
) -> tuple[str, dict]:
    """One tensor's values. The method stays the same for every tensor (density 1 keeps all)."""
    weights = [float(w) for w in per_model["weight"]]
    divisor = sum(weights) if shared["normalize"] and abs(sum(weights)) >= 1e-8 else 1.0
    params: dict = {"scale": float(shared["lambda"])}
    densities = [min(1.0, _finite(d, "density", reasons)) for d in per_model["density"]]
    # mergekit skips a model's sparsification (gamma included) when its density is >= 1
    gammas = [
        _finite(g, "gamma", reasons) if d < 1 else 0.0 for g, d in zip(per_model.get("gamma", ()), densities)
    ]
    sparsified = name != "task_arithmetic" and min(densities) < 1.0
    dare = name in ("dare_linear", "dare_ties")
    ties = name in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    if ties:  # weights before election; normalize divides by the agreeing weights
        params.update(weights=weights, elect="weighted", disjoint="mean" if shared["normalize"] else "sum")
    else:
        params["weights"] = [w / divisor for w in weights]
    if name == "task_arithmetic":
        return "task_arithmetic", params
    if min(densities) <= 0.0:
        reasons.append(f"density {min(densities)}")
        return _NATIVE[name], params
    density = densities[0] if len(set(densities)) == 1 else densities
    if name in ("della", "della_linear"):
        magprune = _magprune(per_model, densities, shape, sparsified, reasons)
        return _NATIVE[name], {**params, **magprune, "rescale": "l1" if shared["rescale"] else "off"}
    if dare:
        if shared["rescale"]:  # masked tau back to the L1 norm of tau (the 1/p is then irrelevant)
            return _NATIVE[name], {**params, "density": density, "rescale": "l1"}
        # ours keeps m tau / density, mergekit m tau: fold the density back in
        if not ties:
            params["weights"] = [w * d for w, d in zip(params["weights"], densities)]
        elif isinstance(density, float):
            params["scale"] *= density
        elif params["disjoint"] == "sum":
            params["weights"] = [w * d for w, d in zip(weights, densities)]
        else:
            reasons.append("different density per model with rescale: false and normalize: true")
        return _NATIVE[name], {**params, "density": density, "rescale": "none"}
    # magnitude (ties) and magnitude_outliers (breadcrumbs): mergekit counts int(x * n) in floats
    # mergekit's rescale: true brings the trimmed tau back to its L1 norm (a no-op at density 1)
    params.update(
        density=density,
        granularity="per_tensor",
        rank_counts="mergekit",
        rescale="l1" if shared["rescale"] else "none",
    )
    if name != "ties":
        params["outliers"] = gammas[0] if len(set(gammas)) == 1 else gammas
    return _NATIVE[name], params


def _magprune(
    per_model: dict, densities: list[float], shape: tuple[int, ...], sparsified: bool, reasons: list[str]
) -> dict:
    """DELLA's density and epsilon, checked as mergekit checks them; mergekit ranks |tau| along the
    second axis (a 1-D tensor is one row), ours along the last: the same for 1-D and 2-D tensors."""
    epsilons = [_finite(e, "epsilon", reasons) for e in per_model["epsilon"]]
    for d, e in zip(densities, epsilons):
        if d < 1.0 and not (d - abs(e) > 0.0 and d + abs(e) < 1.0):
            reasons.append(
                f"density {d} with epsilon {e} (keep probabilities outside (0, 1); mergekit fails)"
            )
    if sparsified and len(shape) > 2:
        reasons.append(f"della on a {len(shape)}-D tensor (mergekit ranks along its second axis)")
    elif sparsified and (shape[-1] if shape else 1) == 1:
        reasons.append("della on a tensor with one entry per row (mergekit fails on it: 0/0 rank)")
    one = lambda values: values[0] if len(set(values)) == 1 else values  # noqa: E731
    return {"density": one(densities), "epsilon": one(epsilons)}


def _finite(value: object, key: str, reasons: list[str]) -> float:
    value = float(value)  # type: ignore[arg-type]
    if not math.isfinite(value):
        reasons.append(f"{key} {value}")
    return value
