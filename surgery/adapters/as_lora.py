"""Any merge, delivered as one LoRA adapter: ``surgery merge A1 A2 --base B --as-lora --rank R``.

The merge runs as usual (adapters and full fine-tunes alike as inputs) into a private temporary folder
beside the output, the rank-r adapter of (merged - base) is extracted from it with
``extract_lora``, and the temporary folder is removed. The cost is one full checkpoint of scratch disk
for the duration; the result equals extracting from a merge written by ``surgery merge`` itself.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from surgery.adapters.extract import ExtractReport, Progress, RankRule, extract_lora
from surgery.engine import EngineOptions, merge
from surgery.errors import OutputError, RecipeError
from surgery.output import check_output_folder
from surgery.recipe import Recipe


def merge_as_lora(recipe: Recipe, output: str | Path, rule: RankRule, options: EngineOptions, *,
                  dtype: str = "float32", method: str = "auto",
                  progress: Progress | None = None) -> ExtractReport:  # fmt: skip
    """Run ``recipe`` and write the LoRA adapter of its merged task vector to ``output``."""
    if recipe.base is None:
        raise RecipeError("--as-lora writes an adapter over a base: pass --base BASE")
    rule.check()
    out = Path(output).expanduser()
    check_output_folder(out, [Path(s).expanduser() for s in recipe.inputs])
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:  # before the merge, not after
        raise OutputError(
            f"output folder {out} is not empty",
            hint="choose a new folder, or pass --overwrite to replace its contents",
            path=str(out),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.merged-", dir=out.parent))
    try:
        merge(recipe, scratch, replace(options, overwrite=False))
        models = ", ".join(Path(m).name for m in recipe.models)
        return extract_lora(recipe.base, str(scratch), out, rule, dtype=dtype, device=options.device,
                            method=method, max_memory=options.max_memory, overwrite=options.overwrite,
                            progress=progress, label=f"{recipe.method} merge of {models}")  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # created above by us, holds only the merge
