"""Opening checkpoints: headers only, validated, and zero-surprise reads of tensor ranges.

A checkpoint is a folder holding ``model.safetensors`` or sharded ``model-XXXXX-of-YYYYY.safetensors``
files with ``model.safetensors.index.json``, or a single ``.safetensors`` file. Only the headers are
read when a checkpoint is opened. Tensor data is read with ``os.preadv`` into caller-owned buffers:
page-cache pages then never count in this process's resident set (an mmap would), which is what keeps
peak RSS at the memory budget whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from surgery.dtypes import DTYPES, DType
from surgery.errors import CorruptCheckpointError, InputNotFoundError, MissingTensorError
from surgery.files import CONFIG, INDEX, SINGLE, STAGING
from surgery.hub import resolve

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """An opened checkpoint: tensor locations from the headers, plus the folder's side files."""

    source: str  # what the user named (path or repo id)
    root: Path  # folder holding config/tokenizer files (the file's folder for a single file)
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    io: TensorBytes = field(default_factory=lambda: LocalFiles(), repr=False)

    # -- reading ---------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor {name!r} is not in checkpoint {self.source}",
                hint="check the tensor names with `surgery inspect`",
                tensor=name,
                path=str(self.root),
            ) from None

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (raw storage dtype, C-contiguous) with elements ``start:start+out.size``."""
        info = self.info(name)
        nbytes = out.size * info.dtype.itemsize
        first = info.offset + start * info.dtype.itemsize
        assert start >= 0 and first + nbytes <= info.offset + info.nbytes, (name, start, out.size)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:
            got = self.io.read_into(info.path, first + done, view[done:])
            if got == 0:
                raise CorruptCheckpointError(
                    f"{info.path} ended while reading tensor {name!r}: the file is truncated",
                    hint="re-download or re-copy this shard",
                    path=str(info.path),
                    tensor=name,
                )
            done += got
        return out

    def read(self, name: str) -> np.ndarray:
        """A whole tensor in its raw storage dtype (BF16 as uint16), shaped."""
        info = self.info(name)
        out = np.empty(info.numel, dtype=info.dtype.storage)
        return self.read_into(name, 0, out).reshape(info.shape)

    def prefetch(self, name: str, start: int, count: int) -> None:
        """Hint that a range will be needed soon (local files: kernel read-ahead overlaps compute)."""
        info = self.info(name)
        isz = info.dtype.itemsize
        self.io.prefetch(info.path, info.offset + start * isz, count * isz)

    def close(self) -> None:
        self.io.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts -----------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def config(self) -> dict | None:
        path = self.root / CONFIG
        if not path.is_file():
            return None
        return read_json(path)

    def fingerprint(self) -> list[list]:
        """Identity of the inputs for resuming: local files' names, sizes and modification times;
        streamed files' names, sizes and commit."""
        return self.io.fingerprint(self.files)


class TensorBytes(Protocol):
    """Where a checkpoint's tensor bytes come from: local files here, HTTP ranges in surgery.remote."""

    def read_into(self, path: Path, offset: int, view: memoryview) -> int: ...
    def prefetch(self, path: Path, offset: int, nbytes: int) -> None: ...
    def fingerprint(self, files: tuple[Path, ...]) -> list[list]: ...
    def close(self) -> None: ...


class LocalFiles:
    """Local files read with ``os.preadv`` into the caller's buffer (no mmap: see the module doc)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read_into(self, path: Path, offset: int, view: memoryview) -> int:
        """Bytes read at ``offset`` into ``view`` (fewer at the end of the file, 0 past it)."""
        return os.preadv(self._fd(path), [view], offset)

    def prefetch(self, path: Path, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading a range now, from the read-ahead thread: ``WILLNEED``
        submits the reads itself and blocks while the disk's queue is full, which for a span of
        hundreds of MB would stall the worker that should be computing meanwhile."""
        if hasattr(os, "posix_fadvise"):
            _read_ahead().put((path, offset, nbytes))

    def fingerprint(self, files: tuple[Path, ...]) -> list[list]:
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_HINTS: queue.SimpleQueue | None = None
_HINTS_LOCK = threading.Lock()


def _read_ahead() -> queue.SimpleQueue:
    """The queue of read-ahead hints, served in order by one daemon thread started on first use (a
    hint is only a hint: one left unserved at exit is dropped)."""
    global _HINTS
    with _HINTS_LOCK:
        if _HINTS is None:
            _HINTS = queue.SimpleQueue()
            hints = _HINTS
            threading.Thread(
                target=_serve_hints, args=(hints,), name="surgery-read-ahead", daemon=True
            ).start()
    return _HINTS


