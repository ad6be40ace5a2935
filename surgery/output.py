"""The one guarded way to open an output folder, used by every command that writes a checkpoint.

``open_output`` makes DESIGN's safety rules hold by construction:

- never write into or over an input (``check_output_folder``);
- one writer at a time: an exclusive ``fcntl.flock`` on ``OUT/.surgery-partial/lock`` (which holds
  the writer's pid); a second process is refused with "another surgery process (pid N) is writing";
- staging, resume and rename: files are built in the staging folder next to a journal, a partial run
  of the same recipe resumes, and ``CheckpointWriter.finalize`` renames the finished files into OUT;
- ``overwrite`` replaces only a previous surgery output (a folder holding its recipe, manifest or a
  partial run, and nothing but files surgery writes there): it deletes those files one by one, never a
  folder it did not make, and refuses any other content, naming it;
- a refused run, or one that fails before it writes, leaves the folder as it found it (a staging
  folder or OUT it created is removed); an interrupted run keeps its staging folder to resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import OutputError
from surgery.files import CONFIG, LOCK, MARKERS, SIDE_FILES, STAGING, written_by_surgery
from surgery.writer import JOURNAL, STATE, CheckpointWriter, Layout


def check_output_folder(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that exists but is not a folder, or that is, contains, or lies inside an
    input."""
    out_r = out.resolve()
    for inp in inputs:
        inp_r = inp.resolve()
        if inp_r.is_dir():
            bad = out_r == inp_r or inp_r in out_r.parents or out_r in inp_r.parents
        else:  # a single file: its own folder would receive files beside it
            bad = out_r == inp_r.parent or out_r in inp_r.parents
        if bad:
            raise OutputError(
                f"output folder {out} overlaps input {inp}",
                hint="choose an output folder outside every input (surgery never writes into or "
                "over an input)",
                path=str(out),
            )
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output {out} exists and is not a folder",
            hint="surgery writes a folder: pass -o a new or empty folder",
            path=str(out),
        )


def side_files_of(folder: Path, config: bool = True) -> dict[str, bytes]:
    """The files an output copies from the input in ``folder``: tokenizer, chat template, generation
    config (``SIDE_FILES``) and, with ``config``, its config.json as is."""
    names = SIDE_FILES + ((CONFIG,) if config else ())
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


@dataclass
class StagedOutput:
    """An output folder held by this process: ``resume`` says whether a partial run of the same
    fingerprint continues; ``writer(layout)`` opens the checkpoint writer (closed on exit)."""

    out: Path
    resume: bool
    writing: bool = False
    _writers: list[CheckpointWriter] = field(default_factory=list)

    def writer(self, layout: Layout) -> CheckpointWriter:
        self.writing = True  # from here on the staging folder is a partial run (even a failed open)
        writer = CheckpointWriter(self.out, layout, self.resume)
        self._writers.append(writer)
        return writer


@contextmanager
def open_output(
    out: Path, inputs: Sequence[Path], fingerprint: str, *, overwrite: bool
) -> Iterator[StagedOutput]:
    """Check, lock and stage ``out``; yield it; release the lock on exit (see the module docstring).

    The layout is given later (``StagedOutput.writer``) because a sparse patch knows its sizes only
    after the reduce passes, which run under the lock.
    """
    out = Path(out)
    check_output_folder(out, inputs)
    staging = out / STAGING
    made_out = not out.exists()
    made_staging = not staging.exists()
    fd = _lock(out, staging)
    try:
        try:
            resume = _settle(out, staging, fingerprint, overwrite)
        except BaseException:
            if made_staging:
                shutil.rmtree(staging, ignore_errors=True)
            if made_out:
                _rmdir_quietly(out)
            raise
        staged = StagedOutput(out, resume)
        try:
            yield staged
        except Exception:
            # An error before the writer opened (a bad device, a budget too small for a whole matrix):
            # nothing was written, so leave no staging folder (or OUT) that we made.
            if made_staging and not resume and not staged.writing:
                shutil.rmtree(staging, ignore_errors=True)
                if made_out:
                    _rmdir_quietly(out)
            raise
        finally:
            for writer in staged._writers:
                writer.close()
    finally:
        os.close(fd)  # releases the lock


def _lock(out: Path, staging: Path) -> int:
    """An fd holding the exclusive lock on ``staging/LOCK`` (the pid written in it)."""
    for _ in range(100):  # the folder may be finalised (staging removed) between our steps: retry
        try:
            staging.mkdir(parents=True, exist_ok=True)
            fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create {staging}: {exc.strerror}", path=str(out)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock {staging / LOCK}: {exc.strerror}", path=str(out)) from None
            who = f" (pid {pid})" if pid.isdigit() else ""  # the holder may not have written it yet
            raise OutputError(
                f"another surgery process{who} is writing {out}",
                hint="wait for it to finish, or choose another output folder",
                path=str(out),
            ) from None
        try:
            try:
                same = os.stat(staging / LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # fresh fd: at offset 0
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder finished and removed the staging folder between our steps: again
    raise OutputError(f"cannot lock {staging / LOCK}: it keeps being replaced", path=str(out))


def _settle(out: Path, staging: Path, fingerprint: str, overwrite: bool) -> bool:
    """With the lock held: resume a partial run (True), or start fresh (False), or refuse."""
    state = staging / STATE
    partial = state.is_file()
    if partial and not overwrite:
        try:
            same = json.loads(state.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return True
        raise OutputError(
            f"output folder {out} holds an unfinished run of a different recipe or inputs",
            hint="re-run that run's exact command to resume it, or pass --overwrite to start over",
            path=str(out),
        )
    content = sorted(p for p in out.iterdir() if p.name != STAGING)
    if content and not overwrite:
        raise OutputError(
            f"output folder {out} is not empty",
            hint="choose a new folder, or pass --overwrite to replace a previous surgery output",
            path=str(out),
        )
    if content:
        foreign = [
            p.name for p in content if not written_by_surgery(p.name) or (p.is_dir() and not p.is_symlink())
        ]
        if foreign or not (partial or any(p.name in MARKERS for p in content)):
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            why = f"holds files surgery did not write ({shown})" if foreign else "is not a surgery output"
            raise OutputError(
                f"output folder {out} {why}: --overwrite only replaces a previous surgery output",
                hint="choose a new or empty folder (surgery never deletes files it did not write)",
                path=str(out),
            )
        for p in content:  # only files surgery writes, one by one
            p.unlink()
    for p in staging.iterdir():  # a previous partial run's files; our lock stays
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (staging / STATE).write_text(json.dumps({"fingerprint": fingerprint}))
    (staging / JOURNAL).touch()
    return False


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
