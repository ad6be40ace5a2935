"""The registry of merge methods: one explicit dict, no registration by import side effect.

Importing it loads no numpy: the CLI builds its method flags and choices from it at start-up.
"""

from __future__ import annotations

from surgery.errors import RecipeError
from surgery.methods.arcee_fusion import ARCEE_FUSION
from surgery.methods.breadcrumbs import BREADCRUMBS
from surgery.methods.cart import CART
from surgery.methods.dare import DARE, DARE_TIES
from surgery.methods.della import DELLA, DELLA_LINEAR
from surgery.methods.graft import APPLY_PATCH, COMPOSE, GRAFT, PATCH
from surgery.methods.half_reset import HALF_RESET
from surgery.methods.interpolation import LINEAR, MODEL_STOCK, SLERP
from surgery.methods.iso import ISO_C, ISO_CTS
from surgery.methods.lift import LIFT_GRAFT, LIFT_PATCH
from surgery.methods.nearswap import NEARSWAP
from surgery.methods.passthrough import PASSTHROUGH
from surgery.methods.regmean import REGMEAN
from surgery.methods.sce import SCE
from surgery.methods.spec import Method, Param
from surgery.methods.spherical import KARCHER, MULTISLERP, NUSLERP
from surgery.methods.star import STAR
from surgery.methods.task_arithmetic import TASK_ARITHMETIC
from surgery.methods.ties import BREADCRUMBS_TIES, TIES
from surgery.methods.transfer import APPLY, DIFF, TRANSFER
from surgery.methods.tsv import TSV_MERGE
from surgery.methods.wudi import WUDI

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        TASK_ARITHMETIC,
        BREADCRUMBS,
        BREADCRUMBS_TIES,
        TIES,
        DARE,
        DARE_TIES,
        DELLA,
        DELLA_LINEAR,
        LINEAR,
        SLERP,
        MODEL_STOCK,
        NEARSWAP,
        NUSLERP,
        MULTISLERP,
        KARCHER,
        SCE,
        ARCEE_FUSION,
        PASSTHROUGH,
        TSV_MERGE,
        ISO_C,
        ISO_CTS,
        CART,
        STAR,
        WUDI,
        REGMEAN,
        DIFF,
        PATCH,
        APPLY,
        APPLY_PATCH,
        COMPOSE,
        TRANSFER,
        GRAFT,
        HALF_RESET,
        LIFT_PATCH,
        LIFT_GRAFT,
    )
}

# Names users know from mergekit and elsewhere.
ALIASES = {"dare_linear": "dare", "breadcrumbs_linear": "breadcrumbs", "stock": "model_stock",
           "tsv": "tsv_merge", "tsv_m": "tsv_merge"}  # fmt: skip


def get_method(name: str) -> Method:
    key = ALIASES.get(name.replace("-", "_").lower(), name.replace("-", "_").lower())
    if key not in METHODS:
        raise RecipeError(
            f"unknown method {name!r}",
            hint=f"choose one of: {', '.join(METHODS)} (see `surgery methods`)",
        )
    return METHODS[key]


__all__ = ["METHODS", "Method", "Param", "get_method"]
