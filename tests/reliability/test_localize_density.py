"""Issue 10, item 13: `localize` writes the density asked for (the paper's growth is opt-in), reports
accuracy on held-out examples, and shows progress."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from analysis.test_localize import EXAMPLES, _read_patch, family  # noqa: E402, F401
from cli_checks import assert_fails  # noqa: E402

from surgery.analysis.localize import localize, split_examples  # noqa: E402


def test_patch_holds_the_requested_density(family, tmp_path):  # noqa: F811
    root = family[0]
    calls = []
    report = localize(root / "base", root / "ft", EXAMPLES, 0.01, tmp_path / "p", steps=8, eval_every=2,
                      lr=8.0, progress=lambda *a: calls.append(a))  # fmt: skip
    held = sum(len(idx) for idx, _ in _read_patch(tmp_path / "p").values())
    assert held == report.kept == report.data_free_kept  # exactly the data-free top-1% count
    assert report.fraction == pytest.approx(0.01, abs=1 / report.total)
    manifest = json.loads((tmp_path / "p" / "surgery_diff.json").read_text())
    assert manifest["kept"] == held and manifest["parameters"]["fixed_density"] is True
    assert [c[:2] for c in calls] == [(i, 9) for i in range(1, 10)]  # one progress call per step
    grown = localize(root / "base", root / "ft", EXAMPLES, 0.01, tmp_path / "g", steps=8, eval_every=2,
                     lr=8.0, fixed_density=False)  # fmt: skip
    # the paper's rounding lets the mask drift away from the data-free count (it did here)
    assert any(kept != report.data_free_kept for _, kept, _, _ in grown.history)


def test_scores_are_on_held_out_examples(family, tmp_path):  # noqa: F811
    root = family[0]
    train, held = split_examples(len(EXAMPLES), 0.2, 0)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(8))
    report = localize(root / "base", root / "ft", EXAMPLES, 0.05, tmp_path / "p", steps=0)
    assert report.held_out == tuple(held)
    # the same scoring on exactly the held-out rows (no split): the same numbers
    only = localize(root / "base", root / "ft", [EXAMPLES[i] for i in held], 0.05, tmp_path / "q", steps=0,
                    holdout=0.0)  # fmt: skip
    for model in ("base", "finetuned", "data_free", "optimised"):
        assert report.scores[model] == pytest.approx(only.scores[model], rel=1e-6)


def test_cli_reports_held_out_and_refuses_a_split_of_one(invoke, family, tmp_path):  # noqa: F811
    root = family[0]
    result = invoke("localize", root / "base", root / "ft", "--data", root / "data.jsonl", "--density", "0.05",
                    "--steps", "2", "-o", tmp_path / "p", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("scores on 2 held-out examples")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "abc=", "answer": "cba"}) + "\n")
    assert_fails(
        invoke(
            "localize", root / "base", root / "ft", "--data", one, "--density", "0.05", "-o", tmp_path / "x"
        ),
        "1 example(s) cannot be split into training data and 1 held-out example(s)",
        hint="give more examples, or --holdout 0",
    )
    assert not (tmp_path / "x").exists()
