"""mergekit 0.1.5's merge methods as data: their parameters, defaults and input contracts.

``native`` names our method that computes the same thing once mergekit's options are translated
(``translate.py``); None means we do not run that method yet, and a config naming it is refused
with an error that names it. The defaults are mergekit's, which differ from the papers' in places
(``normalize`` per method, DARE/DELLA ``rescale`` by the L1 norm, breadcrumbs' density 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.errors import RecipeError
from surgery.mergekit.config import unsupported

REQUIRED = "required"  # a parameter without a default: every input (or the method) must set it


@dataclass(frozen=True)
class MkParam:
    name: str
    kind: str  # "float" | "bool"
    per_model: bool  # set per input model (weight, density...) or shared by the tensor
    default: float | bool | str | None


@dataclass(frozen=True)
class MkMethod:
    name: str
    native: str | None  # our method with the same math, or None (not supported yet)
    base: str  # "required", "optional", "ignored"
    params: tuple[MkParam, ...]
    min_models: int = 1  # models other than the base
    max_models: int | None = None

    def param(self, name: str) -> MkParam:
        return next(p for p in self.params if p.name == name)


def _gta(name: str, native: str | None, normalize: bool, rescale: bool, extra: tuple = ()) -> MkMethod:
    """mergekit's generalized task arithmetic family (task_arithmetic, ties, dare, breadcrumbs, della)."""
    return MkMethod(
        name,
        native,
        "required",
        (
            MkParam("int8_mask", "bool", False, False),  # memory only: no effect on results
            MkParam("normalize", "bool", False, normalize),
            MkParam("rescale", "bool", False, rescale),
            MkParam("lambda", "float", False, 1.0),
            MkParam("weight", "float", True, REQUIRED),
            MkParam("density", "float", True, 1.0),
            *extra,
        ),
    )


_GAMMA = (MkParam("gamma", "float", True, 0.01),)
_EPSILON = (MkParam("epsilon", "float", True, 0.15),)

MK_METHODS: dict[str, MkMethod] = {
    m.name: m
    for m in (
        _gta("task_arithmetic", "task_arithmetic", normalize=False, rescale=False),
        _gta("ties", "ties", normalize=True, rescale=False),
        _gta("dare_ties", "dare_ties", normalize=False, rescale=True),
        _gta("dare_linear", "dare", normalize=False, rescale=True),
        _gta("breadcrumbs", "breadcrumbs", normalize=False, rescale=False, extra=_GAMMA),
        _gta("breadcrumbs_ties", "breadcrumbs_ties", normalize=False, rescale=False, extra=_GAMMA),
        _gta("della", "della", normalize=True, rescale=True, extra=_EPSILON),
        _gta("della_linear", "della_linear", normalize=False, rescale=True, extra=_EPSILON),
        MkMethod(
            "linear",
            "linear",
            "ignored",
            (MkParam("weight", "float", True, REQUIRED), MkParam("normalize", "bool", False, True)),
        ),
        MkMethod("slerp", "slerp", "required", (MkParam("t", "float", False, REQUIRED),), 1, 1),
        MkMethod(
            "model_stock", "model_stock", "required", (MkParam("filter_wise", "bool", False, False),), 2
        ),
        MkMethod("passthrough", "passthrough", "ignored", (MkParam("scale", "float", True, None),), 1, 1),
        MkMethod("nearswap", "nearswap", "required", (MkParam("t", "float", False, REQUIRED),), 1, 1),
        MkMethod(
            "nuslerp",
            "nuslerp",
            "optional",
            (
                MkParam("weight", "float", True, REQUIRED),
                MkParam("nuslerp_row_wise", "bool", False, False),
                MkParam("nuslerp_flatten", "bool", False, True),
            ),
            2,
            2,
        ),
        MkMethod(
            "multislerp",
            "multislerp",
            "optional",
            (
                MkParam("weight", "float", True, REQUIRED),
                MkParam("normalize_weights", "bool", False, True),
                MkParam("eps", "float", False, 1e-8),
            ),
        ),
        MkMethod(
            "karcher",
            "karcher",
            "ignored",
            (MkParam("max_iter", "float", False, 10), MkParam("tol", "float", False, 1e-5)),
        ),
        MkMethod(
            "sce",
            "sce",
            "required",
            (MkParam("int8_mask", "bool", False, False), MkParam("select_topk", "float", False, 1.0)),
        ),
        MkMethod("arcee_fusion", "arcee_fusion", "required", (), 1, 1),
        MkMethod("ram", None, "required", (MkParam("epsilon", "float", False, 1e-5),)),
        MkMethod("ramplus_tl", None, "required", ()),
    )
}


def get_mk_method(name: str) -> MkMethod:
    """mergekit's method by name; an error naming it when unknown or not runnable here yet."""
    method = MK_METHODS.get(name)
    if method is None:
        raise RecipeError(
            f"mergekit config: unknown merge_method {name!r}",
            hint=f"mergekit 0.1.5 has: {', '.join(MK_METHODS)}",
        )
    return method


def require_runnable(method: MkMethod) -> None:
    """Refuse a method we know but do not run yet, by name."""
    if method.native is None:
        runnable = ", ".join(n for n, m in MK_METHODS.items() if m.native)
        raise unsupported(f"merge_method: {method.name}", hint=f"these run today: {runnable}")
