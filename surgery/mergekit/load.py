"""From a mergekit YAML file to our recipe: read the config, open the inputs' headers, resolve, map.

Only headers are read (tensor names, shapes, config.json), so ``surgery convert`` answers in
milliseconds for local inputs; Hub ids are resolved like every other input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import open_checkpoint
from surgery.errors import RecipeError
from surgery.mergekit.config import MergekitConfig, ModelRef, parse_config
from surgery.mergekit.methods import get_mk_method, require_runnable
from surgery.mergekit.native import native_recipe
from surgery.mergekit.resolve import ModelInfo, TensorSpec, normalized_slices, resolve_tensors
from surgery.mergekit.tokenizer import recipe_extras
from surgery.names import layer_map
from surgery.recipe import Recipe, read_yaml, recipe_from_dict


@dataclass(frozen=True)
class Converted:
    """A mergekit config and the recipe that computes the same merge."""

    config: MergekitConfig
    recipe: Recipe
    specs: list[TensorSpec]
    notes: list[str]


def load_any(path: str | Path, on_card_base: Callable[[str], None] | None = None) -> tuple[Recipe, list[str]]:
    """A surgery recipe or a mergekit config (told apart by ``merge_method``), as our recipe + notes."""
    from surgery.mergekit.config import looks_like_mergekit

    data = read_yaml(path)
    if looks_like_mergekit(data):
        converted = convert_config(data)  # type: ignore[arg-type]
        return converted.recipe, converted.notes
    return recipe_from_dict(data, Path(path), on_card_base), []


def convert_file(path: str | Path) -> Converted:
    data = read_yaml(path)
    if not isinstance(data, dict) or "merge_method" not in data:
        raise RecipeError(f"{path} is not a mergekit config (it has no merge_method)")
    return convert_config(data)


def convert_config(data: dict) -> Converted:
    """Parse, validate against the inputs' headers, and translate a mergekit config."""
    config = parse_config(data)
    method = get_mk_method(config.merge_method)
    require_runnable(method)
    opened: dict[ModelRef, object] = {}
    infos: dict[ModelRef, ModelInfo] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def info(ref: ModelRef) -> ModelInfo:
        if ref not in infos:
            ckpt = open_checkpoint(ref.source)
            opened[ref] = ckpt
            names = tuple(ckpt.tensors)
            layers = layer_map(list(names), ckpt.config())
            infos[ref] = ModelInfo(names, layers.num_blocks)
            for name, t in ckpt.tensors.items():
                shapes.setdefault(name, tuple(t.shape))
        return infos[ref]

    try:
        specs, notes = resolve_tensors(config, method, info)
        float_specs = [s for s in specs if _is_float(opened, s)]
        slices = normalized_slices(config, method, info)

        def root(ref: ModelRef) -> Path:
            info(ref)  # opens it
            return opened[ref].root  # type: ignore[attr-defined]

        refs = tuple(dict.fromkeys(m for s in specs for m in s.models))
        extras = recipe_extras(config, refs, root)
        shape = lambda n: shapes.get(n, (1,))  # noqa: E731
        recipe = native_recipe(config, method, float_specs or specs, shape, slices, extras)
    finally:
        for ckpt in opened.values():
            ckpt.close()  # type: ignore[attr-defined]
    return Converted(config, recipe, specs, notes)


def _is_float(opened: dict, spec: TensorSpec) -> bool:
    ckpt = opened.get(spec.models[0])
    info = ckpt.tensors.get(spec.sources[0]) if ckpt is not None else None  # type: ignore[attr-defined]
    return info is None or info.dtype.kind == "float"


def merge_schedule(source: str, settings: dict) -> tuple[dict, dict[str, dict[str, float]]]:
    """``surgery merge`` per-layer values: (recipe parameters, per_tensor) for settings such as
    ``{"scale": [0.2, 1.0], "density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.2}]}``.
    A setting that is one number stays a recipe parameter; the others are evaluated for every float
    tensor of ``source`` (headers only), with a mergekit config's rule. ``weights`` holds one setting
    per model (``[[0.2, 1.0], 1.0]``, or conditions whose value is such a list): each model's weight
    is evaluated as its own setting, and per tensor they make the ``weights`` list again."""
    from surgery.mergekit.config import check_setting
    from surgery.mergekit.params import is_uniform, schedule
    from surgery.names import place

    settings = dict(settings)
    per_model = _per_model_weights(settings.pop("weights")) if "weights" in settings else []
    for key, setting in settings.items():
        check_setting(setting, key)
    for i, setting in enumerate(per_model):
        check_setting(setting, f"weights of model {i + 1}")
    params = {k: v for k, v in settings.items() if is_uniform(v)}
    varying = {k: v for k, v in settings.items() if not is_uniform(v)}
    if per_model and all(is_uniform(w) for w in per_model):
        params["weights"] = per_model
    elif per_model:
        varying |= {f"weights[{i}]": w for i, w in enumerate(per_model)}
    if not varying:
        return params, {}
    with open_checkpoint(source) as ckpt:
        names = [n for n, t in ckpt.tensors.items() if t.dtype.kind == "float"]
        layers = layer_map(names, ckpt.config())
    per_tensor = schedule(names, layers.num_blocks, varying, lambda n: place(n).block)
    for values in per_tensor.values():
        weights = [values.pop(f"weights[{i}]", None) for i in range(len(per_model))]
        if any(w is not None for w in weights):
            values["weights"] = [1.0 if w is None else w for w in weights]  # no match: the default 1
    return params, per_tensor


def _per_model_weights(setting: object) -> list:
    """One setting per model from ``[w1, w2]`` or ``[{filter, value: [w1, w2]}, ...]``."""
    if not isinstance(setting, list) or not setting:
        raise RecipeError("weights must give one value (or gradient) per model")
    if not any(isinstance(c, dict) for c in setting):
        return list(setting)
    lengths = {len(c["value"]) if isinstance(c.get("value"), list) else -1 for c in setting}
    if len(lengths) != 1 or -1 in lengths:
        raise RecipeError(
            "every --filter ...:weights= and --weights must give one weight per model",
            hint="e.g. --weights 1,1 --filter mlp:weights=0.2:1.0,1",
        )
    n = lengths.pop()
    return [[{**c, "value": c["value"][i]} for c in setting] for i in range(n)]
