"""The engine's seams for the next methods, each exercised without the engine learning a method name.

- ``TensorJob.sources``: an output tensor read from differently named input tensors (layer slices);
- ``TensorJob.params``: per-tensor parameters resolved by the planner (the engine reads only these);
- ``Combine.whole_matrix``: a stage that needs every input's whole matrix at once (per-matrix SVD
  methods), with a clear error when one matrix does not fit the memory budget;
- ``reduce`` and ``stream`` as pure functions over any input that reads element ranges (the seam a
  LoRA adapter input would implement), checked against the independent references of ckpt_factory.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
from ckpt_factory import load_f32, make_family, rank_band_mask

from surgery.engine import EngineOptions, execute
from surgery.errors import RecipeError
from surgery.kernels import get_backend
from surgery.methods import METHODS
from surgery.methods.spec import SUM, TAU_MODELS, Operands
from surgery.plan import JobKind, TensorJob, build_plan
from surgery.ranks import band_ranks
from surgery.recipe import make_recipe
from surgery.reduce import gram, tensor_bands
from surgery.stream import TensorStream, Workspace, chunk_ranges, span_ranges

OPTS = EngineOptions(threads=2, max_memory=4000)  # a few hundred elements per chunk
L0 = "model.layers.0.mlp.up_proj.weight"
L1 = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "in", n_models=2, dtype="BF16")


def run(plan, out, options=OPTS):
    try:
        execute(plan, out, options)
    finally:
        plan.close()
    return load_f32(out)


def test_an_output_tensor_can_come_from_differently_named_input_tensors(tmp_path, family):
    base, fts = family
    recipe = make_recipe("task_arithmetic", fts, base, {"scale": 0.7})
    plain = run(build_plan(recipe), tmp_path / "plain")
    plan = build_plan(recipe)
    jobs = [replace(j, sources=(L0,) * 3) if j.name == L1 else j for j in plan.jobs]
    sliced = run(replace(plan, jobs=jobs), tmp_path / "sliced")
    np.testing.assert_array_equal(sliced[L1], plain[L0])  # layer 1 := the merge of layer 0
    assert not np.array_equal(plain[L1], plain[L0])
    for name in plain:
        if name != L1:
            np.testing.assert_array_equal(sliced[name], plain[name])


def test_per_tensor_parameters_equal_global_ones_and_are_the_only_ones_read(tmp_path, family):
    base, fts = family
    recipe = make_recipe("breadcrumbs", fts, base, {"density": 0.3, "scale": 0.9})
    plain = run(build_plan(recipe), tmp_path / "plain")
    plan = build_plan(recipe)
    copies = run(
        replace(plan, jobs=[replace(j, params=dict(j.params)) for j in plan.jobs]), tmp_path / "copies"
    )
    for name in plain:
        np.testing.assert_array_equal(copies[name], plain[name])
    # One tensor with its own parameters gives exactly what a whole-model run with them gives there.
    other = make_recipe("breadcrumbs", fts, base, {"density": 0.6, "scale": 0.5})
    want = run(build_plan(other), tmp_path / "other")
    plan = build_plan(recipe)
    jobs = [replace(j, params=other.parameters) if j.name == L1 else j for j in plan.jobs]
    mixed = run(replace(plan, jobs=jobs), tmp_path / "mixed")
    np.testing.assert_array_equal(mixed[L1], want[L1])
    np.testing.assert_array_equal(mixed[L0], plain[L0])
    assert not np.array_equal(want[L1], plain[L1])


def _whole_sum(be, x: Operands, coeffs, scale, out) -> None:
    """Task arithmetic written as a whole-matrix stage: numpy over [T, rows, cols] blocks."""
    tau = x.tau.reshape(len(coeffs), *x.shape)
    assert tau.shape[1:] == x.shape  # the engine handed over the whole tensor
    acc = np.zeros(x.shape, np.float32)
    for t in range(len(coeffs)):
        acc = acc + coeffs[t] * tau[t]
    out[...] = (x.base.reshape(x.shape) + scale * acc).reshape(-1)


def test_a_whole_matrix_combine_gets_whole_tensors_and_matches_the_streamed_one(
    tmp_path, family, monkeypatch
):
    base, fts = family
    recipe = make_recipe("task_arithmetic", fts, base, {"weights": [0.6, 1.3]})
    plain = run(build_plan(recipe), tmp_path / "plain")
    whole = replace(SUM, name="whole_sum", apply=_whole_sum, whole_matrix=True)
    monkeypatch.setitem(METHODS, "task_arithmetic", replace(METHODS["task_arithmetic"], combine=whole))
    got = run(build_plan(recipe), tmp_path / "whole", EngineOptions(threads=2))
    for name in plain:
        np.testing.assert_array_equal(got[name], plain[name])
    # A matrix that does not fit one worker's share of the budget is an error naming what it needs.
    plan = build_plan(recipe)
    try:
        # 444 elements x (3 x 4 decoded + 3 x 2 raw + 2 x 4 tau + 4 + 2 out) bytes = 13.9 KiB
        with pytest.raises(
            RecipeError, match=r"needs its whole matrix from every input at once: 13.9KiB"
        ) as err:
            execute(plan, tmp_path / "small", EngineOptions(threads=1, max_memory=1000))
        assert "budget (1000B)" in err.value.message and "--max-memory" in err.value.hint
    finally:
        plan.close()


class ArrayInput:
    """An input that is not a file: anything with ``read_into`` and ``prefetch`` can be streamed."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        out[...] = self.tensors[name].reshape(-1)[start : start + out.size]
        return out

    def prefetch(self, name: str, start: int, count: int) -> None:
        pass


