"""Opening a run's inputs: local paths, Hub ids (downloaded, or streamed by range), fsspec URLs, and
PEFT LoRA adapter folders (read as their base + adapter).

Everything that reads fine-tunes opens them here, so an adapter is accepted wherever a fine-tune is,
and the planner, engine and methods see one reading interface (``Checkpoint``'s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from surgery.adapters import AdapterCheckpoint, is_adapter, open_adapter
from surgery.checkpoint import Checkpoint, open_folder, open_resolved
from surgery.hub import hub_ref, resolve, stream_snapshot
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
    source: str | os.PathLike,
    options: InputOptions | None = None,
    cache_ranges: bool = False,
    *,
    base: str | None = None,
) -> Checkpoint | AdapterCheckpoint:
    """Open a checkpoint. Local paths win over Hub ids and are opened as always; with
    ``options.stream`` a Hub id is read by range instead of downloaded; a URL is read by range.
    ``cache_ranges``: keep fetched ranges (methods that read their inputs more than once).

    A PEFT LoRA adapter folder (or Hub id; adapters are small, so always downloaded) is read as
    ``base`` + adapter; ``base`` None takes the adapter's own ``base_model_name_or_path``. ``base`` is
    ignored for full checkpoints.
    """
    options = options or InputOptions()
    range_cache = options.cache_folder() if cache_ranges else None
    if is_url(source) and not Path(source).exists():
        return open_url(str(source), options.cache_folder(), range_cache)
    ref = hub_ref(source) if options.stream and isinstance(source, str) else None
    snapshot = stream_snapshot(ref) if ref is not None else None
    if snapshot is None or is_adapter(snapshot[0]):
        folder = resolve(source)
        if is_adapter(folder):
            return open_adapter(str(source), folder, base)
        return open_resolved(str(source), folder)
    folder, commit, weights = snapshot
    cache = RangeCache(range_cache / cache_key(ref.repo_id, commit)) if range_cache else None
    io = HubRanges(ref, commit, cache)
    try:
        return open_folder(str(source), folder, io.read_header, weights, io)
    except BaseException:
        io.close()
        raise
