"""Recipes: the one way to say what to compute, saved beside every output.

Schema (YAML), every field explicit in a saved recipe::

    version: 1
    method: breadcrumbs            # see `surgery methods`
    base: /models/base             # optional for linear / slerp
    models: [/models/ft_a, /models/ft_b]
    parameters:                    # the method's parameters; omitted ones take their defaults
      density: 0.1
      outliers: 0.01
      granularity: per_tensor
      scale: 1.0
      weights: [1.0, 1.0]
    output:
      dtype: null                  # float dtype of merged tensors; null keeps each base tensor's
      max_shard_size: 5000000000   # bytes (strings such as 5GB or 2GiB are accepted)
    per_tensor:                    # optional: a tensor's own values (per-layer schedules, mergekit
      model.layers.0.mlp.up_proj.weight: {scale: 0.2}   # gradients and filters, resolved)
    slices:                        # passthrough only: stack layer ranges [start, end) of the models
      - {model: 0, layers: [0, 24]}
    layer_slices:                  # merging methods: per output slice, the blocks [start, end) of each
      - {ranges: [[0, 8], [4, 12]]}  # input (base first) merged into the next output blocks; optional
      - {ranges: [[8, 16], [0, 8]], inputs: [/models/base, /models/ft_c]}  # the slice's own models
    lines:                         # optional LiNeS on the merged update (arXiv 2410.17146)
      alpha: auto                  # number, or auto = ||sum tau||_1 / (T ||tau_merged||_1)
      beta: null                   # null = 1 - alpha
      outside: alpha               # scale of tensors outside the blocks: alpha | alpha+beta | one
    tokenizer:                     # optional: inputs with different tokenizers (mergekit's rule,
      source: union                # see surgery/vocab_union.py): base | union | an input's path
      base: /models/base           # whose rows fill tokens other inputs lack (null: none)
      tokens: {"<|im_start|>": {source: {kind: zero}, force: false}}
      pad_to_multiple_of: null
    chat_template: null            # optional: Jinja text written as the output's chat_template.jinja
    adapter_bases:                 # optional: a LoRA adapter input -> the model it is applied to
      /adapters/a: /models/ft_x    # (mergekit's model+lora); default: the recipe's base

Relative paths in a recipe file are resolved against the recipe file's folder (so a recipe and its
models can move together); recipes written by surgery hold absolute paths, so
``surgery run OUT/surgery_recipe.yaml -o OUT2`` reproduces OUT bit for bit. Without ``base:``, a
method that needs a base takes the one every model's card names, as ``surgery merge`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from surgery.dtypes import parse_output_dtype
from surgery.errors import RecipeError
from surgery.layer_slices import LayerSlice, check_layer_slices, extra_inputs
from surgery.methods import Method, get_method
from surgery.methods.lines import LinesSchedule, make_schedule
from surgery.tokenizer_files import TokenizerSpec, check_chat_template, tokenizer_spec

RECIPE_VERSION = 1

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``5GB`` -> 5_000_000_000, ``2GiB`` -> 2_147_483_648, ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise RecipeError(f"cannot read size {text!r}", hint="write sizes like 500MB, 5GB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Recipe:
    method: str
    models: tuple[str, ...]
    base: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None  # safetensors float dtype name of merged tensors
    max_shard_size: int = 5 * 10**9
    lines: LinesSchedule | None = None  # LiNeS on the merged update (parsed once, here)
    per_tensor: dict[str, dict] = field(default_factory=dict)  # tensor name -> its own parameter values
    slices: tuple[tuple[int, int, int], ...] = ()  # passthrough: (model index, first block, end block)
    # a merge of other blocks (mergekit slices): per output slice, one [start, end) per input
    layer_slices: tuple[LayerSlice, ...] = ()
    tokenizer: TokenizerSpec | None = None  # the output vocabulary when inputs' tokenizers differ
    chat_template: str | None = None  # Jinja text for the output's tokenizer
    adapter_bases: dict[str, str] = field(default_factory=dict)  # adapter input -> model it applies to

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every input in engine order: base first (when there is one), then the models."""
        return ((self.base,) if self.base else ()) + self.models

    def to_dict(self) -> dict:
        return {
            "version": RECIPE_VERSION,
            "method": self.method,
            "base": self.base,
            "models": list(self.models),
            "parameters": dict(self.parameters),
            "lines": None if self.lines is None else self.lines.to_dict(),
            "output": {"dtype": self.dtype, "max_shard_size": self.max_shard_size},
        } | self._extras()

    def _extras(self) -> dict:
        """Keys written only when used, so that other recipes stay as they were."""
        extras: dict = {}
        if self.per_tensor:
            extras["per_tensor"] = {k: dict(v) for k, v in self.per_tensor.items()}
        if self.slices:
            extras["slices"] = [{"model": m, "layers": [a, b]} for m, a, b in self.slices]
        if self.layer_slices:
            extras["layer_slices"] = [s.to_dict() for s in self.layer_slices]
        if self.tokenizer is not None:
            extras["tokenizer"] = self.tokenizer.to_dict()
        if self.chat_template is not None:
            extras["chat_template"] = self.chat_template
        if self.adapter_bases:
            extras["adapter_bases"] = dict(self.adapter_bases)
        return extras

    def to_yaml(self) -> str:
        import yaml

        head = "# model-surgery recipe: `surgery run THIS_FILE -o OUT` reproduces the output\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False)


