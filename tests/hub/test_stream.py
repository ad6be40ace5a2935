"""Inputs read by HTTP range (``--stream``): the real huggingface_hub client against the fake Hub.

The fake Hub logs the Range header of every file GET, so the tests count requests exactly: one header
request per shard, one data request per tensor chunk per input, none for later passes of multi-pass
methods (the range cache serves them), and never a whole-file download. Outputs are compared byte for
byte with the same merge of the local folders. Children run in fresh interpreters (see conftest.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

PROBE = "bytes=0-99999"  # surgery.remote.HEADER_PROBE
INPUTS = {"alice/sharded": "sharded", "alice/ft1": "ft1", "alice/ft2": "ft2"}  # base first


@pytest.fixture
def stream_child(child_runner):
    """``stream_child(name, *args)`` -> what ``test_stream.<name>(*args)`` returned in a fresh process."""
    return child_runner("test_stream", timeout=180)


@pytest.fixture
def seeded(fake_hub, family):
    for repo_id, key in INPUTS.items():
        fake_hub.add_repo(repo_id, family[key])
    return family


# -- helpers (this process) -----------------------------------------------------------------------------
def _spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte span of every tensor of a safetensors file, read with plain struct + json."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {name: (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]) for name, e in header.items()}


def _local_merge(family, out: Path, method: str, params: dict) -> Path:
    from surgery.engine import EngineOptions, merge
    from surgery.recipe import make_recipe

    recipe = make_recipe(method, [str(family["ft1"]), str(family["ft2"])], str(family["sharded"]), params)
    merge(recipe, out, EngineOptions(max_memory=4000, threads=2))
    return out


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _requests(fake_hub) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Byte ranges [start, end) asked of each (repo, weight file), in order; fails on a GET of a whole
    weight file (no Range header)."""
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for repo_id, path, rng in fake_hub.range_log:
        if path.endswith(".safetensors"):
            assert rng is not None, f"{repo_id}/{path} was downloaded whole"
            start, end = (int(x) for x in rng[len("bytes=") :].split("-"))
            out.setdefault((repo_id, path), []).append((start, end + 1))
    return out


def _tiles(ranges: list[tuple[int, int]], spans: dict[str, tuple[int, int]]) -> set[str]:
    """The tensors whose spans ``ranges`` cover exactly (contiguous, no overlap); fails otherwise."""
    by_tensor: dict[str, list[tuple[int, int]]] = {}
    for start, end in ranges:
        owner = [n for n, (s, e) in spans.items() if s <= start and end <= e]
        assert len(owner) == 1, (start, end)
        by_tensor.setdefault(owner[0], []).append((start, end))
    for name, parts in by_tensor.items():
        parts.sort()
        s, e = spans[name]
        assert parts[0][0] == s and parts[-1][1] == e, name
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), f"{name}: chunks overlap or leave holes"
    return set(by_tensor)


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"scale": 0.5}),  # one pass: no cache at all
        ("breadcrumbs", {"density": 0.5, "outliers": 0.1}),  # three passes: 2 and 3 from the cache
        pytest.param(  # global ranks over the whole model
            "ties", {"density": 0.4, "granularity": "global"}, marks=pytest.mark.slow
        ),
    ],
)
def test_stream_matches_local_and_counts_requests(tmp_path, seeded, fake_hub, stream_child, method, params):
    family = seeded
    result = stream_child("child_stream", tmp_path / "out", method, params, tmp_path / "ranges")
    local = _local_merge(family, tmp_path / "local_out", method, params)
    assert _weights(tmp_path / "out") == _weights(local) and _weights(local)
    requests = _requests(fake_hub)
    read = set()
    for (repo_id, name), ranges in requests.items():
        assert ranges[0] == (0, 100_000), (repo_id, name)  # one header request per file, first
        data = ranges[1:]
        assert (0, 100_000) not in data and len(set(data)) == len(data), f"{repo_id}/{name}: asked twice"
        key = INPUTS[repo_id]
        read |= {(key, t) for t in _tiles(data, _spans(family[key] / name))}
    for key in INPUTS.values():  # every tensor of every input was read, each byte exactly once
        every = {(key, t) for p in family[key].glob("*.safetensors") for t in _spans(p)}
        assert read >= every, key
    stats = result["stats"]
    assert stats["header_requests"] == len(requests) == 4  # 2 shards + 2 single files
    assert stats["data_requests"] == sum(len(r) - 1 for r in requests.values())
    assert stats["data_requests"] > 3 * 10  # the tiny budget chunks the tensors
    if method == "task_arithmetic":
        assert stats["bytes_from_cache"] == 0 and not result["cache_files"]
    else:
        assert stats["bytes_from_cache"] > 0 and result["cache_files"]  # later passes: no request
    assert result["hf_cache_weights"] == []  # nothing downloaded whole into the Hugging Face cache
    # The same run again (e.g. a resume or another method on the same inputs) reuses the range cache.
    if method != "task_arithmetic":
        fake_hub.range_log.clear()
        again = stream_child("child_stream", tmp_path / "out2", method, params, tmp_path / "ranges")
        assert again["stats"]["data_requests"] == 0 and again["stats"]["header_requests"] == 4
        assert _weights(tmp_path / "out2") == _weights(local)


