"""Example files as users write them: JSONL (one JSON object a line) or plain text (one example a line).

Calibration texts, eval sets, prompts and localization data all read through here, so a damaged line is
reported the same way everywhere: file, line number in the file, and what to write instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import RecipeError


def lines_of(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of ``path`` with their line numbers in the file (1-based)."""
    return [
        (i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
    ]


def looks_like_jsonl(path: Path, lines: list[tuple[int, str]]) -> bool:
    """A ``.jsonl`` name, or a first line that opens a JSON object."""
    return path.suffix == ".jsonl" or bool(lines and lines[0][1].lstrip().startswith("{"))


def parse_line(path: Path, lineno: int, line: str) -> object:
    """One JSONL line, or an error naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecipeError(
            f"{path}:{lineno} is not valid JSON: {exc.msg}", hint="one JSON object a line", path=str(path)
        ) from None
