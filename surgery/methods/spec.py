"""What a merge method is: a frozen spec of data plus its stages as frozen function tables.

Every method in the mergekit family is one ``Sparsify`` stage applied to each task vector followed by
one ``Combine`` stage; variants that differ only in data (TIES, DARE-TIES, Breadcrumbs-TIES) are
``dataclasses.replace`` of one spec with other stages and defaults, not new code. The stages are
defined in the paper's module (``SUM`` in task_arithmetic.py, ``BAND`` in breadcrumbs.py, ...) in the
style of ``kernels.Backend``: plain functions that call backend kernels, no state, no names. The
engine runs them without ever learning a method by name.

This module and the method modules import no numpy at import time (their stage functions import it
when they run), so the CLI builds its flags from the registry without slowing ``surgery --help``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

GRANULARITIES = ("per_tensor", "per_row", "global")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int", "weights", "choice", "regex", "bool", "fixed", "files" (one path per model)
    default: object
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Slice:
    """What a sparsify stage sees of one task vector chunk (besides the values themselves)."""

    tensor: str  # output tensor name (DARE keys its random stream by it)
    model: int  # task vector index t
    start: int  # flat index of the chunk's first element
    cols: int  # row length (per-row ranks)
    band: Any  # ranks.Band of this tensor (or the whole model) for model t; None: rank per row
    params: Mapping[str, object]  # the job's parameters
    scratch: Any  # a reusable uint64 buffer of ``cols`` entries
    selected: Any = None  # a keyed stage: ascending flat indices this tensor keeps (``Sparsify.key``)


@dataclass(frozen=True)
class Sparsify:
    """How each task vector is thinned before the combine, in place: ``apply(backend, tau_t, slice)``.

    ``key(base_matrix, params)``: rank by a whole-matrix key computed from the BASE tensor (float32,
    >= 0, same shape) instead of |tau|; the engine keeps the top floor(density * numel) entries of
    each 2-D tensor by that key (ties by lower index; other shapes keep nothing) and hands the stage
    their flat indices (``Slice.selected``). LIFT's principal weights are such a key."""

    name: str
    needs_ranks: bool  # exact rank thresholds from reduce passes (per tensor / per row / global)
    apply: Callable[[Any, Any, Slice], None]
    key: Callable[[Any, Mapping[str, object]], Any] | None = None
    on_device: bool = False  # apply calls backend kernels only: tau_t may be a device tensor


@dataclass(frozen=True)
class Operands:
    """A chunk's arrays as a combine stage sees them (float32, one row per input or task vector)."""

    inputs: Any  # [n_inputs, count]: every input, base first when there is one
    models: Any  # [n_models, count]: the models' rows (inputs without the base)
    tau: Any  # [T, count] task vectors after sparsify, or None when the combine does not use them
    base: Any  # [count]: the row the update is added to (zeros: the output is the update itself)
    shape: tuple[int, ...]  # the chunk's shape: (count,), or the whole tensor for whole-matrix stages
    job: Any = None  # the TensorJob: its name (per-matrix methods' key policy) and parameters

    @property
    def tensor(self) -> str:
        return self.job.name if self.job is not None else ""

    @property
    def params(self) -> Mapping[str, object]:
        return self.job.params if self.job is not None else {}


@dataclass(frozen=True)
class Combine:
    """How task vectors (or models) become one output chunk.

    ``coefficients(gram, params, n_models)`` gives the per-tensor scalars the apply needs (weights,
    SLERP's [c0, c1], Model Stock's [k]) once per tensor; ``gram`` is the Gram matrix of
    ``gram_over`` ("inputs" or "tau": the task vectors, or the models themselves when the recipe
    has no base) over the whole tensor (upper triangle filled), or None. ``apply(backend, operands,
    coeffs, scale, out)`` writes the float32 output chunk in place.

    ``adds_update``: the output is ``base + scale * update(tau)``; the engine then folds LiNeS into
    ``scale`` and passes a zero base to get the update alone (a diff, LiNeS' auto alpha). Otherwise
    the output is an interpolation of the inputs and LiNeS rescales ``out - inputs[0]`` afterwards.
    ``whole_matrix``: the stage needs every input's whole tensor at once (a per-matrix SVD); the
    engine then hands it one chunk holding the whole tensor when it fits the memory budget. A
    predicate ``(tensor name, shape, parameters) -> bool`` asks for whole tensors only where it is
    true (the others stream in chunks as usual: an embedding need not fit the budget to be averaged;
    NuSLERP needs whole tensors only for per-row or per-column slerps).
    ``on_device``: ``apply`` (for these parameters) calls backend kernels only, so the operands
    may be a torch backend's device tensors (the device-resident pipeline); otherwise they are numpy.
    """

    name: str
    uses_tau: bool
    adds_update: bool
    apply: Callable[..., None]
    coefficients: Callable[[Any, Mapping[str, object], int], tuple[float, ...]] | None = None
    gram_over: Literal["inputs", "tau"] | None = None
    whole_matrix: bool | Callable[[str, tuple[int, ...], Mapping[str, object]], bool] = False
    on_device: bool | Callable[[Mapping[str, object]], bool] = False

    def runs_on_device(self, params: Mapping[str, object]) -> bool:
        d = self.on_device
        return bool(d(params) if callable(d) else d)

    def wants_whole(self, tensor: str, shape: tuple[int, ...], params: Mapping[str, object]) -> bool:
        w = self.whole_matrix
        return bool(w(tensor, shape, params) if callable(w) else w)


