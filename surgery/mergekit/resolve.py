"""A mergekit config, evaluated for every output tensor: which inputs, which source names, which values.

This is mergekit's planner (``models:`` become one slice over every model's full layer range; the
base is added as an input when not listed) written as a pure function of the config and the input
models' tensor names: no weight is read. The result is the per-tensor DATA a plan needs: the input
tensor name per input (``model.layers.5.x`` read from ``model.layers.2.x`` of a slice) and resolved
parameters, shared ones and one value per non-base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from surgery.errors import RecipeError
from surgery.mergekit.config import MergekitConfig, ModelRef, OutputSlice, SliceSource
from surgery.mergekit.methods import REQUIRED, MkMethod
from surgery.mergekit.params import resolve, slice_position
from surgery.names import place, with_block

Value = float | bool | None


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor of a mergekit merge."""

    name: str
    models: tuple[ModelRef, ...]  # inputs, base first when the method has one
    sources: tuple[str, ...]  # the tensor read from each input
    has_base: bool
    t: float  # layer position inside its slice (0 outside the blocks)
    shared: dict[str, Value]
    per_model: dict[str, tuple[Value, ...]]  # one value per non-base input


@dataclass(frozen=True)
class ModelInfo:
    """What the resolver needs to know about an input: its tensor names and block count."""

    names: tuple[str, ...]
    num_layers: int


def normalized_slices(
    config: MergekitConfig, method: MkMethod, info: Callable[[ModelRef], ModelInfo]
) -> tuple[OutputSlice, ...]:
    """``models:`` as one slice over every model's full depth (mergekit's normalize_config)."""
    if config.slices is not None:
        return config.slices
    assert config.models is not None
    sources = [SliceSource(m.model, (0, info(m.model).num_layers), m.parameters) for m in config.models]
    base = config.base_model
    if base is not None and all(s.model != base for s in sources):
        sources.append(SliceSource(base, (0, info(base).num_layers)))
    lengths = {str(s.model): s.layer_range[1] for s in sources}
    if len(set(lengths.values())) != 1:
        raise RecipeError(
            "mergekit config: the models have different numbers of layers: "
            + ", ".join(f"{m}: {n}" for m, n in lengths.items()),
            hint="merge models of one architecture and size, or stack layers with 'slices:'",
        )
    return (OutputSlice(tuple(sources)),)


def resolve_tensors(
    config: MergekitConfig, method: MkMethod, info: Callable[[ModelRef], ModelInfo]
) -> tuple[list[TensorSpec], list[str]]:
    """Every output tensor with its inputs and parameters, plus notes (parameters mergekit ignores)."""
    slices = normalized_slices(config, method, info)
    for i, s in enumerate(slices):
        _check_contract(method, s, config.base_model, f"slices[{i}]" if config.slices else "models")
    notes = _ignored_parameters(config, method)
    first, last = slices[0], slices[-1]
    reference = info(first.sources[0].model).names
    before = [n for n in reference if place(n).position == "before"]
    # final norm, head, and names no rule places (buffers): outside the blocks, t = 0 as in mergekit
    after = [n for n in reference if place(n).position in ("after", "unknown")]
    specs = [_spec(config, method, first, n, [n] * len(first.sources), 0.0) for n in before]
    out_layer = 0
    for s in slices:
        n_layers = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        ref_model = info(s.sources[0].model)
        for idx in range(n_layers):
            t = slice_position(idx, n_layers)
            start = s.sources[0].layer_range[0] + idx
            layer = [n for n in ref_model.names if place(n).block == start]
            if not layer:
                raise RecipeError(
                    f"mergekit config: {s.sources[0].model} has no layer {start} "
                    f"(it has {ref_model.num_layers})"
                )
            for name in layer:
                srcs = [with_block(name, src.layer_range[0] + idx) for src in s.sources]
                specs.append(_spec(config, method, s, with_block(name, out_layer), srcs, t))
            out_layer += 1
    specs += [_spec(config, method, last, n, [n] * len(last.sources), 0.0) for n in after]
    return specs, notes


