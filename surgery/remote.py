"""Inputs read by HTTP range from the Hub, without downloading whole checkpoints (``--stream``).

A streamed checkpoint is the same ``Checkpoint`` as a local one (same header validation, same
``read_into``), with ``HubRanges`` as its byte source:

- the small files (config, index, tokenizer, card) are downloaded into the Hugging Face cache as usual,
  which pins the revision to one commit;
- each safetensors header costs ONE range request of ``HEADER_PROBE`` bytes (a second one only for a
  header larger than that), and gives the file's size from ``Content-Range``;
- each ``read_into`` of a tensor chunk is ONE range request, streamed straight into the caller's buffer;
- methods that read the inputs several times pass a ``RangeCache``: a sparse local file per
  (repo, commit, file) that keeps every range fetched, so passes 2+ make no request at all.

Every request goes through huggingface_hub's HTTP client (``HF_TOKEN``, ``HF_ENDPOINT``, retries with
backoff on 5xx and dropped connections). ``HF_HUB_OFFLINE`` means no network: Hub ids are then read from
the cache as without ``--stream`` (surgery.hub.download says when they are not there).
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import (
    Checkpoint,
    TensorInfo,
    header_length,
    parse_header_json,
    tensors_from_header,
)
from surgery.errors import CorruptCheckpointError, InputReadError, SurgeryError
from surgery.hub import HubRef, scrub

# 97% of the Hub's safetensors headers are under 100 kB (huggingface_hub PR #1855): one request each.
HEADER_PROBE = 100_000
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
RETRIES = 5  # as huggingface_hub's http_backoff: waits 1, 2, 4, 8, 8 s
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def cache_key(repo_id: str, commit: str) -> str:
    return f"models--{repo_id.replace('/', '--')}/{commit}"


@dataclass
class StreamStats:
    """What streaming one checkpoint cost: requests made, bytes received, bytes served by the cache."""

    header_requests: int = 0
    data_requests: int = 0
    bytes_fetched: int = 0
    bytes_from_cache: int = 0

    def add(self, other: StreamStats) -> None:
        for key in vars(self):
            setattr(self, key, getattr(self, key) + getattr(other, key))


class RangeFiles:
    """The byte source of a streamed checkpoint: ranges of remote files, through an optional
    ``RangeCache``. ``_get`` (one request) is the transport's: HubRanges (HTTP to a pinned Hub
    commit) or surgery.urls.UrlRanges (any fsspec URL)."""

    def __init__(self, version: str, cache: RangeCache | None) -> None:
        self.version = version  # what pins the files' content (a commit, an ETag or a date)
        self.cache = cache
        self.sizes: dict[str, int] = {}
        self.stats = StreamStats()
        self._lock = threading.Lock()

    def _get(self, name: str, start: int, end: int, into: memoryview, kind: str) -> tuple[int, int]:
        """One request for bytes [start, end) of ``name`` into ``into``: (bytes received, file size)."""
        raise NotImplementedError

    def _label(self, name: str) -> str:
        return f"{self.version}:{name}"

    # -- TensorBytes ------------------------------------------------------------------------------
    def read_into(self, path: Path, offset: int, view: memoryview) -> int:
        name = path.name
        end = min(offset + len(view), self.sizes[name])
        if end <= offset:
            return 0
        if self.cache is not None and self.cache.read(name, offset, view[: end - offset]):
            self._count("bytes_from_cache", end - offset)
            return end - offset
        got, _ = self._get(name, offset, end, view, "data_requests")
        if self.cache is not None and got:
            self.cache.store(name, offset, view[:got])
        return got

    def prefetch(self, path: Path, offset: int, nbytes: int) -> None:
        pass  # each chunk is one request already; read-ahead would only add requests

    def fingerprint(self, files: tuple[Path, ...]) -> list[list]:
        return [[p.name, self.sizes[p.name], self.version] for p in files]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # -- headers ----------------------------------------------------------------------------------
    def read_header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Fetch and validate one file's header: one request of HEADER_PROBE bytes, two if larger."""
        name, label = path.name, self._label(path.name)
        probe = bytearray(HEADER_PROBE)
        got, size = self._get(name, 0, HEADER_PROBE, memoryview(probe), "header_requests")
        self.sizes[name] = size
        got += self._read_exact(name, got, min(8, size), memoryview(probe)[got:])
        n = header_length(bytes(probe[: min(got, 8)]), size, label)
        raw = bytearray(n)
        have = max(0, min(got, 8 + n) - 8)
        raw[:have] = probe[8 : 8 + have]
        self._read_exact(name, 8 + have, 8 + n, memoryview(raw)[have:])  # a header over HEADER_PROBE
        header = parse_header_json(bytes(raw), label)
        return tensors_from_header(header, 8 + n, size, path, label)

    def _read_exact(self, name: str, start: int, end: int, into: memoryview) -> int:
        """Bytes [start, end) into ``into``, asking again after a cut connection; nothing if start >= end."""
        done = 0
        while start + done < end:
            got, _ = self._get(name, start + done, end, into[done:], "header_requests")
            if got == 0:
                raise CorruptCheckpointError(
                    f"{self._label(name)} ended at byte {start + done} while its header was read",
                    hint="the file is truncated or not safetensors",
                    path=self._label(name),
                )
            done += got
        return done

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            setattr(self.stats, key, getattr(self.stats, key) + n)


