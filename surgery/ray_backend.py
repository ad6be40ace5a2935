"""The Ray backend (``surgery merge ... --ray ADDRESS``): one run on a Ray cluster, byte for byte the
single-process output.

The driver (the machine that runs the command) builds the same plan as a single-process run and owns
the output folder. Work goes to Ray as stateless tasks that rebuild the plan from the recipe (headers
only) in the worker:

- **reduce stages** (global ranks, LiNeS' auto alpha): the engine asks the driver's stage map for
  ``[fn(item) for item in items]``; the driver sends groups of item indices to tasks, which replay the
  earlier stages from the results the driver already holds (``scaleout.Replay``), compute their items
  and return them (sparse integer histograms, float64 partials). The driver assembles them in item
  order, so the engine combines them exactly as in one process. Each stage's results are saved in
  the staging folder, so a driver that crashed and is re-run does not recompute them.
- **apply**: one task per output shard, written whole into the staging folder under a temporary
  name, fsynced, renamed (``engine.write_shard``). No tensor goes through Ray's object store. A task
  that dies is retried by Ray; every attempt writes the same bytes, so retries are harmless.
- **failure**: when a task fails, the driver stops the rest through a file in the staging folder
  (tasks that have not started return at once) and waits for the running ones, never with
  ``ray.cancel`` (see ``_settled``).
- **finalize**: the driver writes side files and index and moves the shards into place.

OUT must be a path every node sees (a shared file system). Ray is imported only here, lazily.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

from surgery.engine import EngineOptions, RunResult, run_fingerprint
from surgery.errors import BackendError, OutputError, SurgeryError
from surgery.files import STAGING
from surgery.inputs import InputOptions
from surgery.output import open_output
from surgery.plan import Plan, build_plan, input_paths
from surgery.recipe import Recipe
from surgery.scaleout import (
    SHARDS,
    STAGES,
    Replay,
    StageDone,
    side_files,
    start_run,
    thread_map,
    write_atomic,
    write_shard,
)
from surgery.writer import publish

RETRIES = 3  # attempts after a worker dies (os._exit, OOM kill, lost node)
STOP = "stop"  # in the staging folder: the run failed, tasks that start from now on do nothing
SETTLE_S = 60  # after a failure, how long the driver waits for the tasks still running


@dataclass(frozen=True)
class WorkerSpec:
    """What a task needs to rebuild the driver's plan: picklable, no open files."""

    recipe: Recipe
    sources: InputOptions
    options: EngineOptions
    out: str
    fingerprint: str  # the driver's inputs (file sizes and dates, or Hub commits): workers must match


_OPEN: dict[str, tuple[WorkerSpec, Plan]] = {}  # per worker process: the last plan opened


def _plan(spec: WorkerSpec) -> Plan:
    """The plan of ``spec``, opened once per worker process (tasks of one run share it)."""
    held = _OPEN.get("plan")
    if held is not None and held[0] == spec:
        return held[1]
    if held is not None:
        held[1].close()
    plan = build_plan(spec.recipe, spec.sources)
    if run_fingerprint(plan) != spec.fingerprint:
        plan.close()
        raise OutputError(
            "a Ray worker sees different inputs than the driver (other files, dates or Hub commits)",
            hint="put the inputs on storage every node shares, or read Hub inputs with --stream "
            "(pinned to the driver's commit); a branch that moved during the run also does this",
        )
    _OPEN["plan"] = (spec, plan)
    return plan


def _stopped(spec: WorkerSpec) -> bool:
    """Whether the driver has given up on this run (a task failed): the task need not run."""
    return (Path(spec.out) / STAGING / STOP).exists()


def stage_task(spec: WorkerSpec, known: list[list], indices: list[int]) -> list | None:
    """Items ``indices`` of the next reduce stage, after replaying the stages the driver holds
    (None if the run was stopped)."""
    if _stopped(spec):
        return None
    plan = _plan(spec)
    try:
        start_run(plan, spec.options, stage_map=Replay(known, thread_map(spec.options.workers), indices))
    except StageDone as done:
        return done.results
    raise AssertionError("the plan has no reduce stage left to compute")


def shard_task(spec: WorkerSpec, known: list[list], filename: str) -> str | None:
    """Output shard ``filename``, written whole into the staging folder; returns its name (None if
    the run was stopped)."""
    if _stopped(spec):
        return None
    plan = _plan(spec)
    shared = start_run(plan, spec.options, stage_map=Replay(known, thread_map(1)))
    write_shard(shared, Path(spec.out) / STAGING / SHARDS, filename)
    return filename


def connect(address: str):
    """The ``ray`` module, connected: ``local`` starts a private cluster on this machine, ``auto`` or
    ``host:port`` joins a running one. An already initialised Ray (a library caller's) is used as is."""
    try:
        import ray
    except ImportError:
        raise BackendError("--ray needs the ray package", hint="pip install 'model-surgery[ray]'") from None
    if not ray.is_initialized():
        extra = {"include_dashboard": False} if address == "local" else {}
        try:
            ray.init(address=address, log_to_driver=False, **extra)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BackendError(
                f"could not connect to a Ray cluster at {address!r}: {exc}",
                hint="start one (`ray start --head`) and pass its address, or use --ray local",
            ) from None
    return ray


