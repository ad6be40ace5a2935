"""A Ray driver in a child process, for the Ray tests: ``ray.init`` and every run happen there, never in
pytest's own process.

Why: when a Ray driver dies, it takes pytest with it if it is pytest. ray 2.60's core worker ends
its process on a failed internal check with status 1 and no Python traceback (the cause of the
silent deaths of tests/test_ray.py, see ``surgery.ray_backend._settled``); the OOM killer or a
signal would do the same. Here such a death fails the test that was running, with the exit status,
the end of the driver's stderr (Ray's fatal messages go there) and where its logs are; the next test
gets a new driver.

``RayDriver(setup).call(fn, *args)`` runs ``fn(*args)`` in the child (``fn`` importable by name, as
for any spawned process) and returns its result or raises its exception.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

START_S = 240  # ray.init: ~5-30 s on 2 shared cores
CALL_S = 300  # one merge on the tiny family: seconds; a worker crash and retry ~1 min at worst
OBJECT_STORE = 128 * 2**20  # the tests put only stage results in it; Ray's default is 30% of RAM


class DriverDied(AssertionError):
    """The Ray driver process died (or hung) while the test was using it."""


class RayDriver:
    """One child process holding a Ray driver: ``setup`` is ``"local"`` (``ray.init(address="local",
    num_cpus=2)``) or ``"two_nodes"`` (a ``ray.cluster_utils.Cluster`` of two 1-CPU raylets)."""

    def __init__(self, setup: str = "local") -> None:
        self.setup = setup
        self.proc = None
        self.conn = None
        self.folder: Path | None = None  # the child's stderr and Ray's session logs

    def call(self, fn: Callable, *args, timeout: float = CALL_S):
        if self.proc is None:
            self._start()
        self.conn.send((fn, args))
        return self._answer(fn.__name__, timeout)

    def close(self) -> None:
        """Shut Ray down and end the child; its folder is removed unless a death left it to read."""
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        _end_group(self.proc.pid)
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, nothing inherited
        # Short: Ray's socket paths under it must stay within 107 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="raydrv-"))
        self.conn, theirs = context.Pipe()
        self.proc = context.Process(target=_serve, args=(theirs, str(self.folder), self.setup), daemon=True)
        self.proc.start()
        theirs.close()
        self._answer(f"Ray's start ({self.setup})", START_S)

    def _answer(self, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1):  # also true once the child is gone (end of file)
            if time.monotonic() > deadline:
                self.proc.kill()
                self._died(what, f"gave no answer within {timeout:.0f} s and was killed")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(30)
            self._died(what, _status(self.proc.exitcode))
        if kind == "raised":
            raise value
        return value

    def _died(self, what: str, status: str):
        pid, folder = self.proc.pid, self.folder
        self.proc.join(30)
        _end_group(pid)
        self.proc = None  # the next call starts a new driver; the folder stays for reading
        stderr = folder / "stderr.txt"
        tail = stderr.read_text(errors="replace")[-4000:] if stderr.is_file() else "(none)"
        raise DriverDied(
            f"the Ray driver process (pid {pid}) {status} during {what}.\n"
            f"Its stderr ends with:\n{tail}\nRay's session logs: {folder / 'ray'}"
        ) from None


def _end_group(pid: int) -> None:
    """Kill what is left of the driver's process group: Ray processes whose parent died (its dashboard
    and runtime-env agents outlive a killed driver)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def _status(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        name = signal.Signals(-code).name
        oom = " (the OOM killer sends SIGKILL: see dmesg)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{oom}"
    return f"exited with status {code}"


def _serve(conn, folder: str, setup: str) -> None:
    """The child: start Ray, then run what the parent sends until it sends None."""
    # Its own process group: what Ray signals to the driver's group never reaches pytest, and what is
    # left of Ray after a death can be ended by group (``_end_group``).
    os.setpgrp()
    err = open(Path(folder) / "stderr.txt", "w")  # open for the life of the process
    for fd in (1, 2):  # Ray's C++ fatal messages are written to fd 2 directly
        os.dup2(err.fileno(), fd)
    faulthandler.enable(err)  # a fatal signal in Python code leaves its stack there
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # Ray's workers import surgery and the tests' task functions from the same paths as this process.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    import ray

    temp = str(Path(folder) / "ray")
    cluster = None
    if setup == "local":
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE, _temp_dir=temp)  # fmt: skip
    else:
        from ray.cluster_utils import Cluster

        os.environ["RAY_TMPDIR"] = temp  # the simulated nodes' files (and "current cluster" pointer)
        node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    conn.send(("ok", None))
    while (message := conn.recv()) is not None:
        fn, args = message
        try:
            answer = ("ok", fn(*args))
        except BaseException as exc:  # the parent re-raises it
            exc.add_note("in the Ray driver process:\n" + "".join(traceback.format_exception(exc)))
            answer = ("raised", exc)
        try:
            pickle.loads(pickle.dumps(answer))  # what the parent will read back
        except Exception as exc:  # an answer that does not pickle
            answer = (
                "raised",
                RuntimeError(f"{fn.__name__}: its answer does not pickle ({exc!r}): {answer}"),
            )
        conn.send(answer)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