def make_recipe(
    method: str,
    models: list[str] | tuple[str, ...],
    base: str | None = None,
    parameters: dict | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = 5 * 10**9,
    lines: dict | LinesSchedule | None = None,
    per_tensor: dict[str, dict] | None = None,
    slices: list | None = None,
    layer_slices: list | None = None,
    tokenizer: dict | TokenizerSpec | None = None,
    chat_template: str | None = None,
    adapter_bases: dict[str, str] | None = None,
) -> Recipe:
    """Validate and complete a recipe: method known, parameters typed and in range, defaults filled."""
    spec = get_method(method)
    models = tuple(_absolute(m) for m in models)
    base = _absolute(base) if base else None
    # A method with fixed endpoints (SLERP) counts a base as one of them.
    n_inputs = len(models) + (1 if base and spec.endpoints else 0)
    if spec.needs_base and not base:
        raise RecipeError(
            f"method {spec.name} needs a base model",
            hint="pass --base BASE (or name it as base_model in the fine-tunes' model cards)",
        )
    if n_inputs < spec.min_models or (spec.endpoints and n_inputs != spec.endpoints):
        need = f"exactly {spec.endpoints} endpoints" if spec.endpoints else f"at least {spec.min_models}"
        raise RecipeError(
            f"method {spec.name} needs {need} models, got {n_inputs}",
            hint=f"{spec.name} takes {spec.endpoints} models, or --base and {spec.endpoints - 1} model"
            if spec.endpoints
            else None,
        )
    if spec.max_models is not None and n_inputs > spec.max_models:
        raise RecipeError(f"method {spec.name} takes at most {spec.max_models} models")
    params = _resolve_parameters(spec, dict(parameters or {}), len(models))
    per_model = [k for k in ("density", "outliers", "epsilon") if isinstance(params.get(k), list)]
    if per_model and params.get("granularity") == "global":
        raise RecipeError(f"global ranks take one {per_model[0]} for every model, not one per model")
    normalized = params.get("normalize", True)
    if spec.combine.name == "linear" and normalized and sum(params["weights"]) == 0.0:  # divided by the sum
        raise RecipeError(
            f"{spec.name}: the weights {params['weights']} sum to 0, and a weighted average divides "
            "by their sum",
            hint="give weights with a non-zero sum (they are normalised: 1,1 and 0.5,0.5 are the same "
            "merge); for a difference of models use task arithmetic with --base",
        )
    out_dtype = parse_output_dtype(dtype) if dtype else None
    schedule = make_schedule(lines)
    if schedule is not None and not base:
        raise RecipeError("LiNeS scales the update relative to a base: pass --base BASE")
    recipe = Recipe(spec.name, models, str(base) if base else None, params, out_dtype)
    shard = parse_size(max_shard_size)
    if shard < 1:
        raise RecipeError(f"max_shard_size must be at least 1 byte, not {max_shard_size!r}",
                          hint="write sizes like 500MB or 5GB")  # fmt: skip
    slice_list = _check_layer_slices(spec, layer_slices, recipe, schedule)
    return replace(
        recipe,
        max_shard_size=shard,
        lines=schedule,
        per_tensor=_check_per_tensor(spec, per_tensor or {}, len(models), params),
        slices=_check_slices(spec, slices, len(models)),
        layer_slices=slice_list,
        tokenizer=None if tokenizer is None else tokenizer_spec(tokenizer, _absolute),  # inputs' path form
        chat_template=check_chat_template(chat_template),
        adapter_bases=_check_adapter_bases(
            adapter_bases or {}, (*recipe.inputs, *extra_inputs(recipe.inputs, slice_list))
        ),
    )


