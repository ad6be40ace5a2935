"""`surgery tune`: grid parsing, eval files, scoring against independent code, and the tune loop on
the bundled example family (task arithmetic of one fine-tune: scale 1 must beat scale 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from surgery import tune
from surgery.engine import EngineOptions, merge
from surgery.errors import OutputError, RecipeError
from surgery.recipe import make_recipe

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "examples" / "family"
sys.path.insert(0, str(ROOT / "examples"))


def test_parse_grid_is_the_product_in_order():
    assert tune.parse_grid(["scale=0.5,1", "density=0.1,0.2"]) == [
        {"scale": 0.5, "density": 0.1},
        {"scale": 0.5, "density": 0.2},
        {"scale": 1, "density": 0.1},
        {"scale": 1, "density": 0.2},
    ]
    for bad in (["scale"], ["scale="], ["=1"], ["scale=a,b"], ["scale=1", "scale=2"], []):
        with pytest.raises(RecipeError):
            tune.parse_grid(bad)


def test_read_eval_kinds_and_errors(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "p", "answer": "a"}\n\n{"prompt": "q", "answer": "b"}\n')
    ev = tune.read_eval(qa)
    assert ev.kind == "exact_match" and ev.items == (("p", "a"), ("q", "b")) and ev.higher_is_better
    tx = tmp_path / "tx.jsonl"
    tx.write_text('{"text": "hello"}\n')
    assert tune.read_eval(tx).kind == "loss" and not tune.read_eval(tx).higher_is_better
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"prompt": "p", "answer": "a"}\n')
    with pytest.raises(RecipeError, match="mixes"):
        tune.read_eval(mixed)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "p"}\n')
    with pytest.raises(RecipeError, match=":1: needs"):
        tune.read_eval(wrong)


@pytest.fixture(scope="module")
def add_eval(tmp_path_factory):
    from tasks import eval_set

    path = tmp_path_factory.mktemp("eval") / "add.jsonl"
    examples = eval_set("add", 20)
    path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
    return path, examples


def test_exact_match_equals_the_examples_evaluator(add_eval):
    from evaluate import task_accuracy

    path, examples = add_eval
    model = transformers.AutoModelForCausalLM.from_pretrained(FAMILY / "ft_add", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(FAMILY / "ft_add")
    expected = task_accuracy(model, tok, examples)
    assert tune.score_model(FAMILY / "ft_add", tune.read_eval(path)) == pytest.approx(expected)
    assert expected > 0.5


def test_mean_loss_equals_transformers_loss(tmp_path):
    texts = ["add 12 + 3 = 15", "reverse abc = cba"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = transformers.AutoModelForCausalLM.from_pretrained(FAMILY / "base", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(FAMILY / "base")
    total = count = 0
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        n = ids.shape[1] - 1
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    assert tune.score_model(FAMILY / "base", tune.read_eval(path)) == pytest.approx(total / count, rel=1e-5)


def _runner(overwrite=False):
    options = EngineOptions(max_memory=64 * 2**20, threads=1, overwrite=overwrite)
    return lambda recipe, folder: merge(recipe, folder, options)


def test_tune_keeps_the_best_point_and_writes_its_results(add_eval, tmp_path):
    path, _ = add_eval
    recipe = make_recipe("task_arithmetic", [str(FAMILY / "ft_add")], base=str(FAMILY / "base"))
    out = tmp_path / "best"
    seen = []
    result = tune.tune(recipe, tune.parse_grid(["scale=0,1"]), tune.read_eval(path), out, _runner(),
                       on_point=seen.append)  # fmt: skip
    assert [p.params for p in result.points] == [{"scale": 0}, {"scale": 1}] and len(seen) == 2
    base_score, ft_score = (p.score for p in result.points)
    assert ft_score > base_score and result.best.params == {"scale": 1}
    # the output is the merge at the best scale, byte for byte
    direct = tmp_path / "direct"
    merge(make_recipe("task_arithmetic", [str(FAMILY / "ft_add")], base=str(FAMILY / "base"),
                      parameters={"scale": 1}), direct, EngineOptions(threads=1))  # fmt: skip
    for f in direct.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    saved = json.loads((out / tune.RESULTS).read_text())
    assert saved["best"] == {"params": {"scale": 1}, "score": ft_score}
    assert len(saved["points"]) == 2 and saved["metric"] == "exact_match"
    assert "Tuned by measurement" in (out / "README.md").read_text()
    assert (out / tune.PLOT).is_file()
    assert not list(tmp_path.glob(".*surgery-tune*"))  # the work folder is gone


def test_tune_refuses_a_non_empty_output_before_any_work(add_eval, tmp_path):
    path, _ = add_eval
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    recipe = make_recipe("task_arithmetic", [str(FAMILY / "ft_add")], base=str(FAMILY / "base"))

    def never(recipe, folder):
        pytest.fail("merged despite a non-empty output")

    with pytest.raises(OutputError):
        tune.tune(recipe, [{"scale": 1.0}], tune.read_eval(path), out, never)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(RecipeError):  # an unknown grid parameter fails in make_recipe, before merging
        tune.tune(recipe, [{"densty": 1.0}], tune.read_eval(path), tmp_path / "new", never)
    assert not list(tmp_path.glob(".*surgery-tune*"))


def test_cli_tune(invoke, add_eval, tmp_path):
    path, _ = add_eval
    out = tmp_path / "cli"
    args = [
        FAMILY / "ft_add",
        "--base",
        FAMILY / "base",
        "--method",
        "task_arithmetic",
        "--eval",
        path,
        "-o",
        out,
    ]
    r = invoke("tune", *args, "--grid", "scale=1.0", "--max-memory", "64MiB")
    assert r.exit_code == 0, r.output
    assert "best: scale=1.0" in r.stdout and "| 1.0 |" in r.stdout
    assert json.loads((out / tune.RESULTS).read_text())["best"]["params"] == {"scale": 1.0}
    r = invoke("tune", *args, "--grid", "scale=1.0")
    assert r.exit_code == 1 and r.stderr.startswith("error: output folder") and "--overwrite" in r.stderr
    r = invoke("tune", *args[:-1], tmp_path / "x", "--grid", "scale=a")
    assert r.exit_code == 1 and "values must be numbers" in r.stderr
