"""How the Ray backend stops a failed run, without Ray (default suite): the driver marks the run
stopped, waits for every task and re-raises; it never calls ``ray.cancel`` (which aborts the
driver process in ray 2.60); tasks of a stopped run return without reading or writing anything.
The same on a real cluster: tests/test_ray.py (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.errors import BackendError, InputReadError
from surgery.files import STAGING
from surgery.ray_backend import SETTLE_S, STOP, WorkerSpec, _gather, shard_task, stage_task


class TaskError(Exception):
    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class FakeRay:
    """What ``_gather`` uses of the ``ray`` module; ``get`` raises ``failure`` if one is given."""

    class exceptions:  # the ``ray.exceptions`` namespace
        RayError = Exception
        RayTaskError = TaskError

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.log: list = []

    def get(self, refs):
        self.log.append(("get", list(refs)))
        if self.failure is not None:
            raise self.failure
        return [f"result {r}" for r in refs]

    def wait(self, refs, *, num_returns, timeout):
        self.log.append(("wait", list(refs), num_returns, timeout))
        return list(refs), []

    def cancel(self, ref):
        raise AssertionError("ray.cancel ends ray 2.60's driver process when it races a finishing task")


@pytest.mark.parametrize(
    "failure, raised",
    [
        (TaskError(InputReadError("the network went away", hint="re-run")), InputReadError),
        (TaskError(ValueError("a bug")), BackendError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_a_failure_stops_the_run_and_waits_for_every_task(tmp_path, failure, raised):
    ray, stop = FakeRay(failure), tmp_path / STOP
    with pytest.raises(raised):
        _gather(ray, ["a", "b", "c"], stop)
    assert stop.is_file()
    # every task settled (all of them, not only the unfinished), within the bound
    assert ray.log == [("get", ["a", "b", "c"]), ("wait", ["a", "b", "c"], 3, SETTLE_S)]


def test_a_success_returns_results_in_order_and_leaves_no_stop_file(tmp_path):
    ray, stop = FakeRay(), tmp_path / STOP
    assert _gather(ray, ["a", "b"], stop) == ["result a", "result b"]
    assert not stop.exists()
    assert ray.log == [("get", ["a", "b"])]


def test_the_error_survives_when_the_stop_file_cannot_be_written(tmp_path):
    """A staging folder gone (or a full disk) must not replace the task's error with its own."""
    ray = FakeRay(TaskError(InputReadError("injected", hint="re-run")))
    with pytest.raises(InputReadError, match="injected"):
        _gather(ray, ["a"], tmp_path / "gone" / STOP)


@pytest.mark.parametrize(
    "task, item", [(shard_task, "model-00001-of-00002.safetensors"), (stage_task, [0, 1])]
)
def test_tasks_of_a_stopped_run_do_nothing(tmp_path, task, item):
    out = tmp_path / "out"
    (out / STAGING).mkdir(parents=True)
    (out / STAGING / STOP).touch()
    # A spec whose plan cannot even be built: a task that tried would fail.
    spec = WorkerSpec(recipe=None, sources=None, options=None, out=str(out), fingerprint="")
    before = sorted(Path(out).rglob("*"))
    assert task(spec, [], item) is None
    assert sorted(Path(out).rglob("*")) == before