def _check_adapter_bases(bases: object, inputs: tuple[str, ...]) -> dict[str, str]:
    """Each key must be an input (the adapter); the value is the model it is applied to."""
    if not isinstance(bases, dict):
        raise RecipeError("adapter_bases must map adapter inputs to the models they are applied to")
    out = {_absolute(k): _absolute(v) for k, v in bases.items()}
    stray = sorted(k for k in out if k not in inputs)
    if stray:
        raise RecipeError(
            f"adapter_bases names {stray[0]}, which is not an input of the recipe",
            hint="its keys are adapter inputs as listed in models (or base)",
        )
    return out


# Parameters a tensor may set for itself; the others shape the whole run (ranks over all tensors...).
_PER_TENSOR = {"scale", "weights", "density", "outliers", "epsilon", "rescale", "t", "distance", "vectors"}


def _check_per_tensor(spec: Method, per_tensor: object, n_models: int, params: dict) -> dict[str, dict]:
    if not isinstance(per_tensor, dict):
        raise RecipeError("per_tensor must map tensor names to {parameter: value}")
    known = {p.name: p for p in spec.params}
    out = {}
    for name, values in per_tensor.items():
        if not isinstance(values, dict):
            raise RecipeError(f"per_tensor: {name} must map parameter names to values")
        bad = sorted(k for k in values if k not in known or k not in _PER_TENSOR)
        if bad:
            raise RecipeError(
                f"per_tensor: {name} sets {', '.join(bad)}, which {spec.name} cannot vary by tensor",
                hint=f"per-tensor parameters: {', '.join(sorted(_PER_TENSOR & set(known)))}",
            )
        if params.get("granularity") == "global" and {"density", "outliers"} & set(values):
            raise RecipeError(f"per_tensor: {name}: global ranks take one density for the whole model")
        out[str(name)] = {
            k: _check_parameter(spec, k, known[k].kind, v, known[k].choices, n_models)
            for k, v in values.items()
        }
        _check_spread(spec, {**params, **out[str(name)]}, f"per_tensor: {name}: ")
    return out


