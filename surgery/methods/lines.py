"""LiNeS: layer-increasing network scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

Scale each tensor's update by the depth of the block it belongs to:

    lambda(l) = alpha + beta * l / (L - 1),   l = 0 .. L-1
    out = b + lambda(l) * tau                  (single-task editing, beta defaults to 1 - alpha)
    out = b + lambda(l) * tau_merged           (on top of any merge)

Shallow layers keep little of the update (they hold general features that fine-tuning should not
disturb), deep layers keep it all. Tensors outside the blocks (embeddings, final norm, head) get
``alpha`` as in the official code; ``outside`` chooses ``alpha+beta`` or ``one`` (untouched) instead.

``alpha = "auto"`` on top of a merge is the paper's ``||sum_t tau_t||_1 / (T * ||tau_merged||_1)``
over the whole model (exactly 1/T for task arithmetic), computed in a global reduce pass; beta then
defaults to ``1 - alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.errors import RecipeError
from surgery.names import LayerMap

OUTSIDE_CHOICES = ("alpha", "alpha+beta", "one")
PAPER = "https://arxiv.org/abs/2410.17146"


@dataclass(frozen=True)
class LinesSchedule:
    alpha: float | str  # a number, or "auto"
    beta: float | None  # None: 1 - alpha (resolved once alpha is known)
    outside: str = "alpha"

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "outside": self.outside}

    def scale(self, alpha: float, depth: float | None) -> float:
        """lambda for a tensor at ``depth`` = l / (L - 1) in [0, 1], or None outside the blocks."""
        beta = (1.0 - alpha) if self.beta is None else self.beta
        if depth is not None:
            return alpha + beta * depth
        return {"alpha": alpha, "alpha+beta": alpha + beta, "one": 1.0}[self.outside]


@dataclass(frozen=True)
class LinesResolved:
    """The schedule a run used, auto alpha measured: lambda(l) = alpha + beta * l / (L - 1)."""

    alpha: float
    beta: float
    outside: str
    requested_alpha: float | str  # what the recipe asked for: a number or "auto"


def make_schedule(data: dict | LinesSchedule | None) -> LinesSchedule | None:
    """Validate a recipe's ``lines:`` section ({alpha, beta, outside})."""
    if data is None or isinstance(data, LinesSchedule):
        return data
    if not isinstance(data, dict):
        raise RecipeError("'lines' must be a mapping with alpha, beta and outside")
    unknown = set(data) - {"alpha", "beta", "outside"}
    if unknown:
        raise RecipeError(f"lines: unknown keys {', '.join(sorted(unknown))}")
    alpha = data.get("alpha", "auto")
    if alpha != "auto":
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise RecipeError(f"lines: alpha must be a number or 'auto', not {alpha!r}") from None
        if alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise RecipeError(f"lines: alpha must be finite, not {alpha}")
    beta = data.get("beta")
    if beta is not None:
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise RecipeError(f"lines: beta must be a number, not {beta!r}") from None
        if beta != beta or beta in (float("inf"), float("-inf")):
            raise RecipeError(f"lines: beta must be finite, not {beta}")
    outside = data.get("outside", "alpha")
    if outside not in OUTSIDE_CHOICES:
        raise RecipeError(f"lines: outside must be one of {', '.join(OUTSIDE_CHOICES)}, not {outside!r}")
    return LinesSchedule(alpha, beta, outside)


def depths(layers: LayerMap, names: list[str]) -> dict[str, float | None]:
    """l / (L - 1) for every tensor in a block (0 when L = 1), None outside the blocks."""
    span = max(1, layers.num_blocks - 1)
    out: dict[str, float | None] = {}
    for name in names:
        p = layers.placements[name]
        out[name] = (p.block / span) if p.block is not None else None
    return out
