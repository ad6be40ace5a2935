"""Does fine-tuning move LIFT's principal weights? (LIFT, arXiv 2506.00772)

Per block matrix W (2-D, inside the blocks) and fine-tune m, with k = floor(density * numel):

    A_m = the top-k positions of |tau_m|           (what `surgery diff --density D` keeps)
    L   = the top-k positions of |W_r|             (what `surgery diff --lift-rank R --density D` keeps)
    overlap_m = |A_m & L| / k                      (ties by lower index in both rankings)

A layer sums the counts of its matrices. Positions chosen independently of each other would overlap
in a fraction ``density`` on average: the baseline to compare with. One matrix is held at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from surgery.analysis._common import layer_label, read_f32
from surgery.checkpoint import Checkpoint
from surgery.methods.lift import lift_key
from surgery.ranks import rank_count, top_k_indices


@dataclass(frozen=True)
class LiftOverlap:
    """``per_tensor[name] = (k, shared_1, ..., shared_M)``; layers and overall sum them."""

    rank: int
    density: float
    per_tensor: dict[str, tuple[int, ...]]
    layers: dict[str, tuple[int, ...]]

    def fractions(self, counts: tuple[int, ...]) -> list[float | None]:
        return [c / counts[0] if counts[0] else None for c in counts[1:]]

    @property
    def overall(self) -> tuple[int, ...]:
        rows = list(self.per_tensor.values())
        return tuple(sum(r[i] for r in rows) for i in range(len(rows[0]))) if rows else (0,)

    def to_dict(self) -> dict:
        def row(counts):
            return {"selected": counts[0], "shared": list(counts[1:]), "overlap": self.fractions(counts)}

        return {
            "rank": self.rank,
            "density": self.density,
            "baseline": self.density,
            "overall": row(self.overall),
            "layers": {k: row(v) for k, v in self.layers.items()},
            "tensors": {k: row(v) for k, v in self.per_tensor.items()},
        }


def lift_overlap(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    names: Sequence[str],
    rank: int,
    density: float,
) -> LiftOverlap:
    """Overlap of each fine-tune's top-``density`` |tau| with the LIFT positions, per block matrix."""
    from surgery.kernels import get_backend

    backend = get_backend("cpu")
    per_tensor: dict[str, tuple[int, ...]] = {}
    layers: dict[str, list[int]] = {}
    for name in names:
        info = base.info(name)
        if len(info.shape) != 2 or layer_label(name) in ("before", "after", "unknown"):
            continue
        k = rank_count(density, info.numel)
        b = read_f32(base, name)
        lift = top_k_indices(backend, lift_key(b.reshape(info.shape), {"lift_rank": rank}), k)
        shared = []
        for ck in models:
            top = top_k_indices(backend, read_f32(ck, name) - b, k)
            shared.append(int(np.intersect1d(top, lift, assume_unique=True).size))
        per_tensor[name] = (k, *shared)
        acc = layers.setdefault(layer_label(name), [0] * (1 + len(models)))
        for i, v in enumerate(per_tensor[name]):
            acc[i] += v
    return LiftOverlap(rank, density, per_tensor, {k: tuple(v) for k, v in layers.items()})