class RayStages:
    """The driver's stage map: each reduce stage as Ray tasks over groups of items, results saved in
    the staging folder and returned in item order."""

    def __init__(self, ray, spec: WorkerSpec, folder: Path, groups: int, stop: Path) -> None:
        self.ray = ray
        self.spec = spec
        self.folder = folder
        self.stop = stop
        self.groups = max(1, groups)
        self.known: list[list] = []
        self.task = ray.remote(num_cpus=1, max_retries=RETRIES)(stage_task)

    def __call__(self, fn: Callable, items: list) -> list:
        path = self.folder / f"stage-{len(self.known)}.pkl"
        if path.is_file():  # the driver was re-run: this stage is done
            results = pickle.loads(path.read_bytes())
        else:
            known = self.ray.put(self.known)
            size = -(-len(items) // self.groups)  # contiguous groups: neighbours share input shards
            groups = [list(range(k, min(k + size, len(items)))) for k in range(0, len(items), size)]
            parts = _gather(self.ray, [self.task.remote(self.spec, known, g) for g in groups], self.stop)
            results = [r for part in parts for r in part]
            write_atomic(path, pickle.dumps(results))
        assert len(results) == len(items)
        self.known.append(results)
        return results


def _gather(ray, refs: list, stop: Path) -> list:
    """The tasks' results; a task's own SurgeryError is re-raised as it is (the CLI prints its hint)."""
    try:
        return _settled(ray, refs, stop)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SurgeryError):
            raise cause from None
        raise BackendError(
            f"a Ray task failed: {cause or exc}", hint="re-run: finished shards are kept"
        ) from None
    except ray.exceptions.RayError as exc:
        raise BackendError(
            f"Ray could not complete the run: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            hint="re-run the same command: finished shards and reduce stages are kept",
        ) from None


def _settled(ray, refs: list, stop: Path) -> list:
    """``ray.get``; on a failure (or Ctrl-C) the other tasks are stopped and waited for, so that
    nothing writes into OUT after the driver returns.

    Not with ``ray.cancel``: in ray 2.60 a cancel that meets a task just finishing makes the driver's
    core worker fail an internal check ("Tried to complete task that was not pending", the race of
    ray-project/ray#54798) and end the whole driver process with status 1, no Python traceback
    (every time within 200 failed batches of tiny tasks here). The stop file (on the storage every
    node shares, like OUT) makes the tasks that have not started return at once; running ones
    finish their shard, harmlessly: any attempt writes the same bytes, and a re-run keeps it."""
    try:
        return ray.get(refs)
    except BaseException:
        with suppress(OSError):  # without the file the other tasks only run in vain: keep the error
            stop.touch()
        ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
        raise


def execute_on_ray(
    plan: Plan,
    out: Path,
    options: EngineOptions,
    sources: InputOptions,
    address: str = "local",
    shard_fn: Callable[[WorkerSpec, list, str], str] = shard_task,
) -> RunResult:
    """Run a checked plan on Ray (see the module doc). ``shard_fn`` is the apply task (tests wrap it)."""
    start = time.perf_counter()
    ray = connect(address)
    fingerprint = run_fingerprint(plan)
    with open_output(out, input_paths(plan), fingerprint, overwrite=options.overwrite) as staged:
        staged.writing = True  # stage results and shards are a resumable partial run from the first
        staging = out / STAGING
        for sub in (STAGES, SHARDS):
            (staging / sub).mkdir(exist_ok=True)
        stop = staging / STOP
        stop.unlink(missing_ok=True)  # a failed earlier run's: this one resumes it
        # One thread per task: Ray runs as many tasks as the cluster has CPUs.
        spec = WorkerSpec(
            plan.recipe, sources, replace(options, threads=1), os.path.abspath(out), fingerprint
        )
        cpus = int(ray.cluster_resources().get("CPU", 1))
        stages = RayStages(ray, spec, staging / STAGES, 2 * cpus, stop)
        shared = start_run(plan, options, stage_map=stages)
        shard_dir = staging / SHARDS
        todo = [s.filename for s in shared.layout.shards if not (shard_dir / s.filename).is_file()]
        # SPREAD: shard tasks are I/O-bound, so spreading them uses every node's disk and network.
        task = ray.remote(num_cpus=1, max_retries=RETRIES, scheduling_strategy="SPREAD")(shard_fn)
        known = ray.put(stages.known)
        _gather(ray, [task.remote(spec, known, filename) for filename in todo], stop)
        publish(out, shared.layout, shard_dir, side_files(shared))
    resumed = sum(len(s.offsets) for s in shared.layout.shards if s.filename not in todo)
    seconds = time.perf_counter() - start
    return RunResult(
        out, len(plan.jobs), resumed, shared.layout.total_bytes, seconds, (), shared.prepared.lines
    )