def output_layers(config: MergekitConfig, method: MkMethod, info: Callable[[ModelRef], ModelInfo]) -> int:
    """num_hidden_layers of the output: the sum of the slice lengths."""
    slices = normalized_slices(config, method, info)
    return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)


def _check_contract(method: MkMethod, s: OutputSlice, base: ModelRef | None, where: str) -> None:
    base = s.base_model or base
    models = [src.model for src in s.sources]
    if len(set(models)) != len(models):
        raise RecipeError(f"mergekit config: {where} names a model twice")
    has_base = method.base != "ignored" and base is not None and base in models
    if method.base == "optional" and base is not None and not has_base:
        raise RecipeError(f"mergekit config: base_model {base} is not among the inputs of {where}")
    if method.base == "required" and not has_base:
        raise RecipeError(
            f"mergekit config: merge_method {method.name} needs base_model among the inputs of {where}",
            hint="set base_model (for slices: list the base among each slice's sources)",
        )
    n = len(models) - int(has_base)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (
            f"exactly {method.min_models}"
            if method.min_models == method.max_models
            else f"at least {method.min_models}"
            if method.max_models is None
            else f"{method.min_models} to {method.max_models}"
        )
        raise RecipeError(
            f"mergekit config: merge_method {method.name} takes {want} model(s) besides the base, "
            f"{where} has {n}"
        )


def _spec(
    config: MergekitConfig,
    method: MkMethod,
    s: OutputSlice,
    name: str,
    sources: list[str],
    t: float,
) -> TensorSpec:
    base = s.base_model or config.base_model
    order = list(range(len(s.sources)))
    has_base = method.base != "ignored" and base is not None
    if has_base:  # the base first, then the models in config order
        order.sort(key=lambda i: s.sources[i].model != base)
    shared_scopes = (s.parameters, config.parameters)
    shared = {
        p.name: _value(p, shared_scopes, name, t, method, f"tensor {name}")
        for p in method.params
        if not p.per_model
    }
    per_model: dict[str, list[Value]] = {p.name: [] for p in method.params if p.per_model}
    for i in order[1:] if has_base else order:
        src = s.sources[i]
        scopes = (src.parameters, s.parameters, config.parameters)
        for p in method.params:
            if p.per_model:
                where = f"model {src.model}, tensor {sources[i]}"
                per_model[p.name].append(_value(p, scopes, sources[i], t, method, where))
    return TensorSpec(
        name,
        tuple(s.sources[i].model for i in order),
        tuple(sources[i] for i in order),
        has_base,
        t,
        shared,
        {k: tuple(v) for k, v in per_model.items()},
    )


def _value(p, scopes, tensor: str, t: float, method: MkMethod, where: str) -> Value:
    value = resolve(p.name, scopes, tensor, t, p.kind, None)
    if value is not None:
        return value
    if p.default == REQUIRED:
        raise RecipeError(
            f"mergekit config: merge_method {method.name} needs parameter {p.name!r} ({where})",
            hint=f"set {p.name} under the model's parameters or the top-level parameters",
        )
    return p.default  # type: ignore[return-value]


def _ignored_parameters(config: MergekitConfig, method: MkMethod) -> list[str]:
    known = {p.name for p in method.params}
    seen: set[str] = set(config.parameters or {})
    for m in config.models or ():
        seen |= set(m.parameters or {})
    for s in config.slices or ():
        seen |= set(s.parameters or {})
        for src in s.sources:
            seen |= set(src.parameters or {})
    notes = [
        f"mergekit config: parameter {name!r} means nothing to {method.name}; ignored (as mergekit does)"
        for name in sorted(seen - known)
    ]
    if any(s.residual_weight is not None for s in config.slices or ()):
        notes.append(
            "mergekit config: residual_weight has no effect in mergekit 0.1.5; ignored (as mergekit does)"
        )
    return notes
