"""Opening an input that stands for a model: a checkpoint, or a LoRA adapter over its base.

Everything that reads fine-tunes opens them here, so an adapter is accepted wherever a fine-tune is,
and the planner, engine and methods see one reading interface (``Checkpoint``'s).
"""

from __future__ import annotations

import os

from surgery.adapters import AdapterCheckpoint, is_adapter, open_adapter
from surgery.checkpoint import Checkpoint, open_resolved
from surgery.hub import resolve


def open_input(source: str | os.PathLike, base: str | None = None) -> Checkpoint | AdapterCheckpoint:
    """A checkpoint, or a PEFT LoRA adapter folder / Hub id read as ``base`` + adapter.

    ``base`` is the model the adapter is applied to; None takes the adapter's own
    ``base_model_name_or_path``. It is ignored for full checkpoints.
    """
    folder = resolve(source)
    if is_adapter(folder):
        return open_adapter(str(source), folder, base)
    return open_resolved(str(source), folder)
