"""Opening a run's inputs: local paths, Hub ids (downloaded, or streamed by range) and fsspec URLs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import Checkpoint, open_checkpoint, open_folder
from surgery.hub import hub_ref, stream_snapshot
from surgery.remote import HubRanges, RangeCache, cache_key
from surgery.urls import is_url, open_url


@dataclass(frozen=True)
class InputOptions:
    """How remote inputs are read: Hub ids downloaded (the default) or streamed by HTTP range; fsspec
    URLs are always read by range."""

    stream: bool = False
    range_cache: Path | None = None  # where multi-pass runs keep fetched ranges [default: HF_HOME]

    def cache_folder(self) -> Path:
        if self.range_cache is not None:
            return Path(self.range_cache)
        from huggingface_hub import constants

        return Path(constants.HF_HOME) / "surgery-ranges"


def open_input(
    source: str | os.PathLike, options: InputOptions | None = None, cache_ranges: bool = False
) -> Checkpoint:
    """Open a checkpoint. Local paths win over Hub ids and are opened as always; with
    ``options.stream`` a Hub id is read by range instead of downloaded; a URL is read by range.
    ``cache_ranges``: keep fetched ranges (methods that read their inputs more than once)."""
    options = options or InputOptions()
    range_cache = options.cache_folder() if cache_ranges else None
    if is_url(source) and not Path(source).exists():
        return open_url(str(source), options.cache_folder(), range_cache)
    ref = hub_ref(source) if options.stream and isinstance(source, str) else None
    snapshot = stream_snapshot(ref) if ref is not None else None
    if snapshot is None:
        return open_checkpoint(source)
    folder, commit, weights = snapshot
    cache = RangeCache(range_cache / cache_key(ref.repo_id, commit)) if range_cache else None
    io = HubRanges(ref, commit, cache)
    try:
        return open_folder(str(source), folder, io.read_header, weights, io)
    except BaseException:
        io.close()
        raise
