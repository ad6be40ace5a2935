"""Writing a Hugging Face-layout checkpoint with positional writes, safely and resumably.

Output names, dtypes and shapes are known from the plan, so every shard's safetensors header is
computed up front and tensor bytes are written at their offsets with ``os.pwrite`` (any order, any
thread). Tensors are ordered inside a shard by safetensors' dtype order (descending) then name and the
header is padded to a multiple of 8, exactly as ``safetensors.save_file`` does, so our files are
byte-identical to what it would write for the same tensors.

Safety: shards are built in ``OUT/.surgery-partial/`` next to a journal of finished tensors. Only when
every tensor is written are the files fsynced and renamed into ``OUT``, side files first, shards next,
the index last; a folder whose staging directory still exists is not a finished checkpoint. Re-running
the same recipe finds the staging folder, checks its fingerprint, and continues where it stopped.
``output.open_output`` prepares, locks and checks the folder before a writer is opened.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.dtypes import DTYPES
from surgery.errors import OutputError
from surgery.files import INDEX, STAGING, shard_name

STATE = "state.json"
JOURNAL = "journal.txt"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class ShardLayout:
    filename: str
    header: bytes  # 8-byte length + padded JSON
    offsets: dict[str, int]  # tensor name -> absolute file offset of its first byte
    size: int  # total file size


@dataclass(frozen=True)
class Layout:
    shards: tuple[ShardLayout, ...]
    tensors: dict[str, OutputTensor]

    def shard_map(self) -> dict[str, ShardLayout]:
        """Tensor name -> the shard that holds it."""
        return {n: s for s in self.shards for n in s.offsets}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def index_json(self) -> bytes:
        weight_map = {n: s.filename for s in self.shards for n in sorted(s.offsets)}
        params = sum(math.prod(t.shape) for t in self.tensors.values())
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        return (json.dumps(index, indent=2) + "\n").encode()


# safetensors' own dtype order (its Rust enum); save_file lays tensors out by it, descending, then name.
_SAVE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64")  # fmt: skip


def safetensors_header(tensors: list[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict]:
    """Header bytes and relative data offsets, in ``save_file``'s order and padding."""
    ordered = sorted(tensors, key=lambda t: (-_SAVE_ORDER.index(t.dtype), t.name))
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets = {}
    pos = 0
    for t in ordered:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        offsets[t.name] = pos
        pos += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def plan_layout(tensors: list[OutputTensor], max_shard_size: int) -> Layout:
    """Split tensors (in the given order) into shards of at most ``max_shard_size`` bytes.

    As in ``transformers``: a new shard starts when the next tensor would overflow the current one; a
    tensor larger than the limit gets a shard of its own.
    """
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if not groups:
        groups = [[]]
    shards = []
    for i, group in enumerate(groups):
        filename = shard_name(i, len(groups))
        header, rel = safetensors_header(group, {"format": "pt"})
        offsets = {name: len(header) + off for name, off in rel.items()}
        shards.append(ShardLayout(filename, header, offsets, len(header) + sum(t.nbytes for t in group)))
    return Layout(tuple(shards), {t.name: t for t in tensors})


def fingerprint_of(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class CheckpointWriter:
    """Positional writer of a precomputed layout into the staging folder of ``out``."""

    def __init__(self, out: Path, layout: Layout, resume: bool) -> None:
        self.out = out
        self.staging = out / STAGING
        self.layout = layout
        self._where = layout.shard_map()
        self._fds: dict[str, int] = {}
        self.done: set[str] = set()
        journal = self.staging / JOURNAL
        if resume and journal.is_file():
            # A line is complete only with its newline: a kill mid-append leaves a torn last line.
            text = journal.read_text()
            self.done = {line for line in text.split("\n")[:-1] if line in layout.tensors}
        self._journal = open(journal, "a")  # noqa: SIM115 - lives as long as the writer
        try:
            self._open_shards(resume)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, resume: bool) -> None:
        for shard in self.layout.shards:
            path = self.staging / shard.filename
            existed = path.is_file() and path.stat().st_size == shard.size
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[shard.filename] = fd
            if resume and existed:
                # A stop between preallocation and the header write leaves zeros there: the header
                # is fixed by the layout, so write it again; journaled tensors keep their bytes.
                try:
                    self._pwrite(fd, shard.header, 0, path)
                except OSError as exc:
                    raise self._os_error(exc, path) from None
                continue
            try:
                os.ftruncate(fd, 0)
                if hasattr(os, "posix_fallocate") and shard.size:
                    os.posix_fallocate(fd, 0, shard.size)  # a full disk fails now, not mid-run
                else:
                    os.ftruncate(fd, shard.size)
                self._pwrite(fd, shard.header, 0, path)
            except OSError as exc:
                raise self._os_error(exc, path) from None
            self.done -= set(shard.offsets)  # a re-created shard has lost its tensors

    def _os_error(self, exc: OSError, path: Path) -> OutputError:
        return _os_error(exc, path, self.layout.total_bytes)

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, elem_start: int, raw: np.ndarray) -> None:
        """Write elements ``elem_start:elem_start+raw.size`` of tensor ``name`` (storage dtype)."""
        shard = self._where[name]
        isz = DTYPES[self.layout.tensors[name].dtype].itemsize
        assert raw.dtype.itemsize == isz and raw.flags.c_contiguous
        offset = shard.offsets[name] + elem_start * isz
        path = self.staging / shard.filename
        try:
            self._pwrite(self._fds[shard.filename], raw.reshape(-1).view(np.uint8), offset, path)
        except OSError as exc:
            raise self._os_error(exc, path) from None

    def mark_done(self, name: str) -> None:
        """Journal a tensor as completely written (its bytes are in the page cache already)."""
        self._journal.write(name + "\n")
        self._journal.flush()
        self.done.add(name)

    def finalize(self, side_files: dict[str, bytes]) -> None:
        """fsync, then move side files, shards and (last) the index to their final names."""
        missing = set(self.layout.tensors) - self.done
        assert not missing, f"finalize with unwritten tensors: {sorted(missing)[:5]}"
        for filename, fd in self._fds.items():
            try:
                os.fsync(fd)
            except OSError as exc:
                raise self._os_error(exc, self.staging / filename) from None
        self.close()
        publish(self.out, self.layout, self.staging, side_files)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if not self._journal.closed:
            self._journal.close()


