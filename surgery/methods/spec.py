"""What a merge method is: a small spec of data, no behaviour of its own.

Every method in the mergekit family is one ``sparsify`` stage applied to each task vector followed by
one ``combine`` stage; variants that differ only in data (TIES, DARE-TIES, Breadcrumbs-TIES) are
specs with different stages and defaults, not new code. The engine runs the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("per_tensor", "per_row", "global")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int", "weights", "choice"
    default: object
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str
    formula: str
    sparsify: str | None  # None, "band" (exact rank band), "bernoulli" (DARE)
    combine: str  # "sum", "ties", "linear", "slerp", "model_stock"
    needs_base: bool
    min_models: int
    max_models: int | None
    params: tuple[Param, ...]

    @property
    def defaults(self) -> dict[str, object]:
        return {p.name: p.default for p in self.params}


# Shared parameter definitions: one meaning per name across methods.
SCALE = Param("scale", "float", 1.0, "multiplier of the merged task vector")
WEIGHTS = Param("weights", "weights", None, "per-model weights w1,w2,... (default all 1)")
SEED = Param("seed", "int", 0, "seed of the counter-based random stream")


def density(default: float) -> Param:
    return Param("density", "float", default, "fraction of task-vector entries KEPT")


def outliers(default: float) -> Param:
    return Param("outliers", "float", default, "fraction of the LARGEST |tau| entries removed")


def granularity(default: str = "per_tensor") -> Param:
    return Param("granularity", "choice", default, "group over which ranks are taken", GRANULARITIES)
