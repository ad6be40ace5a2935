"""Diff statistics of fine-tunes against their base: what the task vectors tau = W_ft - W0 look like.

Per tensor, per layer and overall, for every fine-tune m:

- ``||tau_m||_2`` and the relative norm ``||tau_m|| / ||W0||``;
- sparsity: the fraction of entries with tau exactly 0 (bf16 fine-tunes with a small learning rate
  leave many weights bit-identical);
- effective rank of 2-D updates (Roy & Vetterli 2007): ``exp(H(p))`` with ``p = s / sum(s)`` over the
  singular values s of tau, ``H(p) = -sum p log p``; 1 for a rank-1 update, n for a flat spectrum.

Between every pair of fine-tunes (i, j):

- cosine similarity ``<tau_i, tau_j> / (||tau_i|| ||tau_j||)``;
- sign-conflict rate: the fraction of entries where both taus are nonzero and of opposite signs (what
  TIES' sign election resolves); ``overlap_conflict_rates`` divides by the entries where both are
  nonzero instead (0.5 for unrelated updates).

Aggregates (layer, overall) sum the underlying quantities (squares, dot products, counts), so a layer's
cosine is the cosine of the concatenated layer vectors, not a mean of tensor cosines. Effective rank is
not additive: a layer reports the mean over its 2-D tensors.

Elementwise statistics stream flat element ranges (``chunk_elements`` per read), so memory does not
grow with the tensor; the effective rank needs the singular values of one whole 2-D update at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from surgery.adapters import AdapterCheckpoint
from surgery.analysis._common import (
    compile_include,
    layer_label,
    layer_sort_key,
    read_f32,
    require_torch,
)
from surgery.analysis.lift_overlap import LiftOverlap, lift_overlap
from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.errors import RecipeError
from surgery.inputs import open_input
from surgery.names import natural_key

# progress(done, total, tensor name)
Progress = Callable[[int, int, str], None]


def effective_rank(singular_values: np.ndarray) -> float | None:
    """Roy & Vetterli (2007): exp(-sum p log p), p = s / sum(s); None for a zero matrix."""
    s = np.asarray(singular_values, dtype=np.float64)
    total = s.sum()
    if not total > 0:
        return None
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


# -- report ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffStats:
    """Sums over one tensor, one layer or the whole model; the rates are derived from them.

    Per model m: ``sq[m] = sum tau_m^2``, ``zeros[m]`` = entries with tau_m == 0. Per pair p = (i, j)
    (in ``StatsReport.pairs`` order): ``dots[p] = <tau_i, tau_j>``, ``conflicts[p]`` = entries where
    both are nonzero with opposite signs, ``both_nonzero[p]`` = entries where both are nonzero.
    """

    label: str  # tensor name, layer label, or "all"
    numel: int
    tensors: int
    base_sq: float  # sum W0^2
    sq: tuple[float, ...]
    zeros: tuple[int, ...]
    dots: tuple[float, ...]
    conflicts: tuple[int, ...]
    both_nonzero: tuple[int, ...]
    effective_ranks: tuple[float | None, ...]  # a layer: mean over its 2-D tensors
    shape: tuple[int, ...] | None = None  # tensors only
    layer: str | None = None  # tensors only

    @property
    def norms(self) -> tuple[float, ...]:
        return tuple(math.sqrt(v) for v in self.sq)

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.base_sq)

    @property
    def relative_norms(self) -> tuple[float | None, ...]:
        """||tau_m|| / ||W0|| (None where W0 is all zeros)."""
        return tuple(math.sqrt(v / self.base_sq) if self.base_sq > 0 else None for v in self.sq)

    @property
    def sparsity(self) -> tuple[float, ...]:
        return tuple(z / self.numel if self.numel else 0.0 for z in self.zeros)

    def cosines(self, pairs: Sequence[tuple[int, int]]) -> tuple[float | None, ...]:
        """<tau_i, tau_j> / (||tau_i|| ||tau_j||) per pair (None where a tau is zero)."""
        out = []
        for (i, j), dot in zip(pairs, self.dots, strict=True):
            den = math.sqrt(self.sq[i] * self.sq[j])
            out.append(dot / den if den > 0 else None)
        return tuple(out)

    @property
    def conflict_rates(self) -> tuple[float, ...]:
        """Fraction of ALL entries where the two taus are nonzero with opposite signs."""
        return tuple(c / self.numel if self.numel else 0.0 for c in self.conflicts)

    @property
    def overlap_conflict_rates(self) -> tuple[float | None, ...]:
        """Fraction of the entries where both taus are nonzero that have opposite signs."""
        return tuple(c / b if b else None for c, b in zip(self.conflicts, self.both_nonzero, strict=True))

    def to_dict(self, pairs: Sequence[tuple[int, int]]) -> dict:
        out: dict = {"label": self.label}
        if self.shape is not None:
            out["shape"] = list(self.shape)
            out["layer"] = self.layer
        out |= {
            "numel": self.numel,
            "tensors": self.tensors,
            "base_norm": self.base_norm,
            "norm": list(self.norms),
            "relative_norm": list(self.relative_norms),
            "sparsity": list(self.sparsity),
            "effective_rank": list(self.effective_ranks),
        }
        if pairs:
            out |= {
                "cosine": list(self.cosines(pairs)),
                "sign_conflicts": list(self.conflicts),
                "both_nonzero": list(self.both_nonzero),
                "conflict_rate": list(self.conflict_rates),
                "overlap_conflict_rate": list(self.overlap_conflict_rates),
            }
        return out


def combine(items: Sequence[DiffStats], label: str) -> DiffStats:
    """Sum the additive quantities of several tensors' stats; mean effective rank over 2-D tensors."""
    n_models = len(items[0].sq)
    n_pairs = len(items[0].dots)
    ranks = []
    for m in range(n_models):
        values = [it.effective_ranks[m] for it in items if it.effective_ranks[m] is not None]
        ranks.append(sum(values) / len(values) if values else None)
    return DiffStats(
        label=label,
        numel=sum(it.numel for it in items),
        tensors=sum(it.tensors for it in items),
        base_sq=sum(it.base_sq for it in items),
        sq=tuple(sum(it.sq[m] for it in items) for m in range(n_models)),
        zeros=tuple(sum(it.zeros[m] for it in items) for m in range(n_models)),
        dots=tuple(sum(it.dots[p] for it in items) for p in range(n_pairs)),
        conflicts=tuple(sum(it.conflicts[p] for it in items) for p in range(n_pairs)),
        both_nonzero=tuple(sum(it.both_nonzero[p] for it in items) for p in range(n_pairs)),
        effective_ranks=tuple(ranks),
    )