def _serve_hints(hints: queue.SimpleQueue) -> None:
    while True:
        _will_need(*hints.get())


def _will_need(path: Path, offset: int, nbytes: int) -> None:
    """``posix_fadvise(WILLNEED)`` on a descriptor of its own (the reader's may be closed by then): a
    hint, so a file that is gone or a refusal is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- opening ---------------------------------------------------------------------------------------
def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint folder, ``.safetensors`` file or Hub repo ``owner/name[@revision]`` (downloaded
    into the Hugging Face cache), reading and validating headers only."""
    return open_resolved(str(source), resolve(source))


def open_resolved(text: str, path: Path) -> Checkpoint:
    """Open the checkpoint ``text`` names, already resolved to a local ``path`` (folder or file)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CorruptCheckpointError(
                f"{path} is not a .safetensors file",
                hint="name a checkpoint folder or a .safetensors file",
                path=str(path),
            )
        tensors, metadata = _read_file(path)
        return Checkpoint(text, path.parent, (path,), tensors, metadata)
    if path.is_dir():
        return open_folder(text, path)
    raise InputNotFoundError(f"checkpoint not found: {text}", hint="check the path", path=text)


def open_folder(
    text: str,
    root: Path,
    read_file: Callable[[Path], tuple[dict[str, TensorInfo], dict[str, str]]] = None,  # type: ignore[assignment]
    weights: list[str] | None = None,
    io: TensorBytes | None = None,
) -> Checkpoint:
    """A checkpoint folder: sharded with an index, ``model.safetensors``, or one ``*.safetensors``.

    By default the weights are the folder's files; a streamed checkpoint (surgery.remote) passes the
    names of its remote ``weights``, a ``read_file`` that fetches a header, and its ``io``.
    """
    read_file = read_file or _read_file
    extra = {} if io is None else {"io": io}
    if weights is None:
        weights = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    index_path = root / INDEX
    if index_path.is_file():
        weight_map = _read_index(index_path)
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        tensors: dict[str, TensorInfo] = {}
        files = []
        metadata: dict[str, str] = {}
        for fname in sorted(by_file):
            shard = _shard_path(root, fname, index_path, weights, io is None)
            found, meta = read_file(shard)
            metadata = metadata or meta
            files.append(shard)
            for name in by_file[fname]:
                if name not in found:
                    raise CorruptCheckpointError(
                        f"{index_path} maps tensor {name!r} to {fname}, but that shard has no such tensor",
                        hint="the index and the shards do not belong together; re-download them",
                        path=str(shard),
                        tensor=name,
                    )
                tensors[name] = found[name]
        return Checkpoint(text, root, tuple(files), tensors, metadata, **extra)
    if SINGLE in weights:
        weights = [SINGLE]
    if len(weights) > 1:
        raise CorruptCheckpointError(
            f"{root} holds {len(weights)} .safetensors files but no {INDEX}",
            hint="restore the index file, or name one .safetensors file directly",
            path=str(root),
        )
    if len(weights) == 1:
        tensors, metadata = read_file(root / weights[0])
        return Checkpoint(text, root, (root / weights[0],), tensors, metadata, **extra)
    if (root / STAGING).is_dir():
        raise InputNotFoundError(
            f"{root} holds an unfinished surgery run ({STAGING}), not a checkpoint",
            hint="re-run the command that wrote it: it resumes and finishes the output",
            path=str(root),
        )
    raise InputNotFoundError(
        f"no safetensors weights in {root}",
        hint="expected model.safetensors, or shards with model.safetensors.index.json "
        "(convert .bin checkpoints to safetensors first)",
        path=str(root),
    )


def read_json(path: Path) -> object:
    """A JSON side file (config, index, manifest, adapter config); a damaged one is a clear error."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON: {exc}",
            hint="the file is damaged: download or copy it again",
            path=str(path),
        ) from None


def _read_index(index_path: Path) -> dict[str, str]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            f"{index_path} has no valid 'weight_map' (tensor name -> shard file)",
            path=str(index_path),
        )
    return weight_map


