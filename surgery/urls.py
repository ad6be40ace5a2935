"""Checkpoints at fsspec URLs (``s3://bucket/model/``, ``gs://``, ``https://``, ``memory://`` ...),
read by range like streamed Hub inputs (surgery.remote): one request per header, one per tensor chunk.

The folder's small files (config, index, tokenizer files, card) are copied to a local folder keyed by
the URL; the weights never are. Their sizes and ETags (or dates) pin the content: they go into the
resume fingerprint, so a file that changes under a partial run is noticed. fsspec and its driver for
the scheme (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``) must be installed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from surgery.checkpoint import Checkpoint, open_folder
from surgery.errors import InputNotFoundError, InputReadError
from surgery.files import CARD, CONFIG, INDEX, MANIFEST, SIDE_FILES
from surgery.remote import RangeCache, RangeFiles

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://.+")
SMALL = (CONFIG, INDEX, CARD, MANIFEST, *SIDE_FILES)


def is_url(source: object) -> bool:
    return isinstance(source, str) and URL.fullmatch(source) is not None


class UrlRanges(RangeFiles):
    """Ranges of files under one fsspec folder (``fs.cat_file(path, start, end)``: one request)."""

    def __init__(
        self, fs, folder: str, version: str, sizes: dict[str, int], cache: RangeCache | None
    ) -> None:
        super().__init__(version, cache)
        self.fs = fs
        self.folder = folder
        self.sizes.update(sizes)

    def _label(self, name: str) -> str:
        return f"{self.fs.unstrip_protocol(self.folder)}/{name}"

    def _get(self, name: str, start: int, end: int, into: memoryview, kind: str) -> tuple[int, int]:
        self._count(kind, 1)
        try:
            data = self.fs.cat_file(f"{self.folder}/{name}", start=start, end=end)
        except OSError as exc:  # FileNotFoundError, PermissionError, network errors of the driver
            raise InputReadError(
                f"reading {self._label(name)} by range failed: {type(exc).__name__}: {exc}",
                hint="check the URL, the credentials of its file system and the network, then re-run",
                path=self._label(name),
            ) from None
        n = min(len(data), len(into))
        into[:n] = data[:n]
        self._count("bytes_fetched", n)
        return n, self.sizes[name]


def open_url(source: str, cache_root: Path, range_cache: Path | None) -> Checkpoint:
    """Open the checkpoint folder (or single ``.safetensors`` file) at fsspec URL ``source``."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(source)
    except (ImportError, ValueError) as exc:
        raise InputNotFoundError(
            f"cannot read {source}: {exc}",
            hint="install fsspec and the driver of this URL scheme (e.g. s3fs for s3://)",
            path=source,
        ) from None
    path = path.rstrip("/")
    try:
        if path.endswith(".safetensors") and fs.isfile(path):
            folder, listing = path.rsplit("/", 1)[0], [fs.info(path)]
        elif fs.isdir(path):
            folder, listing = path, fs.ls(path, detail=True)
        else:
            raise FileNotFoundError(path)
    except FileNotFoundError:
        raise InputNotFoundError(
            f"checkpoint not found: {source}", hint="check the URL", path=source
        ) from None
    files = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in listing if e.get("type") == "file"}
    weights = sorted(n for n in files if n.endswith(".safetensors"))
    pins = [[n, int(files[n]["size"]), str(_stamp(files[n]))] for n in weights]
    version = hashlib.sha256(repr(pins).encode()).hexdigest()[:16]
    local = cache_root / "urls" / hashlib.sha256(source.encode()).hexdigest()[:16] / version
    local.mkdir(parents=True, exist_ok=True)
    for name in SMALL:  # only the small files are copied
        if name in files and not (local / name).is_file():
            (local / name).write_bytes(fs.cat_file(f"{folder}/{name}"))
    cache = RangeCache(range_cache / "urls" / local.parent.name / version) if range_cache else None
    io = UrlRanges(fs, folder, version, {n: int(files[n]["size"]) for n in weights}, cache)
    try:
        return open_folder(source, local, io.read_header, weights, io)
    except BaseException:
        io.close()
        raise


def _stamp(entry: dict) -> object:
    """What identifies a file's content besides its size: its ETag, else its modification date."""
    return entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("created")