def publish(out: Path, layout: Layout, shard_dir: Path, side_files: dict[str, bytes]) -> None:
    """Move a complete run into place: side files first, the (fsynced) shards from ``shard_dir`` next,
    the index last; then remove the staging folder. Until the index (or the single shard) lands, the
    folder does not look finished."""
    staging = out / STAGING
    files = dict(side_files)
    if len(layout.shards) > 1:
        files[INDEX] = layout.index_json()
    index = files.pop(INDEX, None)
    for name, data in files.items():
        _write_whole(staging / name, data, layout)
        os.replace(staging / name, out / name)
    for shard in layout.shards:
        os.replace(shard_dir / shard.filename, out / shard.filename)
    if index is not None:
        _write_whole(staging / INDEX, index, layout)
        os.replace(staging / INDEX, out / INDEX)
    shutil.rmtree(staging)
    _fsync_dir(out)


def _write_whole(path: Path, data: bytes, layout: Layout) -> None:
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _os_error(exc, path, layout.total_bytes) from None


def _os_error(exc: OSError, path: Path, need: int) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"disk full while writing {path} (the output needs {need / 1e9:.2f} GB)",
            hint="free space or choose another output folder, then re-run the same command: "
            "it resumes where it stopped",
            path=str(path),
        )
    return OutputError(f"cannot write {path}: {exc.strerror}", path=str(path))


class ShardWriter:
    """Writes ONE output shard whole, for runs shared by several processes or machines: under a
    temporary name in ``shard_dir``, then fsync and rename to its own name there. A retried or re-run
    attempt writes the same bytes to a new temporary name, so attempts never disturb one another."""

    def __init__(self, layout: Layout, filename: str, shard_dir: Path) -> None:
        self.layout = layout
        self.shard = next(s for s in layout.shards if s.filename == filename)
        self.final = shard_dir / filename
        self.tmp = shard_dir / f"{filename}.tmp-{uuid.uuid4().hex}"
        self.done: set[str] = set()
        shard_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if hasattr(os, "posix_fallocate") and self.shard.size:
                os.posix_fallocate(self._fd, 0, self.shard.size)
            else:
                os.ftruncate(self._fd, self.shard.size)
            CheckpointWriter._pwrite(self._fd, self.shard.header, 0, self.tmp)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.tmp, self.shard.size) from None

    def write(self, name: str, elem_start: int, raw: np.ndarray) -> None:
        isz = DTYPES[self.layout.tensors[name].dtype].itemsize
        assert raw.dtype.itemsize == isz and raw.flags.c_contiguous
        offset = self.shard.offsets[name] + elem_start * isz
        try:
            CheckpointWriter._pwrite(self._fd, raw.reshape(-1).view(np.uint8), offset, self.tmp)
        except OSError as exc:
            raise _os_error(exc, self.tmp, self.shard.size) from None

    def mark_done(self, name: str) -> None:
        self.done.add(name)

    def commit(self) -> None:
        missing = set(self.shard.offsets) - self.done
        assert not missing, f"commit with unwritten tensors: {sorted(missing)[:5]}"
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _os_error(exc, self.tmp, self.shard.size) from None
        os.close(self._fd)
        self._fd = -1
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