def _shard_path(root: Path, fname: str, index_path: Path, weights: list[str], local: bool) -> Path:
    """Resolve a shard named in the index, refusing names that escape the checkpoint folder."""
    candidate = root / fname
    # Lexical: Hub cache snapshots are symlinks into ../../blobs, which is where they belong.
    if Path(fname).is_absolute() or os.path.dirname(os.path.normpath(candidate)) != os.path.normpath(root):
        raise CorruptCheckpointError(
            f"{index_path} names shard {fname!r}, which lies outside the checkpoint folder",
            hint="shard names in an index must be plain file names in the same folder",
            path=str(index_path),
        )
    if fname not in weights and not (local and candidate.is_file()):
        raise InputNotFoundError(
            f"shard {fname} named in {index_path} is missing",
            hint="download or copy the missing shard",
            path=str(candidate),
        )
    return root / fname


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and return (header JSON, data start offset) of a safetensors file, unvalidated."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = header_length(fh.read(8), size, str(path))
        raw = fh.read(n)
    return parse_header_json(raw, str(path)), 8 + n


def header_length(head: bytes, size: int, label: str) -> int:
    """The JSON length N declared by a file's first 8 bytes, checked against the format and ``size``."""
    if len(head) < 8:
        raise CorruptCheckpointError(
            f"{label} is too short to be a safetensors file ({size} bytes)",
            hint="the file is truncated or not safetensors",
            path=label,
        )
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{label} declares a header of {n} bytes, over the format's 100 MB limit",
            hint="the file is corrupt or not safetensors",
            path=label,
        )
    if 8 + n > size:
        raise CorruptCheckpointError(
            f"{label} declares a {n}-byte header but the file has only {size} bytes",
            hint="the file is truncated or not safetensors",
            path=label,
        )
    return n


def parse_header_json(raw: bytes, label: str) -> dict:
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{label} has a header that is not valid JSON ({exc})",
            hint="the file is corrupt or not safetensors",
            path=label,
        ) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{label} has a malformed header", path=label)
    return header


def _read_file(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    header, data_start = read_header(path)
    return tensors_from_header(header, data_start, path.stat().st_size, path, str(path))


def tensors_from_header(
    header: dict, data_start: int, size: int, path: Path, label: str
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check one file's header: known dtypes, sizes, offsets that tile the data. ``size`` is the file's
    length; ``path`` goes into the TensorInfos, ``label`` into error messages."""
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"{label}: __metadata__ must be a map of strings, not {type(metadata).__name__}",
            hint="the file is corrupt",
            path=label,
        )
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, (start, end) = _entry(label, name, entry)
        expected = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or start < 0 or end - start != expected:
            raise CorruptCheckpointError(
                f"{label}: tensor {name!r} ({entry['dtype']}, shape {list(shape)}) needs {expected} "
                f"bytes but its data_offsets [{start}, {end}] give {end - start}",
                hint="the file is corrupt",
                path=label,
                tensor=name,
            )
        if end > data_len:
            raise CorruptCheckpointError(
                f"{label}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                f"{data_len} data bytes: the file is truncated",
                hint="re-download or re-copy this file",
                path=label,
                tensor=name,
            )
        spans.append((start, end, name))
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + start, end - start)
    _check_tiling(label, spans, data_len)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(label: str, name: str, entry: object) -> tuple[DType, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data_offsets) of one header entry, exactly as the format defines them: a known
    dtype name, a list of non-negative integers, and two integers (JSON ints, not floats or strings)."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{label}: tensor {name!r} has a malformed header entry ({why})",
            hint="the file is corrupt or not safetensors",
            path=label,
            tensor=name,
        )

    def ints(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)

    if not isinstance(entry, dict):
        raise bad(f"not an object but {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"no {key!r}")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not ints(shape) or any(d < 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not ints(offsets) or len(offsets) != 2:
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_tiling(label: str, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Offsets must cover the data exactly: no overlaps (two tensors sharing bytes), no holes."""
    pos = 0
    prev = None
    for start, end, name in sorted(spans):
        if start < pos:
            raise CorruptCheckpointError(
                f"{label}: tensors {prev!r} and {name!r} overlap (byte {start} < {pos})",
                hint="the file is corrupt",
                path=label,
                tensor=name,
            )
        if start > pos:
            raise CorruptCheckpointError(
                f"{label}: bytes {pos}..{start} of the data belong to no tensor",
                hint="the file is corrupt",
                path=label,
            )
        pos, prev = end, name
    if pos != data_len:
        raise CorruptCheckpointError(
            f"{label}: the header describes {pos} data bytes but the file holds {data_len}",
            hint="the file is corrupt or was appended to",
            path=label,
        )
