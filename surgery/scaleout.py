"""One plan, several processes or machines: a static split (``--shards i/N``), shared with the Ray backend.

The plan is static: its output shards, their headers and offsets are a pure function of the recipe and
the input headers. So N processes that build the same plan can share the work without talking to each
other, through files in the output's staging folder (a shared POSIX path on a cluster):

- **reduce stages** (global ranks, LiNeS' auto alpha): the engine asks a *stage map* for
  ``[fn(item) for item in items]``. Share i computes the items ``k`` with ``k % N == i``, writes them to
  ``stages/stage-S.i-of-N.pkl`` (temp name + fsync + rename), waits until every share has written
  its file, and assembles all results in item order. Every share then holds the same results and
  combines them exactly as a single process does (integer histograms, sums in plan order), so the
  reduced parameters are identical.
- **output shards**: shard j belongs to share ``j % N``; each is written whole under a temporary name,
  fsynced and renamed to ``shards/<name>`` in the staging folder (see ``write_shard`` in the engine).
  Every attempt writes the same bytes, so a re-run or a retry is harmless.
- **finalize** (``surgery finalize OUT``, or the Ray driver): when every shard is there, the side files,
  the index and the shards move into place exactly as a single-process run does.

Nothing here knows a method: stage maps see functions and items, shards see a layout.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# _Run and _side_files: the engine's own run state and side files, reused rather than re-implemented.
from surgery.engine import EngineOptions, Prepared, RunResult, _Run, _side_files, run_fingerprint
from surgery.errors import OutputError, RecipeError
from surgery.files import LOCK, STAGING
from surgery.inputs import InputOptions
from surgery.output import check_output_folder, open_output
from surgery.patch import patch_layout
from surgery.plan import Plan, build_plan, input_paths
from surgery.recipe import load_recipe
from surgery.writer import JOURNAL, STATE, Layout, ShardWriter, publish

STAGES = "stages"  # staging subfolder: results of reduce stages
SHARDS = "shards"  # staging subfolder: complete output shards
SPLIT = "split.json"  # staging file: what `surgery finalize` needs to rebuild the plan

StageMap = Callable[[Callable, list], list]  # [fn(x) for x in items], results in item order


@dataclass(frozen=True)
class Share:
    """Share ``index`` (0-based) of ``count``: ``--shards 0/4`` .. ``--shards 3/4``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Share:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise RecipeError(
                f"--shards {text!r} is not I/N with 0 <= I < N",
                hint="e.g. --shards 0/4 on the first of four machines (SLURM: $SLURM_PROCID/$SLURM_NTASKS)",
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, k: int) -> bool:
        return k % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"


# -- the engine's pieces for a run shared by processes ------------------------------------------------
@dataclass(frozen=True)
class SharedRun:
    """A prepared run whose output shards are written one by one, possibly by other processes."""

    run: _Run
    prepared: Prepared
    layout: Layout


def start_run(plan: Plan, options: EngineOptions, stage_map: Callable | None = None) -> SharedRun:
    """The reduce passes of ``plan``, with ``stage_map(fn, items)`` (which must return
    ``[fn(x) for x in items]`` in item order, wherever it computes them) in place of the threads."""
    if plan.recipe.spec.base_hashes is not None:
        raise RecipeError(
            f"{plan.recipe.spec.name} checks its inputs tensor by tensor across the whole model, so it "
            "cannot be split by output shard",
            hint="run it in one process (without --shards / --ray)",
        )
    run = _Run(plan, options, None)
    if stage_map is not None:
        # The engine's documented seam: its whole-model passes map their items through
        # ``run.parallel``; shadowing it on this instance sends them to the stage map. Jobs then run
        # on this process's threads again (the method, once the shadow is gone).
        run.parallel = stage_map
    try:
        prepared = run.prepare()
    finally:
        run.__dict__.pop("parallel", None)
    return SharedRun(run, prepared, plan.layout or patch_layout(prepared.counts, plan.recipe.max_shard_size))


