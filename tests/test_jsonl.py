"""Example files: one reader for calibration texts, eval sets, prompts and localization data."""

from __future__ import annotations

import pytest

from surgery.errors import RecipeError
from surgery.jsonl import lines_of, looks_like_jsonl, parse_line


def test_a_damaged_line_is_named_by_its_line_in_the_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n')
    lines = lines_of(path)
    assert lines == [(1, '{"text": "a"}'), (3, '{"text": ')]
    assert looks_like_jsonl(path, lines)
    assert parse_line(path, *lines[0]) == {"text": "a"}
    with pytest.raises(RecipeError, match=r"data.jsonl:3 is not valid JSON") as exc:
        parse_line(path, *lines[1])
    assert exc.value.hint == "one JSON object a line"


def test_plain_text_is_not_jsonl(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("add 1 2\n\nsort cab\n")
    assert not looks_like_jsonl(path, lines_of(path))
    assert [line for _, line in lines_of(path)] == ["add 1 2", "sort cab"]