class HubRanges(RangeFiles):
    """HTTP range requests to one pinned commit of a Hub repo, through huggingface_hub's client."""

    def __init__(self, ref: HubRef, commit: str, cache: RangeCache | None) -> None:
        super().__init__(commit, cache)
        self.ref = ref
        self.commit = commit

    def _label(self, name: str) -> str:
        return f"{self.ref.repo_id}@{self.commit[:12]}:{name}"

    def _get(self, name: str, start: int, end: int, into: memoryview, kind: str) -> tuple[int, int]:
        """GET bytes [start, end) of ``name`` into ``into``: (bytes received, the file's size).

        Fewer bytes than asked come back only at the end of the file, or when the connection drops
        mid-body (the caller asks for the rest). Failures before any byte arrives (no connection,
        timeouts, 429/5xx) are retried with backoff, as huggingface_hub retries its own requests.
        """
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        from surgery.hub import _NETWORK, _find

        url = hf_hub_url(self.ref.repo_id, name, revision=self.commit)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        for attempt in range(RETRIES + 1):
            got, size = 0, 0
            self._count(kind, 1)
            try:
                with get_session().stream(
                    "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
                ) as r:
                    if r.status_code in RETRY_STATUS and attempt < RETRIES:
                        time.sleep(min(8, 2**attempt))
                        continue
                    hf_raise_for_status(r)
                    size = self._check_range(r, name, start, end)
                    for block in r.iter_bytes():
                        take = min(len(block), len(into) - got)
                        into[got : got + take] = block[:take]
                        got += take
                self._count("bytes_fetched", got)
                return got, size
            except SurgeryError:
                raise
            except Exception as exc:
                self._count("bytes_fetched", got)
                if got:  # cut mid-body: keep what arrived, the caller asks for the rest
                    return got, size
                if _find(exc, _NETWORK) is None or attempt == RETRIES:
                    raise self._error(exc, name, kind) from None
                time.sleep(min(8, 2**attempt))
        raise AssertionError("unreachable")

    def _check_range(self, r, name: str, start: int, end: int) -> int:
        """The file size from a 206 answer's Content-Range; refuse a server that ignores Range."""
        match = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        if r.status_code != 206 or match is None or int(match.group(1)) != start:
            raise InputReadError(
                f"{self._label(name)}: the server does not answer HTTP range requests "
                f"(status {r.status_code} to 'Range: bytes={start}-{end - 1}')",
                hint="run without --stream to download the checkpoint instead",
                path=self._label(name),
            )
        return int(match.group(3))

    def _error(self, exc: Exception, name: str, kind: str) -> SurgeryError:
        from surgery.hub import _download_error, _hub_failure, _reason, _status

        if not _hub_failure(exc):
            raise exc
        if _status(exc) in (401, 403, 404):
            return _download_error(exc, self.ref, False)
        if kind == "header_requests":  # while opening the inputs: nothing was written yet
            hint = "check the network (and HF_ENDPOINT), or run without --stream to use a downloaded copy"
        else:
            hint = (
                "check the network (and HF_ENDPOINT), then re-run the same command: finished output "
                "tensors are kept and the run resumes"
            )
        return InputReadError(
            scrub(f"reading {self._label(name)} by range from the Hub failed: {_reason(exc)}"),
            hint=hint,
            path=self._label(name),
        )