def streams(values: list[np.ndarray], share: int):
    job = TensorJob("w", "dense", values[0].shape, ("F32",) * len(values), "F32")
    inputs = [ArrayInput({"w": v}) for v in values]
    ranges = chunk_ranges(job, share, len(values) - 1, whole_rows=False)
    be = get_backend("cpu")
    return TensorStream(job, inputs, be, Workspace(), ranges, TAU_MODELS, len(values) - 1, lambda: None), be


@pytest.mark.parametrize("share", [10**6, 300])
def test_rank_bands_and_gram_from_streams_match_the_references(share):
    g = np.random.default_rng(0)
    base = g.standard_normal((20, 7)).astype(np.float32)
    models = [base + np.round(g.standard_normal(base.shape) * 8).astype(np.float32) / 64 for _ in range(2)]
    stream, be = streams([base, *models], share)
    assert (len(stream.ranges) > 1) == (share == 300)
    params = {"density": 0.3, "outliers": 0.1}
    bands = tensor_bands(stream, params, 2, be)
    r_hi, r_lo = band_ranks(params, base.size)
    for t, band in enumerate(bands):
        tau = models[t] - base
        mask = np.zeros(base.size, bool)
        for k in range(len(stream.ranges)):
            chunk = stream.take(k)
            be.band_mask(chunk.tau[t], band.v_hi, band.ties_hi, band.v_lo, band.ties_lo, band.seen)
            mask[chunk.start : chunk.start + chunk.count] = chunk.tau[t] != 0
        np.testing.assert_array_equal(
            mask, rank_band_mask(tau, r_hi, r_lo).reshape(-1) & (tau.reshape(-1) != 0)
        )
    taus = np.stack([(m - base).reshape(-1) for m in models]).astype(np.float64)
    np.testing.assert_allclose(gram(stream, "tau", be), np.triu(taus @ taus.T), rtol=1e-6)  # upper triangle


class CountingInput(ArrayInput):
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        super().__init__(tensors)
        self.elements = 0

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        self.elements += out.size
        return super().read_into(name, start, out)


def _bands_with_reads(values: list[np.ndarray], share: int, params: dict, spans=None):
    job = TensorJob("w", "dense", values[0].shape, ("F32",) * len(values), "F32")
    inputs = [CountingInput({"w": v}) for v in values]
    T = len(values) - 1
    ranges = chunk_ranges(job, share, T, whole_rows=False)
    be = get_backend("cpu")
    stream = TensorStream(job, inputs, be, Workspace(), ranges, TAU_MODELS, T, lambda: None, spans)
    bands = tensor_bands(stream, params, T, be)
    return bands, inputs[0].elements / values[0].size, len(ranges)


def test_a_tensor_whose_chunks_fit_one_span_is_read_from_disk_once_for_every_pass():
    g = np.random.default_rng(2)
    base = g.standard_normal(60_000).astype(np.float32)
    models = [base + (g.standard_normal(base.size) * 1e-2).astype(np.float32) for _ in range(2)]
    for m in models:  # the first chunk misleads: the bands need a second pass over the chunks
        m[:6000] = base[:6000] + (m[:6000] - base[:6000]) / 100
    params = {"density": 0.2, "outliers": 0.01}
    share = 6000 * 28
    ranges = [(s, 6000) for s in range(0, 60_000, 6000)]
    job = TensorJob("w", "dense", base.shape, ("F32",) * 3, "F32")
    # one chunk's buffers (28 B per element) + two chunks of raw input bytes (12 B per element)
    assert span_ranges(job, share + 12000 * 12, 2, ranges) == [(0, 12000), (12000, 12000), (24000, 12000),
                                                  (36000, 12000), (48000, 12000)]  # fmt: skip
    _, reads, _ = _bands_with_reads([base, *models], share, params, spans=[(0, 60_000)])
    assert reads == 1.0
    _, reads, _ = _bands_with_reads([base, *models], share, params, spans=[(0, 30_000), (30_000, 30_000)])
    assert reads == 2.0


