"""Streamed under a tiny budget == whole-tensor execution, bit for bit, for every method and dtype."""

from __future__ import annotations

import pytest
from ckpt_factory import make_family

from surgery.engine import EngineOptions, merge
from surgery.recipe import make_recipe

CASES = [
    ("task_arithmetic", {}),
    ("breadcrumbs", {"density": 0.3, "outliers": 0.05}),
    ("breadcrumbs", {"density": 0.3, "outliers": 0.05, "granularity": "per_row"}),
    ("breadcrumbs", {"density": 0.3, "outliers": 0.05, "granularity": "global"}),
    ("breadcrumbs_ties", {"density": 0.4, "outliers": 0.02}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "granularity": "global"}),
    ("dare", {"density": 0.4, "seed": 3}),
    ("dare_ties", {"density": 0.4, "seed": 3}),
    ("dare", {"density": 0.4, "rescale": "l1"}),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}),
    ("della_linear", {"density": 0.4, "epsilon": 0.1, "rescale": "l1"}),
    ("ties", {"density": 0.2, "rescale": "l1"}),
    ("breadcrumbs", {"density": 0.3, "outliers": 0.05, "granularity": "global", "rescale": "l1"}),
    ("linear", {}),
    ("slerp", {"t": 0.3}),
    ("model_stock", {}),
]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=lambda c: str(c))
def test_streamed_equals_whole(tmp_path, method, params, dtype):
    base, models = make_family(tmp_path / "in", n_models=2, dtype=dtype, quantize=True)
    recipe = make_recipe(method, [str(m) for m in models], None if method == "slerp" else str(base), params)
    whole = EngineOptions(max_memory=2**30, threads=1)
    # ~100 bytes per worker: chunks of 2-3 elements, so every tensor spans many chunks and the
    # reduce passes, tie counters and random streams all cross chunk boundaries; 3 threads.
    tiny = EngineOptions(max_memory=300, threads=3)
    merge(recipe, tmp_path / "whole", whole)
    merge(recipe, tmp_path / "tiny", tiny)
    for name in ("model.safetensors", "surgery_recipe.yaml", "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "tiny" / name).read_bytes()


@pytest.mark.parametrize(("method", "params"), CASES, ids=lambda c: str(c))
def test_chunks_grouped_in_spans_give_the_same_bytes(tmp_path, monkeypatch, method, params):
    """Kernels compute on chunks of at most COMPUTE_CHUNK elements; reads fill spans of many chunks
    (what is left of a worker's share). 7-element chunks in spans of ~130 elements: every tensor has
    many chunks per span and several spans, and the bytes equal the whole-tensor run's."""
    import surgery.stream

    base, models = make_family(tmp_path / "in", n_models=2, dtype="BF16", quantize=True)
    recipe = make_recipe(method, [str(m) for m in models], None if method == "slerp" else str(base), params)
    merge(recipe, tmp_path / "whole", EngineOptions(max_memory=2**30, threads=1))
    monkeypatch.setattr(surgery.stream, "COMPUTE_CHUNK", 7)
    merge(recipe, tmp_path / "spans", EngineOptions(max_memory=2000, threads=2))
    for name in ("model.safetensors", "surgery_recipe.yaml", "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "spans" / name).read_bytes()