def _check_slices(spec: Method, slices: list | None, n_models: int) -> tuple[tuple[int, int, int], ...]:
    """Layer stacking: [{model: i, layers: [start, end]}, ...]; only passthrough stacks layers."""
    if not slices:
        if spec.name == "passthrough" and n_models != 1:
            raise RecipeError("passthrough without slices copies one model", hint="give slices: to stack")
        return ()
    if spec.name != "passthrough":
        raise RecipeError(f"method {spec.name} does not stack layers", hint="slices are for passthrough")
    out = []
    for i, entry in enumerate(slices):
        try:
            model, (start, end) = int(entry["model"]), entry["layers"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise RecipeError(f"slices[{i}] must be {{model: INDEX, layers: [START, END]}}") from None
        if not 0 <= model < n_models or not 0 <= start < end:
            raise RecipeError(f"slices[{i}]: model {model} of {n_models}, layers [{start}, {end}) is invalid")
        out.append((model, start, end))
    return tuple(out)


def _check_layer_slices(spec: Method, value: object, recipe: Recipe, lines: LinesSchedule | None) -> tuple:
    """Merging other blocks than the output's (mergekit slices): dense merges only, without LiNeS."""
    if not value:
        return ()
    if spec.name == "passthrough" or spec.output != "dense" or spec.tau_from.name != "models":
        raise RecipeError(
            f"method {spec.name} does not merge layer slices",
            hint="layer_slices are for merging methods; passthrough stacks with slices",
        )
    if lines is not None:
        raise RecipeError("LiNeS depths and layer_slices do not combine yet", hint="leave out lines:")
    return check_layer_slices(value, recipe.inputs, _absolute)


def _absolute(source: str | Path) -> str:
    """Local inputs become absolute paths (so saved recipes work from anywhere); others stay."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _resolve_parameters(spec: Method, given: dict, n_models: int) -> dict:
    known = {p.name: p for p in spec.params}
    unknown = [k for k, v in given.items() if k not in known and v is not None]
    if unknown:
        allowed = ", ".join(known) or "none"
        raise RecipeError(
            f"method {spec.name} takes no parameter {', '.join(map(repr, unknown))}",
            hint=f"its parameters are: {allowed}",
        )
    out: dict = {}
    for name, p in known.items():
        value = given.get(name)
        value = p.default if value is None else value
        out[name] = _check_parameter(spec, p.name, p.kind, value, p.choices, n_models)
    density, outliers = out.get("density"), out.get("outliers")
    exact = out.get("rank_counts", "exact") == "exact"  # mergekit's counts cut the outliers back
    if exact and density is not None and outliers is not None and density + outliers > 1.0:
        raise RecipeError(
            f"{spec.name}: density {density:g} + outliers {outliers:g} > 1: only {1 - outliers:g} of "
            "the entries lie below the outliers, so the density could not be kept",
            hint="density is the fraction KEPT after the largest `outliers` fraction is removed: "
            "lower one of them",
        )
    _check_spread(spec, out, "")
    return out


def _check_spread(spec: Method, params: dict, where: str) -> None:
    """DELLA's keep probabilities density - epsilon .. density + epsilon must lie in (0, 1] for every
    model whose density is below 1 (density 1 keeps every entry, whatever epsilon)."""
    if "epsilon" not in params:
        return
    density, epsilon = params["density"], params["epsilon"]
    n = max(len(v) if isinstance(v, list) else 1 for v in (density, epsilon))
    for t in range(n):
        d = density[t] if isinstance(density, list) else density
        e = epsilon[t] if isinstance(epsilon, list) else epsilon
        low, high = d - abs(e), d + abs(e)
        if d < 1.0 and not (low > 0.0 and high <= 1.0):
            raise RecipeError(
                f"{where}{spec.name}: density {d:g} with epsilon {e:g} gives keep probabilities from "
                f"{low:g} to {high:g}, outside (0, 1]",
                hint="lower epsilon, or move density away from 0 and 1: every entry needs a keep "
                "probability above 0 and at most 1",
            )


def _check_parameter(
    spec: Method, name: str, kind: str, value: object, choices: tuple, n_models: int
) -> object:
    """A parameter's value, checked; every refusal carries a hint (the rule: error + hint)."""
    try:
        return _check_value(spec, name, kind, value, choices, n_models)
    except RecipeError as exc:
        if exc.hint:
            raise
        raise RecipeError(
            exc.message,
            hint=f"`surgery methods` lists {spec.name}'s parameters with their meaning and defaults",
        ) from None


def _check_value(spec: Method, name: str, kind: str, value: object, choices: tuple, n_models: int) -> object:
    where = f"{spec.name}: {name}"
    if kind == "weights":
        return _check_weights(where, value, n_models)
    if name in ("density", "outliers", "epsilon") and isinstance(value, list | tuple):  # one per model
        if len(value) != n_models:
            raise RecipeError(f"{where} has {len(value)} values for {n_models} models")
        return [_check_parameter(spec, name, kind, v, choices, n_models) for v in value]
    if kind == "choice":
        if value not in choices:
            raise RecipeError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, not {value!r}")
        return value
    if kind == "files":
        return _check_files(where, value, n_models)
    if kind == "fixed":
        if value != spec.defaults[name]:
            raise RecipeError(f"{where} is fixed at {spec.defaults[name]!r} for this method")
        return value
    if kind == "regex":
        if value is None:
            return None
        try:
            re.compile(str(value))
        except re.error as exc:
            raise RecipeError(f"{where} is not a valid regular expression: {exc}") from None
        return str(value)
    if kind == "int":
        if value is None:
            raise RecipeError(f"{where} is required (no default)", hint="give it in the recipe's parameters")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RecipeError(f"{where} must be a non-negative integer, not {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise RecipeError(f"{where} must be a non-negative integer, not {value!r}") from None
        if number != float(value) or number < 0:
            raise RecipeError(f"{where} must be a non-negative integer, not {value!r}")
        if name == "lift_rank" and number < 1:
            raise RecipeError(f"{where} must be at least 1, not {number}")
        return number
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RecipeError(f"{where} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise RecipeError(f"{where} must be finite")
    if name == "density" and not 0.0 < number <= 1.0:
        raise RecipeError(f"{where} = {number} is outside (0, 1]", hint="density is the fraction KEPT")
    if name == "outliers" and not 0.0 <= number < 1.0:
        raise RecipeError(f"{where} = {number} is outside [0, 1)")
    if name == "fraction" and not 0.0 <= number <= 1.0:
        raise RecipeError(f"{where} = {number} is outside [0, 1]")
    if name == "t" and not 0.0 <= number <= 1.0:
        raise RecipeError(f"{where} = {number} is outside [0, 1]")
    if name in ("rho", "eta") and not 0.0 < number <= 1.0:
        raise RecipeError(f"{where} = {number} is outside (0, 1]")
    if name == "regmean_alpha" and not 0.0 <= number <= 1.0:
        raise RecipeError(f"{where} = {number} is outside [0, 1]")
    if name == "wudi_lr" and number <= 0:
        raise RecipeError(f"{where} must be positive")
    return number


def _check_files(where: str, value: object, n_models: int) -> list[str]:
    """One existing file per model, in model order; kept as absolute paths."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise RecipeError(
            f"{where}: no files given", hint="pass --calibration FILE once per model, in model order"
        )
    files = [str(v) for v in value]  # type: ignore[union-attr]
    if len(files) != n_models:
        raise RecipeError(
            f"{where} has {len(files)} files for {n_models} models",
            hint="pass --calibration FILE once per model, in model order",
        )
    missing = [f for f in files if not Path(f).expanduser().is_file()]
    if missing:
        from surgery.errors import InputNotFoundError

        raise InputNotFoundError(f"{where}: file not found: {missing[0]}", path=missing[0])
    return [str(Path(f).expanduser().resolve()) for f in files]


def _check_weights(where: str, value: object, n_models: int) -> list[float]:
    if value is None:
        return [1.0] * n_models
    try:
        if isinstance(value, str):
            value = [float(x) for x in value.split(",") if x.strip()]
        weights = [float(x) for x in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise RecipeError(f"{where} must be numbers w1,w2,..., not {value!r}") from None
    if len(weights) != n_models:
        raise RecipeError(
            f"{where} has {len(weights)} values for {n_models} models",
            hint="give one weight per model, in the order of the models",
        )
    if not all(math.isfinite(w) for w in weights):
        raise RecipeError(f"{where} must be finite numbers")
    return weights


def read_yaml(path: str | Path) -> object:
    """A YAML file's content; errors name the file."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        from surgery.errors import InputNotFoundError

        raise InputNotFoundError(f"recipe not found: {path}", hint="check the path", path=str(path)) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None


def load_recipe(path: str | Path, on_card_base: Callable[[str], None] | None = None) -> Recipe:
    """Read and validate a recipe YAML file.

    Relative paths in it are resolved against the file's folder. Without ``base:``, a method that
    needs a base takes the one every model's card names (as ``surgery merge`` does) and reports it
    through ``on_card_base(base)``.
    """
    return recipe_from_dict(read_yaml(path), Path(path), on_card_base)


def recipe_from_dict(data: object, path: Path, on_card_base: Callable[[str], None] | None = None) -> Recipe:
    """Validate a loaded recipe (``path`` names it in errors and anchors its relative paths)."""
    if not isinstance(data, dict) or "method" not in data or "models" not in data:
        raise RecipeError(
            f"{path} is not a surgery recipe (needs at least 'method' and 'models')",
            hint="see `surgery run --help` for the schema",
        )
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise RecipeError(f"{path} has recipe version {data['version']}; this surgery reads 1")
    keys = {"version", "method", "base", "models", "parameters", "lines", "output", "per_tensor", "slices",
            "layer_slices", "tokenizer", "chat_template", "adapter_bases"}  # fmt: skip
    extra = set(data) - keys
    if extra:
        raise RecipeError(f"{path} has unknown keys: {', '.join(sorted(extra))}")
    output = data.get("output") or {}
    models = data["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise RecipeError(f"{path}: 'models' must be a non-empty list of paths")
    base = data.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        raise RecipeError(f"{path}: 'base' must be a path or a Hub id")
    models = [_beside(path, m) for m in models]
    base = _beside(path, base) if base else None
    if base is None and get_method(str(data["method"])).needs_base:
        from surgery.bases import base_from_cards

        base = base_from_cards(models, explicit=f"add `base: PATH` to {path}")
        if on_card_base is not None:
            on_card_base(base)
    return make_recipe(
        data["method"],
        models,
        base,
        data.get("parameters") or {},
        output.get("dtype"),
        output.get("max_shard_size", 5 * 10**9),
        data.get("lines"),
        data.get("per_tensor"),
        data.get("slices"),
        layer_slices=_slices_beside(path, data.get("layer_slices")),
        tokenizer=_relative_paths(data.get("tokenizer"), path),
        chat_template=data.get("chat_template"),
        adapter_bases={
            _beside(path, k): _beside(path, v) for k, v in (data.get("adapter_bases") or {}).items()
        },
    )


def _slices_beside(recipe_file: Path, value: object) -> object:
    """layer_slices' own input paths, relative to the recipe file as the models' are."""
    if not isinstance(value, list):
        return value
    return [
        {**e, "inputs": [_beside(recipe_file, str(m)) for m in e["inputs"]]}
        if isinstance(e, dict) and isinstance(e.get("inputs"), list)
        else e
        for e in value
    ]


def _relative_paths(tokenizer: object, path: Path) -> object:
    """A tokenizer block's model paths, relative to the recipe file like its inputs."""
    if not isinstance(tokenizer, dict):
        return tokenizer
    return tokenizer_spec(tokenizer, lambda p: _beside(path, p)).to_dict()


def _beside(recipe_file: Path, source: str) -> str:
    """A relative path in a recipe means a path relative to the recipe file's folder; a Hub id that is
    not a folder there stays a Hub id."""
    from surgery.hub import parse_hub_id

    given = Path(source).expanduser()
    if given.is_absolute():
        return str(given)
    local = recipe_file.parent / given
    if local.exists() or parse_hub_id(source) is None:
        return str(local.resolve())
    return source