def write_shard(shared: SharedRun, shard_dir: Path, filename: str) -> None:
    """Every tensor of output shard ``filename``, written whole into ``shard_dir`` (ShardWriter)."""
    run, where = shared.run, {n: s.filename for s in shared.layout.shards for n in s.offsets}
    writer = ShardWriter(shared.layout, filename, shard_dir)
    try:
        run.prepared, run.writer = shared.prepared, writer
        jobs = []
        for job in shared.run.plan.jobs:
            files = {where[n] for n in run.outputs(job)}
            if len(files) > 1:
                raise RecipeError(
                    f"tensor {job.name!r} has outputs in several shards, so the run cannot be split",
                    hint="raise --max-shard-size, or run it in one process",
                )
            if files == {filename}:
                jobs.append(job)
        run.run_jobs(jobs)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def side_files(shared: SharedRun) -> dict[str, bytes]:
    return _side_files(shared.run.plan, shared.prepared, {}, shared.layout)[0]


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path``, all or nothing: temp name, fsync, rename (safe for concurrent writers)."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SplitStages:
    """The stage map of one share of a static split: compute my items, publish them, wait for the
    other shares' files, return every result in item order.

    A share that is re-run finds its own file from the previous attempt and does not recompute it.
    ``on_wait(message)`` is called once per stage while other shares are still missing.
    """

    def __init__(
        self,
        out: Path,
        share: Share,
        local_map: StageMap,
        on_wait: Callable[[str], None] | None = None,
        poll_s: float = 0.2,
        timeout_s: float | None = None,
    ) -> None:
        self.folder = out / STAGING / STAGES
        self.share = share
        self.local_map = local_map
        self.on_wait = on_wait
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.stage = 0

    def __call__(self, fn: Callable, items: list) -> list:
        stage, self.stage = self.stage, self.stage + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self._path(stage, self.share.index)
        if not mine.is_file():
            indices = [k for k in range(len(items)) if self.share.owns(k)]
            results = self.local_map(fn, [items[k] for k in indices])
            write_atomic(mine, pickle.dumps((len(items), dict(zip(indices, results)))))
        merged: dict[int, object] = {}
        for index in self._wait(stage):
            total, part = pickle.loads(self._path(stage, index).read_bytes())
            if total != len(items):
                raise OutputError(
                    f"share {index}/{self.share.count} ran a different plan (stage {stage}: {total} items, "
                    f"not {len(items)})",
                    hint="every share must run the same command with the same inputs",
                    path=str(self.folder),
                )
            merged.update(part)
        return [merged[k] for k in range(len(items))]

    def _path(self, stage: int, index: int) -> Path:
        return self.folder / f"stage-{stage}.{index}-of-{self.share.count}.pkl"

    def _wait(self, stage: int) -> range:
        everyone = range(self.share.count)
        start, told = time.monotonic(), False
        while True:
            missing = [i for i in everyone if not self._path(stage, i).is_file()]
            if not missing:
                return everyone
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                raise OutputError(
                    f"shares {missing} of {self.share.count} did not finish reduce stage {stage} in "
                    f"{self.timeout_s:.0f} s",
                    hint="every share must run at the same time (they wait for one another between "
                    "reduce passes); re-run the missing ones with the same command",
                    path=str(self.folder),
                )
            if not told and self.on_wait is not None:
                self.on_wait(f"waiting for shares {missing} of {self.share.count} (reduce stage {stage})")
                told = True
            time.sleep(self.poll_s)


class Replay:
    """A stage map for a stateless worker (a Ray task): it returns the results the driver already
    holds for the first stages, then runs only ``run`` (item indices) of the next stage and stops the
    caller with ``StageDone`` carrying those results."""

    def __init__(self, known: list[list], local_map: StageMap, run: list[int] | None = None) -> None:
        self.known = known
        self.local_map = local_map
        self.run = run
        self.stage = 0

    def __call__(self, fn: Callable, items: list) -> list:
        stage, self.stage = self.stage, self.stage + 1
        if stage < len(self.known):
            assert len(self.known[stage]) == len(items), (stage, len(items))
            return self.known[stage]
        if self.run is None:
            raise OutputError(
                f"reduce stage {stage} has not been completed by every share yet",
                hint="run every share (`--shards I/N` for each I) before finalizing",
            )
        raise StageDone(self.local_map(fn, [items[k] for k in self.run]))


class StageDone(Exception):  # noqa: N818 - control flow, not an error
    """Raised by ``Replay`` once the stage a worker was asked for is computed."""

    def __init__(self, results: list) -> None:
        super().__init__("stage done")
        self.results = results


def save_split(out: Path, payload: dict) -> None:
    """What ``surgery finalize`` needs (the recipe, how inputs are read), written once by any share."""
    path = out / STAGING / SPLIT
    if not path.is_file():
        write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def load_split(out: Path) -> dict:
    path = out / STAGING / SPLIT
    if not path.is_file():
        raise OutputError(
            f"{out} holds no split run to finalize",
            hint="`surgery finalize OUT` completes a folder written by `surgery merge ... --shards I/N`",
            path=str(out),
        )
    return json.loads(path.read_text())


def known_stages(out: Path, share_count: int) -> list[list]:
    """Every complete reduce stage of a split run, results in item order (to replay, not recompute)."""
    folder = out / STAGING / STAGES
    stages = []
    while True:
        parts = [folder / f"stage-{len(stages)}.{i}-of-{share_count}.pkl" for i in range(share_count)]
        if not all(p.is_file() for p in parts):
            return stages
        merged: dict[int, object] = {}
        total = 0
        for p in parts:
            total, part = pickle.loads(p.read_bytes())
            merged.update(part)
        stages.append([merged[k] for k in range(total)])


def thread_map(workers: int) -> StageMap:
    """A stage map on ``workers`` threads (the kernels and reads release the GIL), results in order."""

    def run(fn: Callable, items: list) -> list:
        if workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers, thread_name_prefix="surgery-share") as pool:
            return list(pool.map(fn, items))

    return run


