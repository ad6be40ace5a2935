"""Checkpoints at fsspec URLs, read by range (here ``memory://``, in this process): one header request
per file, each tensor byte requested once even by three-pass methods (range cache), bytes identical
to the same merge of local folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fsspec
import pytest
from ckpt_factory import make_family
from fsspec.implementations.memory import MemoryFileSystem

from surgery.engine import EngineOptions, execute, merge
from surgery.errors import InputNotFoundError
from surgery.inputs import InputOptions
from surgery.plan import build_plan
from surgery.recipe import make_recipe
from surgery.remote import stream_stats


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A base and two fine-tunes under memory://fam/, and a log of every cat_file range."""
    base, models = make_family(tmp_path / "local", n_models=2, dtype="BF16")
    fs = fsspec.filesystem("memory")
    for folder in (base, *models):
        for p in folder.iterdir():
            fs.pipe(f"/fam/{folder.name}/{p.name}", p.read_bytes())
    log: list[tuple[str, int | None, int | None]] = []
    original = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        log.append((str(path), start, end))
        return original(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    yield base, models, log
    fs.rm("/fam", recursive=True)


def _spans(path: Path) -> dict[str, tuple[int, int]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("breadcrumbs", {"density": 0.5})])
def test_url_inputs_equal_local_and_read_each_byte_once(served, tmp_path, method, params):
    base, models, log = served
    local = make_recipe(method, [str(m) for m in models], str(base), params)
    merge(local, tmp_path / "local_out", EngineOptions(max_memory=3000, threads=2))
    urls = make_recipe(method, ["memory://fam/ft1", "memory://fam/ft2"], "memory://fam/base", params)
    plan = build_plan(urls, InputOptions(range_cache=tmp_path / "ranges"))
    try:
        execute(plan, tmp_path / "url_out", EngineOptions(max_memory=3000, threads=2))
        stats = stream_stats(plan.inputs)
    finally:
        plan.close()
    for name in ("model.safetensors",):
        assert (tmp_path / "url_out" / name).read_bytes() == (tmp_path / "local_out" / name).read_bytes()
    weights = [(p, s, e) for p, s, e in log if p.endswith(".safetensors")]
    for folder in (base, *models):
        mine = [(s, e) for p, s, e in weights if p == f"/fam/{folder.name}/model.safetensors"]
        assert mine[0] == (0, 100_000) and (0, 100_000) not in mine[1:]  # one header request
        data = mine[1:]
        assert len(set(data)) == len(data)  # no range twice: later passes come from the range cache
        covered = sorted(data)
        spans = sorted(_spans(folder / "model.safetensors").values())
        assert covered[0][0] == spans[0][0] and covered[-1][1] == spans[-1][1]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # tiles the data exactly
    assert stats.header_requests == 3 and stats.data_requests == len(weights) - 3
    assert (stats.bytes_from_cache > 0) == (method == "breadcrumbs")


def test_missing_url_is_a_clear_error(served, tmp_path):
    with pytest.raises(InputNotFoundError, match="checkpoint not found: memory://fam/nope"):
        build_plan(make_recipe("task_arithmetic", ["memory://fam/nope"], "memory://fam/base", {}))