@dataclass(frozen=True)
class StatsReport:
    base: str
    models: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]  # (i, j), i < j, indices into models
    tensors: tuple[DiffStats, ...]
    layers: tuple[DiffStats, ...]  # in network order
    overall: DiffStats
    skipped: tuple[tuple[str, str], ...]  # (tensor, reason)
    # per model: the LoRA rank r of every tensor an adapter input changes (None: a full fine-tune).
    # The effective rank of tau says less for an adapter: rounding to the weights' dtype adds noise.
    adapter_ranks: tuple[dict[str, int] | None, ...] = ()
    lift: LiftOverlap | None = None  # --lift-rank: top-D |tau| against LIFT's principal weights

    def to_dict(self) -> dict:
        pairs = self.pairs
        lift = {} if self.lift is None else {"lift_overlap": self.lift.to_dict()}
        return lift | {
            "base": self.base,
            "models": list(self.models),
            "adapter_ranks": list(self.adapter_ranks),
            "pairs": [[self.models[i], self.models[j]] for i, j in pairs],
            "overall": self.overall.to_dict(pairs),
            "layers": [s.to_dict(pairs) for s in self.layers],
            "tensors": [s.to_dict(pairs) for s in self.tensors],
            "skipped": [{"tensor": n, "reason": r} for n, r in self.skipped],
        }


# -- computing -------------------------------------------------------------------------------------
def diff_stats(
    base: str | Path,
    finetuned: Sequence[str | Path],
    *,
    include: str | None = None,
    effective_ranks: bool = True,
    device: str = "cpu",
    chunk_elements: int = 1 << 22,
    progress: Progress | None = None,
    lift_rank: int | None = None,
    lift_density: float = 0.05,
) -> StatsReport:
    """Diff statistics of every float tensor shared (same shape) by ``base`` and all ``finetuned``.

    ``include`` (regex, searched in the name) restricts the tensors. ``effective_ranks`` computes the
    singular values of each 2-D update (torch on ``device``), the costly part on big models.
    ``lift_rank``: also the overlap of each fine-tune's top-``lift_density`` |tau| with LIFT's
    principal weights (top |W_r|) per block matrix (``surgery.analysis.lift_overlap``).
    """
    if lift_rank is not None and (lift_rank < 1 or not 0.0 < lift_density <= 1.0):
        raise RecipeError(
            f"--lift-rank must be >= 1 and --lift-density in (0, 1], got {lift_rank} and {lift_density}"
        )
    if not finetuned:
        raise RecipeError("diff statistics need at least one fine-tuned model")
    if chunk_elements < 1:
        raise RecipeError(f"chunk_elements must be positive, got {chunk_elements}")
    pattern = compile_include(include)
    base_ck = open_checkpoint(base)
    models = []
    try:
        for path in finetuned:
            models.append(open_input(path, base=str(base)))
        names, skipped = _select(base_ck, models, pattern)
        if not names:
            raise RecipeError(
                f"no float tensor is shared by {base} and every fine-tune"
                + (f" and matches --include {include!r}" if include else ""),
                hint="check the tensor names with `surgery inspect`",
            )
        pairs = tuple(combinations(range(len(models)), 2))
        adapter_ranks = tuple(
            ck.layout.effective_ranks() if isinstance(ck, AdapterCheckpoint) else None for ck in models
        )
        per_tensor = []
        for done, name in enumerate(names):
            per_tensor.append(
                _tensor_stats(base_ck, models, name, pairs, effective_ranks, device, chunk_elements)
            )
            if progress is not None:
                progress(done + 1, len(names), name)
        lift = None
        if lift_rank is not None:
            lift = lift_overlap(base_ck, models, names, lift_rank, lift_density)
    finally:
        base_ck.close()
        for ck in models:
            ck.close()
    by_layer: dict[str, list[DiffStats]] = {}
    for s in per_tensor:
        by_layer.setdefault(s.layer, []).append(s)
    layers = tuple(combine(by_layer[k], k) for k in sorted(by_layer, key=layer_sort_key))
    return StatsReport(
        base=str(base),
        models=tuple(str(p) for p in finetuned),
        pairs=pairs,
        tensors=tuple(per_tensor),
        layers=layers,
        overall=combine(per_tensor, "all"),
        skipped=tuple(skipped),
        adapter_ranks=adapter_ranks,
        lift=lift,
    )