# -- static split ----------------------------------------------------------------------------------
RECIPE_COPY = "split-recipe.yaml"  # staging: the recipe every share runs (finalize rebuilds the plan)


def join_output(out: Path, plan: Plan) -> int:
    """Create or join the staging folder several shares write into, without racing one another.

    Shares hold a *shared* flock on the staging folder's lock file: they coexist, while a
    single-process run or ``finalize`` (an exclusive lock, ``output.open_output``) cannot start on the
    folder meanwhile, nor a share while one of those runs. Returns the fd that holds the lock.
    """
    check_output_folder(out, input_paths(plan))
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(
            f"another surgery process is writing {out} on its own (a run without --shards, or finalize)",
            hint="wait for it to finish, or choose another output folder",
            path=str(out),
        ) from None
    try:
        _settle_share(out, staging, run_fingerprint(plan))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _settle_share(out: Path, staging: Path, fingerprint: str) -> None:
    state = staging / STATE
    if state.is_file():
        if json.loads(state.read_text()).get("fingerprint") != fingerprint:
            raise OutputError(
                f"output folder {out} holds an unfinished run of a different recipe or inputs",
                hint="every share must run the same command; pass a new output folder to start over",
                path=str(out),
            )
    elif any(p.name != STAGING for p in out.iterdir()):
        raise OutputError(
            f"output folder {out} is not empty", hint="choose a new folder for a split run", path=str(out)
        )
    (staging / SHARDS).mkdir(exist_ok=True)
    if not state.is_file():
        write_atomic(state, json.dumps({"fingerprint": fingerprint}).encode())
        (staging / JOURNAL).touch()


@dataclass(frozen=True)
class ShareResult:
    output: Path
    shards_written: int
    shards_resumed: int  # already complete from an earlier attempt
    bytes_written: int
    seconds: float


def run_share(
    plan: Plan,
    out: Path,
    options: EngineOptions,
    share: Share,
    sources: InputOptions,
    on_wait: Callable[[str], None] | None = None,
) -> ShareResult:
    """Share ``share`` of a run: its items of every reduce stage (waiting for the other shares'), then
    its output shards. ``finalize_split`` completes the folder once every share is done."""
    start = time.perf_counter()
    lock = join_output(out, plan)
    try:
        staging = out / STAGING
        if not (staging / RECIPE_COPY).is_file():
            write_atomic(staging / RECIPE_COPY, plan.recipe.to_yaml().encode())
        cache = None if sources.range_cache is None else str(sources.range_cache)
        save_split(out, {"shares": share.count, "stream": sources.stream, "range_cache": cache})
        stages = SplitStages(out, share, thread_map(options.workers), on_wait)
        shared = start_run(plan, options, stage_map=stages)
        shard_dir = staging / SHARDS
        written = resumed = nbytes = 0
        for k, shard in enumerate(shared.layout.shards):
            if not share.owns(k):
                continue
            if (shard_dir / shard.filename).is_file():
                resumed += 1
                continue
            write_shard(shared, shard_dir, shard.filename)
            written += 1
            nbytes += shard.size
    finally:
        os.close(lock)
    return ShareResult(out, written, resumed, nbytes, time.perf_counter() - start)


def finalize_split(out: Path, threads: int | None = None) -> RunResult:
    """Complete a split run: check that every output shard is there, then write the side files and
    the index and move everything into place, as a single-process run does. Reads no tensor."""
    start = time.perf_counter()
    split = load_split(out)
    recipe = load_recipe(out / STAGING / RECIPE_COPY)
    cache = split.get("range_cache")
    plan = build_plan(recipe, InputOptions(split.get("stream", False), Path(cache) if cache else None))
    try:
        # Exclusive, like any single writer: refused while a share still runs (it holds a shared lock).
        with open_output(out, input_paths(plan), run_fingerprint(plan), overwrite=False) as staged:
            staged.writing = True
            return _finalize(out, plan, split, threads, start)
    finally:
        plan.close()


def _finalize(out: Path, plan: Plan, split: dict, threads: int | None, start: float) -> RunResult:
    staging = out / STAGING
    stages = known_stages(out, int(split["shares"]))
    shared = start_run(plan, EngineOptions(threads=threads), stage_map=Replay(stages, thread_map(1)))
    shard_dir = staging / SHARDS
    missing = [s.filename for s in shared.layout.shards if not (shard_dir / s.filename).is_file()]
    if missing:
        owners = sorted({k % int(split["shares"]) for k, s in enumerate(shared.layout.shards)
                         if s.filename in missing})  # fmt: skip
        raise OutputError(
            f"{len(missing)} of {len(shared.layout.shards)} output shards are not written yet "
            f"(e.g. {missing[0]})",
            hint=f"run (or re-run) shares {', '.join(str(i) for i in owners)} of {split['shares']}, "
            "then finalize again",
            path=str(out),
        )
    publish(out, shared.layout, shard_dir, side_files(shared))
    seconds = time.perf_counter() - start
    return RunResult(out, len(plan.jobs), 0, shared.layout.total_bytes, seconds, (), shared.prepared.lines)
