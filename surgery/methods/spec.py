"""What a merge method is: a small spec of data, no behaviour of its own.

Every method in the mergekit family is one ``sparsify`` stage applied to each task vector followed by
one ``combine`` stage; variants that differ only in data (TIES, DARE-TIES, Breadcrumbs-TIES) are
specs with different stages and defaults, not new code. The engine runs the stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GRANULARITIES = ("per_tensor", "per_row", "global")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int", "weights", "choice", "regex", "bool", "fixed"
    default: object
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str
    formula: str
    # None, "band" (exact rank band of |tau|), "bernoulli" (DARE), "key" (top density of ``rank_key``)
    sparsify: str | None
    combine: str  # "sum", "ties", "linear", "slerp", "model_stock"
    needs_base: bool
    min_models: int
    max_models: int | None
    params: tuple[Param, ...]
    # Which command builds it and what its inputs mean (base / models roles are in `roles`).
    command: str = "merge"  # "merge", "diff", "apply", "transfer", "graft"
    roles: str = "base: the pre-trained model; models: its fine-tunes"
    # Where task vectors come from: "models" (f_t - b), "given" (the models ARE diffs),
    # "pairs" (models = [old_base, old_finetuned]: tau = old_finetuned - old_base).
    tau_from: str = "models"
    # What is written: "dense" (b + update), "update" (the update alone: a diff), "patch" (sparse
    # indices + values of the selected update), "scatter" (b + a sparse patch).
    output: str = "dense"
    # sparsify "key": a whole-matrix ranking key computed from the BASE matrix (float32, >= 0, same
    # shape); the top ``density`` of each 2-D tensor by key, ties by lower index, is selected.
    rank_key: Callable | None = None

    @property
    def defaults(self) -> dict[str, object]:
        return {p.name: p.default for p in self.params}


# Shared parameter definitions: one meaning per name across methods.
SCALE = Param("scale", "float", 1.0, "multiplier of the merged task vector")
WEIGHTS = Param("weights", "weights", None, "per-model weights w1,w2,... (default all 1)")
SEED = Param("seed", "int", 0, "seed of the counter-based random stream")


REGION = Param(
    "region",
    "regex",
    None,
    "tensors the selection may touch (regex on names) [default: the transformer blocks]",
)


def density(default: float) -> Param:
    return Param("density", "float", default, "fraction of task-vector entries KEPT")


def outliers(default: float) -> Param:
    return Param("outliers", "float", default, "fraction of the LARGEST |tau| entries removed")


def granularity(default: str = "per_tensor") -> Param:
    return Param("granularity", "choice", default, "group over which ranks are taken", GRANULARITIES)