def _select(
    base: Checkpoint, models: list[Checkpoint], pattern: re.Pattern | None
) -> tuple[list[str], list[tuple[str, str]]]:
    names, skipped = [], []
    for name in sorted(base.tensors, key=natural_key):
        info = base.tensors[name]
        if info.dtype.kind != "float" or (pattern is not None and not pattern.search(name)):
            continue
        reason = None
        for ck in models:
            other = ck.tensors.get(name)
            if other is None:
                reason = f"missing in {ck.source}"
            elif other.shape != info.shape:
                reason = f"shape {list(other.shape)} in {ck.source} vs {list(info.shape)} in the base"
            elif other.dtype.kind != "float":
                reason = f"dtype {other.dtype.name} in {ck.source}"
            if reason:
                break
        if reason:
            skipped.append((name, reason))
        else:
            names.append(name)
    extra = {n for ck in models for n, t in ck.tensors.items() if t.dtype.kind == "float"} - set(base.tensors)
    for name in sorted(extra, key=natural_key):
        if pattern is None or pattern.search(name):
            skipped.append((name, "not in the base"))
    return names, skipped


def _tensor_stats(
    base: Checkpoint,
    models: list[Checkpoint],
    name: str,
    pairs: tuple[tuple[int, int], ...],
    want_ranks: bool,
    device: str,
    chunk: int,
) -> DiffStats:
    info = base.info(name)
    n_models = len(models)
    base_sq = 0.0
    sq = [0.0] * n_models
    zeros = [0] * n_models
    dots = [0.0] * len(pairs)
    conflicts = [0] * len(pairs)
    both = [0] * len(pairs)
    for start in range(0, info.numel, chunk):
        count = min(chunk, info.numel - start)
        b = read_f32(base, name, start, count)
        b64 = b.astype(np.float64)
        base_sq += float(np.dot(b64, b64))
        # tau in float32, exactly as the merge engine forms it; sums in float64.
        taus = [(read_f32(ck, name, start, count) - b).astype(np.float64) for ck in models]
        signs = [np.sign(t).astype(np.int8) for t in taus]
        for m, t in enumerate(taus):
            sq[m] += float(np.dot(t, t))
            zeros[m] += int(count - np.count_nonzero(t))
        for p, (i, j) in enumerate(pairs):
            dots[p] += float(np.dot(taus[i], taus[j]))
            prod = signs[i] * signs[j]
            conflicts[p] += int(np.count_nonzero(prod < 0))
            both[p] += int(np.count_nonzero(prod))
    ranks: list[float | None] = [None] * n_models
    if want_ranks and len(info.shape) == 2 and min(info.shape) > 0:
        ranks = [_update_rank(base, ck, name, device) if sq[m] > 0 else None for m, ck in enumerate(models)]
    return DiffStats(
        label=name,
        numel=info.numel,
        tensors=1,
        base_sq=base_sq,
        sq=tuple(sq),
        zeros=tuple(zeros),
        dots=tuple(dots),
        conflicts=tuple(conflicts),
        both_nonzero=tuple(both),
        effective_ranks=tuple(ranks),
        shape=info.shape,
        layer=layer_label(name),
    )


def _update_rank(base: Checkpoint, ft: Checkpoint, name: str, device: str) -> float | None:
    """Effective rank of one whole 2-D update (one model at a time bounds memory to ~3 tensors)."""
    torch = require_torch()
    shape = base.info(name).shape
    tau = read_f32(ft, name) - read_f32(base, name)
    s = torch.linalg.svdvals(torch.from_numpy(tau.reshape(shape)).to(device))
    return effective_rank(s.double().cpu().numpy())