class RangeCache:
    """Byte ranges already fetched, kept in one sparse local file per remote file.

    A commit's files never change, so a range fetched once is valid for good: the folder is keyed by
    (repo, commit) and each file's list of ranges is saved beside it (``NAME.ranges.json``) on close,
    after its data is fsynced, so a later run (a resume, a second method) reuses it too.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._spans: dict[str, list[list[int]]] = {}  # per file: sorted, disjoint [start, end)
        self._lock = threading.Lock()

    def read(self, name: str, offset: int, view: memoryview) -> bool:
        """Fill ``view`` from the cache if every byte of it was fetched before; False otherwise."""
        end = offset + len(view)
        with self._lock:
            spans = self._load(name)
            i = bisect.bisect_right(spans, [offset, float("inf")]) - 1
            if i < 0 or spans[i][1] < end:
                return False
            fd = self._fd(name)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                return False  # the data file lost bytes the list promised: fetch again
            done += n
        return True

    def store(self, name: str, offset: int, data: memoryview) -> None:
        with self._lock:
            fd = self._fd(name)
        os.pwrite(fd, data, offset)
        with self._lock:
            _insert(self._load(name), offset, offset + len(data))

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e - s for spans in self._spans.values() for s, e in spans)

    def close(self) -> None:
        with self._lock:
            for name, fd in self._fds.items():
                os.fsync(fd)
                os.close(fd)
                # A unique temporary name: processes sharing a node's cache never mix their lists
                # (each lists only ranges whose bytes it fsynced; the last rename wins).
                index = self.folder / f"{name}.ranges.json"
                tmp = self.folder / f"{name}.ranges.{uuid.uuid4().hex}.tmp"
                tmp.write_text(json.dumps(self._spans[name]))
                os.replace(tmp, index)
            self._fds.clear()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._fds[name] = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _load(self, name: str) -> list[list[int]]:
        spans = self._spans.get(name)
        if spans is None:
            index = self.folder / f"{name}.ranges.json"
            try:
                spans = [[int(s), int(e)] for s, e in json.loads(index.read_text())]
            except (OSError, ValueError, TypeError):
                spans = []  # no cache yet, or an unreadable one: start empty
            if (
                spans
                and (self.folder / name).is_file()
                and (self.folder / name).stat().st_size < spans[-1][1]
            ):
                spans = []
            self._spans[name] = spans
        return spans


def _insert(spans: list[list[int]], start: int, end: int) -> None:
    """Add [start, end) to sorted disjoint ``spans``, merging what touches or overlaps it."""
    i = bisect.bisect_left(spans, [start, start])
    if i > 0 and spans[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(spans) and spans[j][0] <= end:
        start, end = min(start, spans[j][0]), max(end, spans[j][1])
        j += 1
    spans[i:j] = [[start, end]]


def stream_stats(inputs: list[Checkpoint]) -> StreamStats | None:
    """The summed cost of the streamed inputs among ``inputs``; None when none was streamed."""
    total, streamed = StreamStats(), False
    for ckpt in inputs:
        if isinstance(ckpt.io, RangeFiles):
            total.add(ckpt.io.stats)
            streamed = True
    return total if streamed else None
