"""Evaluating mergekit parameter settings for one tensor (mergekit 0.1.5's rules, our code).

A setting is one of
    0.5                                   a scalar
    [0, 0.5, 1]                           a gradient: piecewise-linear over the layer position t
    [{filter: self_attn, value: ...}, ...] conditions on the tensor name, first match wins

Gradient (numeric values v_0 .. v_{n-1}): s = t (n - 1), i0 = int(s), i1 = min(n - 1, i0 + 1),
f = s - i0, value = (1 - f) v_i0 + f v_i1 (float64, as mergekit computes it). Non-numeric gradients
pick v_int(s). A condition matches when its filter is absent, ``*``, or a substring of the name.

t is the layer's position inside its output slice: idx / (n_layers - 1), or 1 for a one-layer slice.
Tensors outside the blocks (embeddings, final norm, head) get t = 0, the first value of a gradient,
as in mergekit (the head does NOT get the last value).

Precedence (first scope that has the parameter and whose setting evaluates wins): the slice source
of this model (= the model's own ``parameters`` under ``models:``) > the output slice > the
method-level ``parameters``; then the method's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from surgery.errors import RecipeError
from surgery.mergekit.config import Setting

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def coerce(value: object, kind: str, where: str) -> float | bool:
    """A scalar as the parameter's type: ``float`` (numbers, "1e-3") or ``bool``."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise RecipeError(f"mergekit config: {where} must be true or false, not {value!r}")
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RecipeError(f"mergekit config: {where} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise RecipeError(f"mergekit config: {where} must be finite, not {value!r}")
    return number


def evaluate(setting: Setting, tensor_name: str, t: float, kind: str, where: str) -> float | bool | None:
    """The value of ``setting`` for one tensor at layer position ``t``; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return coerce(setting, kind, where)
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        values = [coerce(e, kind, where) for e in setting]
        scaled = t * (len(values) - 1)
        if kind != "float":
            return values[int(scaled)]
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate(cond["value"], tensor_name, t, kind, where)
    return None


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Setting] | None],
    tensor_name: str,
    t: float,
    kind: str,
    default: float | bool | None,
) -> float | bool | None:
    """The first scope (highest precedence first) that sets ``name`` for this tensor, else default."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate(scope[name], tensor_name, t, kind, name)
            if value is not None:
                return value
    return default


def slice_position(index: int, n_layers: int) -> float:
    """mergekit's t of the index-th layer of an n-layer slice."""
    return index / (n_layers - 1) if n_layers > 1 else 1.0


def is_uniform(setting: Setting) -> bool:
    """True when a setting is one value for every tensor (no gradient, no filter)."""
    return not isinstance(setting, list | dict)


def schedule(
    names: list[str], num_layers: int, settings: Mapping[str, Setting], block_of: Callable[[str], int | None]
) -> dict[str, dict[str, float]]:
    """Per tensor, the value of each setting that has one there (the same rule as a mergekit config:
    t = block / (L - 1), 0 outside the blocks; a filter list that matches nothing leaves it out).
    ``surgery merge --scale 0.2:1.0 --filter self_attn:density=0.5`` uses it."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        block = block_of(name)
        t = 0.0 if block is None else slice_position(block, num_layers)
        values = {}
        for key, setting in settings.items():
            value = evaluate(setting, name, t, "float", key)
            if value is not None:
                values[key] = float(value)
        if values:
            out[name] = values
    return out