def test_stream_survives_dropped_connections_and_large_headers(tmp_path, seeded, fake_hub, stream_child):
    """Connections cut mid-body: the rest is asked for, the bytes are the same. A header over the probe
    size costs exactly one more request."""
    fake_hub.faults.update(drop={"model.safetensors": 3}, drop_after=40)
    result = stream_child("child_stream", tmp_path / "out", "task_arithmetic", {"scale": 0.5}, "", 64)
    local = _local_merge(seeded, tmp_path / "local_out", "task_arithmetic", {"scale": 0.5})
    assert _weights(tmp_path / "out") == _weights(local)
    assert fake_hub.faults["drop"]["model.safetensors"] == 0
    # probe of 64 bytes: every header needs a second request (plus one per dropped header probe)
    assert result["stats"]["header_requests"] >= 2 * 4


def test_stream_cli_reports_and_errors(tmp_path, seeded, fake_hub, stream_child, closed_port_url):
    result = stream_child("child_cli", tmp_path / "out")
    code, output = result["merge"]
    assert code == 0, output
    assert "streamed inputs: 4 header + " in output and "MB fetched" in output
    assert "- alice/ft1\n" in (tmp_path / "out" / "surgery_recipe.yaml").read_text()
    code, output = result["missing"]
    assert code == 1 and "the Hub has no model repo alice/missing" in output and "hint:" in output
    assert "Traceback" not in output
    # Offline: no network, so streaming reads the cache as a download would: the streamed run above
    # cached the small files only, and the error says so.
    offline = stream_child("child_cli", tmp_path / "off", env={"HF_HUB_OFFLINE": "1"})
    code, output = offline["merge"]
    assert code == 1 and "the cached copy of alice/sharded is incomplete" in output, output
    assert "unset HF_HUB_OFFLINE" in output
    # No network: the small files come from the cache (as huggingface_hub does), the first header
    # request fails after its retries, and the error says what to check.
    gone = stream_child("child_cli", tmp_path / "gone", env={"HF_ENDPOINT": closed_port_url})
    code, output = gone["merge"]
    assert code == 1 and "by range from the Hub failed: ConnectError" in output, output
    assert "hint: check the network (and HF_ENDPOINT), or run without --stream" in output
    assert not (tmp_path / "off").exists() and not (tmp_path / "gone").exists()


def test_stream_read_failure_mid_run_is_clear(tmp_path, seeded, fake_hub, stream_child, closed_port_url):
    """The headers are read, then the network goes: a clear error, and an output that is a partial run
    (resumable), never a finished-looking checkpoint."""
    result = stream_child("child_fail_data", tmp_path / "out", closed_port_url)
    kind, message, hint = result["error"]
    assert kind == "InputReadError" and "by range from the Hub failed" in message, message
    assert "re-run" in hint and "network" in hint
    assert result["left"] == [".surgery-partial"]


