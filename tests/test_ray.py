"""The Ray backend on a local Ray cluster: output byte for byte the single-process output for every
kind of reduce pass, harmless retries after a worker dies, a driver that resumes, and (slow) a
simulated 2-node cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ckpt_factory import make_family

ray = pytest.importorskip("ray")
# Starting Ray costs ~10-30 s on 2 cores and a worker crash ~1 min more: the slow set (pytest -m slow),
# as SCALEOUT.md suggests for CI. The static split (tests/test_scaleout*.py) shares all the code
# below the stage map and runs in the default suite.
pytestmark = pytest.mark.slow

from surgery.engine import EngineOptions, merge  # noqa: E402
from surgery.files import STAGING  # noqa: E402
from surgery.inputs import InputOptions  # noqa: E402
from surgery.plan import build_plan  # noqa: E402
from surgery.ray_backend import execute_on_ray, shard_task  # noqa: E402
from surgery.recipe import make_recipe  # noqa: E402

SHARD_SIZE = 1000
LINES = {"alpha": "auto", "beta": None, "outside": "alpha"}
CASES = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "outliers": 0.1}, None),
    "ties_global_lines": ("ties", {"density": 0.3, "granularity": "global"}, LINES),
    "model_stock": ("model_stock", {}, None),
}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    os.environ.update(
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
    )
    # Workers import surgery (and this test module's helpers) from the same paths as this process.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n_models=2, dtype="BF16", quantize=True)


def _recipe(family, case: str):
    method, params, lines = CASES[case]
    base, models = family
    return make_recipe(method, [str(m) for m in models], str(base), params, None, SHARD_SIZE, lines)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _on_ray(recipe, out: Path, **kwargs):
    plan = build_plan(recipe)
    try:
        return execute_on_ray(plan, out, EngineOptions(max_memory=6000), InputOptions(), "local", **kwargs)
    finally:
        plan.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_equals_single_process(ray_cluster, family, tmp_path, case):
    recipe = _recipe(family, case)
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000, threads=2))
    result = _on_ray(recipe, tmp_path / "ray")
    expected = _files(tmp_path / "single")
    assert sum(n.endswith(".safetensors") for n in expected) >= 3
    assert _files(tmp_path / "ray") == expected
    assert result.resumed == 0


def crash_once(spec, known, filename):
    """The first attempt at the second shard kills its worker process; the retry succeeds."""
    marker = Path(spec.out).parent / f"crashed-{filename}"
    if filename.startswith("model-00002") and not marker.exists():
        marker.touch()
        os._exit(1)
    return shard_task(spec, known, filename)


def fail_shard_two(spec, known, filename):
    """An error inside one shard's task (not retried by Ray: it is not a crash)."""
    Path(spec.out).parent.joinpath("calls").open("a").write(filename + "\n")
    if filename.startswith("model-00002") and not Path(spec.out).parent.joinpath("fixed").exists():
        from surgery.errors import InputReadError

        raise InputReadError("the network went away (injected)", hint="re-run")
    return shard_task(spec, known, filename)


def test_worker_crash_is_retried_with_identical_bytes(ray_cluster, family, tmp_path):
    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    _on_ray(recipe, tmp_path / "ray", shard_fn=crash_once)
    assert len(list(tmp_path.glob("crashed-model-00002-*"))) == 1  # the crash happened, once
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")  # no temp file left, same bytes


def test_driver_resumes_after_a_failed_run(ray_cluster, family, tmp_path):
    from surgery.errors import InputReadError

    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    out = tmp_path / "ray"
    with pytest.raises(InputReadError, match="injected"):
        _on_ray(recipe, out, shard_fn=fail_shard_two)
    assert (out / STAGING).is_dir() and not list(out.glob("*.safetensors"))  # unfinished, not published
    stages = sorted(p.name for p in (out / STAGING / "stages").iterdir())
    assert stages == ["stage-0.pkl", "stage-1.pkl", "stage-2.pkl"]  # high, low histograms, LiNeS L1
    # Nothing runs on after the failure (the other tasks were cancelled or finished): what is in the
    # staging folder now is exactly what the second run must not redo.
    done = {p.name for p in (out / STAGING / "shards").glob("*.safetensors")}
    assert not list((out / STAGING / "shards").glob("*.tmp-*"))
    (tmp_path / "calls").unlink()
    (tmp_path / "fixed").touch()
    result = _on_ray(recipe, out, shard_fn=fail_shard_two)
    again = (tmp_path / "calls").read_text().split()
    assert sorted(again) == sorted(f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5) if
                                   f"model-{i:05d}-of-00004.safetensors" not in done)  # fmt: skip
    assert "model-00002-of-00004.safetensors" in again
    assert result.resumed == (0 if not done else result.resumed) and (result.resumed > 0) == bool(done)
    assert _files(out) == _files(tmp_path / "single")


def test_two_node_cluster(family, tmp_path):
    """A simulated 2-node cluster (two raylets on this machine), in a child process so that it does not
    meet the session's local cluster: same bytes, and tasks ran on both nodes."""
    import json
    import subprocess

    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    code = "import sys, test_ray; test_ray.two_node_child(*sys.argv[1:])"
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="ray2n-")  # Ray's socket paths must stay under 107 bytes
    args = [str(a) for a in (*family[1], family[0], tmp_path / "two", short)]
    env["RAY_TMPDIR"] = short  # Ray's own files (and its "current cluster" pointer) stay in there
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(nodes)) == 2, nodes
    assert _files(tmp_path / "two") == _files(tmp_path / "single")


def two_node_child(ft1: str, ft2: str, base: str, out: str, temp: str) -> None:
    import json

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    method, params, lines = CASES["ties_global_lines"]
    recipe = make_recipe(method, [ft1, ft2], base, params, None, SHARD_SIZE, lines)
    _on_ray(recipe, Path(out), shard_fn=where_shard_ran)
    print(json.dumps(sorted(p.read_text() for p in Path(out).parent.glob("node-*"))))
    ray.shutdown()
    cluster.shutdown()


def where_shard_ran(spec, known, filename):
    Path(spec.out).parent.joinpath(f"node-{filename}").write_text(ray.get_runtime_context().get_node_id())
    return shard_task(spec, known, filename)