@dataclass(frozen=True)
class TauFrom:
    """Where the task vectors come from: ``compute(backend, inputs, tau)`` fills tau [T, count]."""

    name: str
    task_vectors: Callable[[int], int]  # number of models -> T
    compute: Callable[[Any, Any, Any], None]  # backend kernels and slice copies: device tensors too


def _tau_models(be, dec, tau) -> None:  # tau_t = f_t - b
    be.subtract(dec[1:], dec[0], tau)


def _tau_given(be, dec, tau) -> None:  # the models are diffs already
    tau[...] = dec[1:]


def _tau_pairs(be, dec, tau) -> None:  # models = [old base, old fine-tune]: one task vector
    be.subtract(dec[2:3], dec[1], tau)


TAU_MODELS = TauFrom("models", lambda n: n, _tau_models)
TAU_GIVEN = TauFrom("given", lambda n: n, _tau_given)
TAU_PAIRS = TauFrom("pairs", lambda n: 1, _tau_pairs)


def _sum_apply(be, x: Operands, coeffs, scale, out) -> None:
    be.combine_sum(x.base, x.tau, coeffs, scale, out)


def weights_or_ones(gram, params: Mapping[str, object], n_models: int) -> tuple[float, ...]:
    """Per-model weights w_t (default all 1)."""
    return tuple(params.get("weights") or [1.0] * n_models)


# The combine most methods end in (task arithmetic, and every spec's default): b + scale * sum w_t tau_t.
SUM = Combine("sum", uses_tau=True, adds_update=True, apply=_sum_apply, coefficients=weights_or_ones,
              on_device=True)  # fmt: skip


@dataclass(frozen=True)
class Pick:
    """Output kind "pick": every element of a tensor is input 0's or input 1's, bit for bit.

    ``rules(jobs, params, backend, parallel, chunks)`` decides, before anything is written, a rule
    per tensor (tensors without one take input 1): ``rule.mask(start, count, x0, x1, backend, state)``
    is True where elements start..start+count-1 take input 0, ``rule.fresh()`` the per-run state
    passed back in (tie counters; None when there is none). ``parallel(fn, items)`` maps over worker
    threads, ``chunks(job)`` yields (x0, x1) float32 chunks of a tensor in index order."""

    name: str
    rules: Callable[..., Mapping[str, Any]]


@dataclass(frozen=True)
class Method:
    """A merge method: metadata for users (name, title, paper, formula, roles, parameters) and the
    stages the engine runs (``sparsify``, ``combine``, ``tau_from``). Variants: ``replace(spec, ...)``."""

    name: str
    title: str
    paper: str
    formula: str
    params: tuple[Param, ...] = ()
    sparsify: Sparsify | None = None
    combine: Combine = SUM
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    endpoints: int | None = None  # SLERP: exactly this many inputs (a base counts as one)
    tau_from: TauFrom = TAU_MODELS
    # What is written: "dense" (b + update), "update" (the update alone: a diff), "patch" (sparse
    # indices + values of the selected update), "scatter" (b + sparse patches), "pick" (each element
    # from input 0 or input 1, see ``Pick``).
    output: Literal["dense", "update", "patch", "scatter", "pick"] = "dense"
    pick: Pick | None = None  # output "pick": which input each element comes from
    config_from: Literal["base", "last"] = "base"  # config.json: from input 0 or the last input
    tokenizer_from: Literal["base", "last"] = "base"  # tokenizer, chat template, generation config
    # Content hashes of input 0: "record" them in the manifest (a diff), "check" them against the
    # manifest of input 1 (applying a diff), or neither.
    base_hashes: Literal["record", "check"] | None = None
    # Work a method needs once before the first tensor (never in --dry-run), such as a calibration
    # pass: ``prepare(recipe)`` returns parameters added to every job's (``Operands.params``).
    prepare: Callable[[Any], Mapping[str, object]] | None = None
    # For `surgery methods` and the model card only: the command that builds it, what inputs mean.
    command: str = "merge"
    roles: str = "base: the pre-trained model; models: its fine-tunes"

    def on_device(self, params: Mapping[str, object]) -> bool:
        """Whether every stage runs on backend kernels only for ``params`` (no numpy on the chunk),
        so a merged tensor may stay on a torch backend's device from upload to encode."""
        sparsify_ok = self.sparsify is None or (self.sparsify.on_device and self.sparsify.key is None)
        return sparsify_ok and self.combine.runs_on_device(params) and self.pick is None

    @property
    def defaults(self) -> dict[str, object]:
        return {p.name: p.default for p in self.params}

    def passes(self, params: Mapping[str, object]) -> int:
        """Passes over the inputs: rank thresholds take two reduce passes, a Gram matrix one, and
        ``rescale: l1`` one to measure what the sparsify stage keeps."""
        l1 = 1 if self.sparsify is not None and params.get("rescale") == "l1" else 0
        if self.sparsify is not None and self.sparsify.needs_ranks and params.get("granularity") != "per_row":
            return 3 + l1
        if self.pick is not None and params.get("select", "random") != "random":
            return 3 if params.get("by") == "element" else 2  # relative updates first
        return (2 if self.combine.gram_over is not None else 1) + l1


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