def test_inspect_stream_reads_headers_only(tmp_path, seeded, fake_hub, stream_child):
    from surgery.inspect import describe

    result = stream_child("child_inspect", "alice/sharded")
    local = describe(str(seeded["sharded"]))
    assert result["report"] == {**local, "source": "alice/sharded"}
    requests = _requests(fake_hub)
    assert sorted(requests) == [("alice/sharded", f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    assert all(r == [(0, 100_000)] for r in requests.values())  # one header request each, no data


# -- children (fresh interpreter, Hub environment set) --------------------------------------------------
def child_inspect(source: str) -> dict:
    from surgery.inspect import describe

    return {"report": describe(source, stream=True)}


def child_stream(out: str, method: str, params: dict, cache: str, probe: int | None = None) -> dict:
    import time

    from huggingface_hub import constants

    import surgery.remote
    from surgery.engine import EngineOptions, execute
    from surgery.inputs import InputOptions
    from surgery.plan import build_plan
    from surgery.recipe import make_recipe
    from surgery.remote import stream_stats

    time.sleep = lambda seconds: None  # retries back off: not what is tested
    if probe:
        surgery.remote.HEADER_PROBE = probe
    recipe = make_recipe(method, ["alice/ft1", "alice/ft2"], "alice/sharded", params)
    plan = build_plan(recipe, InputOptions(True, Path(cache) if cache else None))
    try:
        execute(plan, Path(out), EngineOptions(max_memory=4000, threads=2))
        stats = stream_stats(plan.inputs)
    finally:
        plan.close()
    hf_cache = Path(constants.HF_HUB_CACHE)
    return {
        "stats": vars(stats),
        "cache_files": sorted(str(p) for p in Path(cache).rglob("*.safetensors")) if cache else [],
        "hf_cache_weights": sorted(p.name for p in hf_cache.rglob("*.safetensors")),
    }


def child_cli(out: str) -> dict:
    import time

    from click.testing import CliRunner
    from surgery_cli.main import cli

    time.sleep = lambda seconds: None  # retries back off: not what is tested

    def run(args):
        r = CliRunner().invoke(cli, args)
        return [r.exit_code, r.output + (repr(r.exception) if r.exit_code not in (0, 1) else "")]

    return {
        "merge": run(["merge", "alice/ft1", "alice/ft2", "--base", "alice/sharded", "-o", out, "--stream", "-q"]),
        "missing": run(["merge", "alice/ft1", "alice/missing", "--base", "alice/sharded", "-o", out + "-x",
                        "--no-download", "-q"]),
    }  # fmt: skip


def child_fail_data(out: str, dead_endpoint: str) -> dict:
    """Open the inputs (headers), then lose the network before any tensor is read."""
    import time

    from huggingface_hub import constants

    from surgery.engine import EngineOptions, execute
    from surgery.errors import SurgeryError
    from surgery.inputs import InputOptions
    from surgery.plan import build_plan
    from surgery.recipe import make_recipe

    time.sleep = lambda seconds: None
    recipe = make_recipe("task_arithmetic", ["alice/ft1", "alice/ft2"], "alice/sharded", {"scale": 0.5})
    plan = build_plan(recipe, InputOptions(True))
    template = constants.HUGGINGFACE_CO_URL_TEMPLATE  # where hf_hub_url points: now nowhere
    constants.HUGGINGFACE_CO_URL_TEMPLATE = template.replace(constants.ENDPOINT, dead_endpoint)
    try:
        execute(plan, Path(out), EngineOptions(max_memory=4000, threads=2))
    except SurgeryError as exc:
        return {"error": [type(exc).__name__, exc.message, exc.hint or ""],
                "left": sorted(p.name for p in Path(out).iterdir())}  # fmt: skip
    finally:
        plan.close()
    return {"error": ["no error", "", ""], "left": []}
