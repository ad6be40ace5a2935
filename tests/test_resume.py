"""Interrupted runs: SIGKILL and resume, Ctrl-C, a full disk, a crash while finalising.

A run stages its shards in ``OUT/.surgery-partial/`` with a journal of finished tensors; until it is
finalised, OUT must not look like a checkpoint, and re-running the same command must finish it with
output byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint

STAGING = ".surgery-partial"
N_BIG = 12


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def journal_lines(out: Path) -> list[str]:
    path = out / STAGING / "journal.txt"
    if not path.is_file():
        return []
    return path.read_text().split("\n")[:-1]  # a torn last line (no newline yet) does not count


def assert_unfinished(out: Path) -> None:
    """Only the staging folder: no shard, index, config or card in OUT itself."""
    assert sorted(p.name for p in out.iterdir()) == [STAGING]
    assert (out / STAGING / "state.json").is_file()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Base + 2 fine-tunes of 12 float32 tensors of 128K elements (~6 MB each checkpoint)."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 512, generator=g) for i in range(N_BIG)}
    folders = []
    for name in ("base", "ft1", "ft2"):
        folder = root / name
        folder.mkdir()
        tensors = (
            base
            if name == "base"
            else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def merge_args(family, out: Path, *extra: object) -> list[str]:
    base, ft1, ft2 = family
    return [str(a) for a in ("merge", ft1, ft2, "--base", base, "--breadcrumbs", "-o", out, "-q", *extra)]


# a slow configuration (tiny chunks, one thread, three passes per tensor): easy to interrupt mid-run
SLOW = ("--threads", "1", "--max-memory", "16KiB")


def start_and_interrupt(args: list[str], sig: int) -> subprocess.CompletedProcess:
    """Run `surgery ARGS` in a subprocess and send ``sig`` once the journal has a finished tensor."""
    out = Path(args[args.index("-o") + 1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "surgery_cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        # handler: give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    try:
        while not journal_lines(out):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be interrupted: {proc.communicate()}")
            assert time.monotonic() < deadline, "no tensor finished within 120 s"
            time.sleep(0.002)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_kill_then_resume_gives_identical_output(big, invoke, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    killed = start_and_interrupt(merge_args(big, out, *SLOW), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    done = journal_lines(out)
    assert 1 <= len(done) < N_BIG, done
    assert_unfinished(out)

    # another recipe, or changed inputs, must not continue (or silently destroy) this partial run
    other = invoke(*merge_args(big, out, "--density", "0.2"))
    assert other.exit_code == 1
    assert (
        f"error: output folder {out} holds an unfinished run of a different recipe or inputs" in other.stderr
    )
    assert "pass --overwrite to start over" in other.stderr
    shard = big[1] / "model.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        changed = invoke(*merge_args(big, out))
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed.exit_code == 1 and "different recipe or inputs" in changed.stderr
    assert journal_lines(out) == done
    assert_unfinished(out)

    # the same command resumes and finishes; the result equals an uninterrupted run
    resumed = invoke(*merge_args(big, out, *SLOW))
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    assert f"({N_BIG} tensors, {len(done)} resumed," in resumed.stdout
    full = invoke(*merge_args(big, ref, "--threads", "2"))
    assert full.exit_code == 0, (full.output, full.exception)
    assert "resumed" not in full.stdout
    assert folder_bytes(out) == folder_bytes(ref)
    assert not (out / STAGING).exists()


def test_ctrl_c_exits_130_with_resume_hint(big, invoke, tmp_path):
    out = tmp_path / "out"
    # 2 threads and chunks of ~50 elements: the run takes seconds after its first tensor, so the
    # signal lands mid-run even when this test process is descheduled for a while on a busy machine
    stopped = start_and_interrupt(
        merge_args(big, out, "--threads", "2", "--max-memory", "4KiB"), signal.SIGINT
    )
    assert stopped.returncode == 130, stopped.stderr
    assert "error: interrupted" in stopped.stderr
    assert (
        f"hint: {out} holds a partial run (not a usable checkpoint); re-run the same command to resume it"
        in stopped.stderr
    )
    assert "Traceback" not in stopped.stderr
    assert_unfinished(out)
    # a different recipe over the partial run: refused without --overwrite, a fresh run with it
    assert invoke(*merge_args(big, out, "--density", "0.2")).exit_code == 1
    result = invoke(*merge_args(big, out, "--density", "0.2", "--overwrite"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "resumed" not in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors", "surgery_recipe.yaml"]
    with open_checkpoint(out) as ckpt:
        assert len(ckpt.tensors) == N_BIG


# -- in-process failures on tiny inputs ----------------------------------------------------------------
@pytest.fixture
def tiny(make_family, invoke, tmp_path):
    """(base, ft1, ft2) and the bytes of an uninterrupted breadcrumbs merge of them into 2 shards."""
    base, (ft1, ft2) = make_family()
    family = (base, ft1, ft2)
    extra = ("--max-shard-size", "4KB", "--threads", "2")
    result = invoke(*merge_args(family, tmp_path / "ref", *extra))
    assert result.exit_code == 0, (result.output, result.exception)
    return family, extra, folder_bytes(tmp_path / "ref")


def test_disk_full_at_preallocation(tiny, invoke, tmp_path, monkeypatch):
    family, extra, ref = tiny
    out = tmp_path / "out"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    result = invoke(*merge_args(family, out, *extra))
    assert result.exit_code == 1
    assert f"error: disk full while writing {out / STAGING}" in result.stderr
    assert "(the output needs 0.00 GB)" in result.stderr
    assert "hint: free space or choose another output folder, then re-run the same command" in result.stderr
    assert_unfinished(out)
    monkeypatch.undo()
    again = invoke(*merge_args(family, out, *extra))
    assert again.exit_code == 0, (again.output, again.exception)
    assert folder_bytes(out) == ref


def test_disk_full_mid_run_then_resume(tiny, invoke, tmp_path, monkeypatch):
    family, extra, ref = tiny
    out = tmp_path / "out"
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 6:  # after the shard headers and a few tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = invoke(*merge_args(family, out, *extra))
    assert result.exit_code == 1, result.output
    assert "error: disk full while writing" in result.stderr and "Traceback" not in result.stderr
    assert_unfinished(out)
    monkeypatch.undo()
    again = invoke(*merge_args(family, out, *extra))
    assert again.exit_code == 0, (again.output, again.exception)
    assert folder_bytes(out) == ref


def test_crash_while_finalising_then_resume(tiny, tmp_path, monkeypatch):
    """Killed half-way through the renames: the same recipe repairs the folder."""
    from surgery.engine import EngineOptions, merge
    from surgery.recipe import make_recipe

    (base, ft1, ft2), _, ref = tiny
    out = tmp_path / "out"
    recipe = make_recipe("breadcrumbs", [str(ft1), str(ft2)], str(base), max_shard_size="4KB")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name.endswith(".safetensors") and len(calls) > 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        merge(recipe, out, EngineOptions(threads=2))
    monkeypatch.undo()
    assert (out / STAGING).is_dir() and not (out / "model.safetensors.index.json").exists()
    result = merge(recipe, out, EngineOptions(threads=1, max_memory=4096))
    assert result.resumed > 0
    got = folder_bytes(out)
    assert {k: v for k, v in got.items() if k != "README.md"} == {
        k: v for k, v in ref.items() if k != "README.md"
    }


def test_stop_between_preallocation_and_header(tiny, invoke, tmp_path, monkeypatch):
    family, extra, ref = tiny
    out = tmp_path / "out"

    def stop(fd, data, offset):
        raise KeyboardInterrupt  # Ctrl-C right after the shard was preallocated

    monkeypatch.setattr(os, "pwrite", stop)
    result = invoke(*merge_args(family, out, *extra))
    assert result.exit_code == 130
    monkeypatch.undo()
    again = invoke(*merge_args(family, out, *extra))
    assert again.exit_code == 0, (again.output, again.exception)
    assert folder_bytes(out) == ref
