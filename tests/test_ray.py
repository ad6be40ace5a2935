"""The Ray backend on a local Ray cluster: output byte for byte the single-process output for every
kind of reduce pass, harmless retries after a worker dies, a driver that resumes, a driver that
survives many failed batches, a dead driver reported as such, and a simulated 2-node cluster.

The Ray driver runs in a child process (tests/ray_driver.py): if it dies, the test that was running
fails with its exit status and stderr instead of pytest ending silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from ckpt_factory import make_family
from ray_driver import DriverDied, RayDriver

ray = pytest.importorskip("ray")
# Starting Ray costs ~10-30 s on 2 cores and a worker crash more: not in the default run;
# scripts/test.sh runs this file after it (`pytest -m slow tests/test_ray.py`). The static split
# (tests/test_scaleout*.py) shares all the code below the stage map and runs in the default suite.
pytestmark = pytest.mark.slow

from surgery.engine import EngineOptions, merge  # noqa: E402
from surgery.errors import InputReadError  # noqa: E402
from surgery.files import STAGING  # noqa: E402
from surgery.inputs import InputOptions  # noqa: E402
from surgery.plan import build_plan  # noqa: E402
from surgery.ray_backend import STOP, _gather, execute_on_ray, shard_task  # noqa: E402
from surgery.recipe import make_recipe  # noqa: E402

SHARD_SIZE = 1000
LINES = {"alpha": "auto", "beta": None, "outside": "alpha"}
CASES = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "outliers": 0.1}, None),
    "ties_global_lines": ("ties", {"density": 0.3, "granularity": "global"}, LINES),
    "model_stock": ("model_stock", {}, None),
}


@pytest.fixture(scope="module")
def driver():
    """A local Ray cluster (2 CPUs) and its driver, in a child process."""
    held = RayDriver("local")
    yield held
    held.close()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n_models=2, dtype="BF16", quantize=True)


def _recipe(family, case: str):
    method, params, lines = CASES[case]
    base, models = family
    return make_recipe(method, [str(m) for m in models], str(base), params, None, SHARD_SIZE, lines)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def on_ray(recipe, out: Path, shard_fn=shard_task):
    """One run on the Ray cluster this process is connected to (called in the driver process)."""
    plan = build_plan(recipe)
    try:
        return execute_on_ray(plan, out, EngineOptions(max_memory=6000), InputOptions(), "local", shard_fn)
    finally:
        plan.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_equals_single_process(driver, family, tmp_path, case):
    recipe = _recipe(family, case)
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000, threads=2))
    result = driver.call(on_ray, recipe, tmp_path / "ray")
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


def test_worker_crash_is_retried_with_identical_bytes(driver, family, tmp_path):
    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    driver.call(on_ray, recipe, tmp_path / "ray", crash_once)
    assert len(list(tmp_path.glob("crashed-model-00002-*"))) == 1  # the crash happened, once
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")  # no temp file left, same bytes


def test_driver_resumes_after_a_failed_run(driver, family, tmp_path):
    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    out = tmp_path / "ray"
    with pytest.raises(InputReadError, match="injected"):
        driver.call(on_ray, recipe, out, fail_shard_two)
    assert (out / STAGING).is_dir() and not list(out.glob("*.safetensors"))  # unfinished, not published
    assert (out / STAGING / STOP).is_file()  # the failure stopped the tasks that had not started
    stages = sorted(p.name for p in (out / STAGING / "stages").iterdir())
    assert stages == ["stage-0.pkl", "stage-1.pkl", "stage-2.pkl"]  # high, low histograms, LiNeS L1
    # Nothing runs on after the failure (the other tasks were cancelled or finished): what is in the
    # staging folder now is exactly what the second run must not redo.
    done = {p.name for p in (out / STAGING / "shards").glob("*.safetensors")}
    assert not list((out / STAGING / "shards").glob("*.tmp-*"))
    (tmp_path / "calls").unlink()
    (tmp_path / "fixed").touch()
    result = driver.call(on_ray, recipe, out, fail_shard_two)  # runs although the stop file was left
    again = (tmp_path / "calls").read_text().split()
    assert sorted(again) == sorted(f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5) if
                                   f"model-{i:05d}-of-00004.safetensors" not in done)  # fmt: skip
    assert "model-00002-of-00004.safetensors" in again
    assert result.resumed == (0 if not done else result.resumed) and (result.resumed > 0) == bool(done)
    assert _files(out) == _files(tmp_path / "single")


def tiny_task(i: int, fail: int) -> int:
    if i == fail:
        raise InputReadError("injected", hint="re-run")
    time.sleep(0.002 * (i % 5))  # tasks finish at different times, some while the driver handles the error
    return i


def failed_batches(folder: str, n: int) -> int:
    """``n`` batches of 12 tasks, one failing: each must raise the task's error after every task has
    settled. With ``ray.cancel`` (ray 2.60) the driver died within 200 batches in each of 7 tries."""
    task = ray.remote(num_cpus=1, max_retries=3)(tiny_task)
    for k in range(n):
        refs = [task.remote(i, 3) for i in range(12)]
        try:
            _gather(ray, refs, Path(folder) / f"stop-{k}")
        except InputReadError:
            pass
        else:
            raise AssertionError("a batch with a failing task did not fail")
        assert ray.wait(refs, num_returns=len(refs), timeout=0)[1] == []  # nothing left running
        assert (Path(folder) / f"stop-{k}").is_file()
    return n


def test_failed_batches_leave_the_driver_alive(driver, tmp_path):
    assert driver.call(failed_batches, str(tmp_path), 200) == 200


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does


def test_a_driver_that_dies_fails_the_test_with_its_status(driver):
    """Not silent: the test that was running fails with the driver's exit status and stderr."""
    folder = driver.folder
    with pytest.raises(DriverDied, match=r"was killed by SIGKILL \(the OOM killer .*during kill_myself"):
        driver.call(kill_myself)
    assert driver.proc is None  # the next call starts a new driver
    shutil.rmtree(folder)  # kept for reading after an unexpected death


def test_two_node_cluster(driver, family, tmp_path):
    """A simulated 2-node cluster (two raylets on this machine): same bytes, and tasks ran on both
    nodes. The local cluster is stopped first (2 cores); a later test would start it again."""
    driver.close()
    recipe = _recipe(family, "ties_global_lines")
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    two_nodes = RayDriver("two_nodes")
    try:
        two_nodes.call(on_ray, recipe, tmp_path / "two", where_shard_ran)
    finally:
        two_nodes.close()
    nodes = [p.read_text() for p in tmp_path.glob("node-*")]
    assert len(nodes) == 4 and len(set(nodes)) == 2, nodes
    assert _files(tmp_path / "two") == _files(tmp_path / "single")


def where_shard_ran(spec, known, filename):
    Path(spec.out).parent.joinpath(f"node-{filename}").write_text(ray.get_runtime_context().get_node_id())
    return shard_task(spec, known, filename)