@pytest.mark.parametrize("drift", [False, True])
def test_rank_bands_of_a_many_chunk_tensor_need_one_read_unless_the_first_chunk_misleads(drift):
    """The first chunk predicts the high bins of the band edges; the low histograms of a window
    around them are counted in the same read as the high histogram. A tensor whose first chunk is
    unlike the rest (drift) needs a second read, and the bands are exact either way."""
    g = np.random.default_rng(1)
    base = g.standard_normal(60_000).astype(np.float32)
    models = [base + (g.standard_normal(base.size) * 1e-2).astype(np.float32) for _ in range(2)]
    if drift:  # the first rows move 100x less than the rest: the sample puts the edges far too low
        for m in models:
            m[:6000] = base[:6000] + (m[:6000] - base[:6000]) / 100
    params = {"density": 0.2, "outliers": 0.01}
    bands, reads, n_chunks = _bands_with_reads([base, *models], 6000 * 28, params)  # 28 B per element
    assert n_chunks == 10
    assert reads == (2.0 if drift else 1.0)
    r_hi, r_lo = band_ranks(params, base.size)
    for t, band in enumerate(bands):
        tau = models[t] - base
        be = get_backend("cpu")
        kept = tau.copy()
        be.band_mask(kept, band.v_hi, band.ties_hi, band.v_lo, band.ties_lo, band.seen)
        np.testing.assert_array_equal(kept != 0, rank_band_mask(tau, r_hi, r_lo) & (tau != 0))


class HintedInput(ArrayInput):
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        super().__init__(tensors)
        self.hints: list[tuple[str, int, int]] = []

    def prefetch(self, name: str, start: int, count: int) -> None:
        self.hints.append((name, start, count))


def test_hint_start_asks_every_input_for_one_span_of_a_merged_tensor_only():
    """The next job's start is hinted in every input it reads (its own source name), as much as a
    worker's span holds; jobs that do not read one range per input are not hinted."""
    from surgery.stream import hint_start

    inputs = [HintedInput({}) for _ in range(3)]
    job = TensorJob("w", "dense", (1000, 10), ("BF16",) * 3, "BF16", sources=("a", "b", "c"))
    hint_start(job, inputs, share=6 * 4000)  # 6 raw bytes per element: a span of 4000 elements
    assert [i.hints for i in inputs] == [[("a", 0, 4000)], [("b", 0, 4000)], [("c", 0, 4000)]]
    small = replace(job, shape=(10, 10))
    hint_start(small, inputs, share=6 * 4000)  # the whole tensor when it is smaller than a span
    assert inputs[0].hints[-1] == ("a", 0, 100)
    for kind in ("patch", "copy_base", "keep_base"):
        before = [len(i.hints) for i in inputs]
        hint_start(replace(job, kind=kind), inputs, share=6 * 4000)
        assert [len(i.hints) for i in inputs] == before, kind


def test_the_engine_never_learns_a_method_by_name():
    import surgery.engine
    import surgery.reduce
    import surgery.stream

    kinds = set(get_args(JobKind))  # "patch" is a job kind (what is written) and a method
    for module in (surgery.engine, surgery.reduce, surgery.stream):
        source = open(module.__file__).read()
        for name in set(METHODS) - kinds:
            assert f'"{name}"' not in source, (module.__name__, name)
        assert "spec.command" not in source and ".name ==" not in source


def test_a_stream_reads_one_chunk_once_for_all_passes():
    base = np.ones((4, 3), np.float32)
    stream, be = streams([base, base * 2], 10**6)
    reads = []
    original = stream.inputs[0].read_into
    stream.inputs[0].read_into = lambda *a: reads.append(threading.get_ident()) or original(*a)
    stream.read(0)
    stream.read(0)
    stream.take(0)
    assert len(reads) == 1
    stream.read(0)
    assert len(reads) == 2  # taken chunks may have been modified: read again
