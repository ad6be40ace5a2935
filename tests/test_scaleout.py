"""Static split (``--shards i/N`` + ``surgery finalize``): N shares of a run give the single-process
output byte for byte, for every kind of reduce pass (per-tensor and global ranks, Gram matrices, LiNeS'
auto alpha). Shares run concurrently (threads here; machines on a cluster) and meet only through files
in the output's staging folder.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from ckpt_factory import make_family

from surgery.engine import EngineOptions, merge
from surgery.errors import OutputError, RecipeError
from surgery.files import STAGING
from surgery.inputs import InputOptions
from surgery.plan import build_plan
from surgery.recipe import make_recipe
from surgery.scaleout import SHARDS, Share, finalize_split, join_output, run_share

SHARD_SIZE = 1000  # bytes: the tiny family's output spans several shards

CASES = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "outliers": 0.1}, None),
    "ties_global": ("ties", {"density": 0.3, "granularity": "global"}, None),
    "breadcrumbs_global_lines": (
        "breadcrumbs",
        {"density": 0.4, "outliers": 0.05, "granularity": "global"},
        {"alpha": "auto", "beta": None, "outside": "alpha"},
    ),
    "dare_ties_lines": (
        "dare_ties",
        {"density": 0.5, "seed": 7},
        {"alpha": "auto", "beta": None, "outside": "alpha"},
    ),
    "slerp": ("slerp", {"t": 0.3}, None),
    "model_stock": ("model_stock", {}, None),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return make_family(root, n_models=2, dtype="BF16", quantize=True)


def _recipe(family, case: str):
    method, params, lines = CASES[case]
    base, models = family
    if method == "slerp":  # two endpoints: the base and one fine-tune
        return make_recipe(method, [str(models[0])], str(base), params, None, SHARD_SIZE, lines)
    return make_recipe(method, [str(m) for m in models], str(base), params, None, SHARD_SIZE, lines)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run_shares(recipe, out: Path, n: int, only: list[int] | None = None, threads: int = 1) -> list:
    """Run shares concurrently (each with its own plan: its own open inputs), as N machines would."""
    results: dict[int, object] = {}

    def one(i: int) -> None:
        plan = build_plan(recipe)
        try:
            results[i] = run_share(plan, out, EngineOptions(max_memory=6000, threads=threads), Share(i, n),
                                   InputOptions())  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc
        finally:
            plan.close()

    workers = [threading.Thread(target=one, args=(i,)) for i in (only if only is not None else range(n))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    return [results[i] for i in sorted(results)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_equals_single_process(family, tmp_path, case):
    recipe = _recipe(family, case)
    single = merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000, threads=2))
    assert single.output.is_dir()
    expected = _files(tmp_path / "single")
    assert sum(name.endswith(".safetensors") for name in expected) >= 3, "the split needs several shards"
    n = 3 if case == "breadcrumbs_global_lines" else 2
    _run_shares(recipe, tmp_path / "split", n, threads=2 if case == "slerp" else 1)
    assert (tmp_path / "split" / STAGING).is_dir()  # not finished until finalize
    finalize_split(tmp_path / "split")
    assert _files(tmp_path / "split") == expected


def test_resume_and_finalize_errors(family, tmp_path):
    recipe = _recipe(family, "ties_global")
    out = tmp_path / "out"
    merge(recipe, tmp_path / "single", EngineOptions(max_memory=6000))
    # Share 0 alone blocks at the first global stage until share 1 shows up; run both, then kill the
    # result of share 1 (a lost machine): finalize names the missing share.
    _run_shares(recipe, out, 2)
    lost = sorted((out / STAGING / SHARDS).glob("model-*"))[1]  # shard 1 belongs to share 1
    lost.unlink()
    with pytest.raises(OutputError) as err:
        finalize_split(out)
    assert "1 of " in err.value.message and "shares 1 of 2" in err.value.hint
    # Re-running share 1 alone recomputes nothing of the reduce stages (its stage files are there) and
    # writes only its missing shard; share 0 re-run resumes everything.
    again = _run_shares(recipe, out, 2, only=[1])[0]
    assert again.shards_written == 1 and again.shards_resumed >= 1
    assert _run_shares(recipe, out, 2, only=[0])[0].shards_written == 0
    # While a share holds the folder (a shared lock), neither finalize nor a plain run may start.
    plan = build_plan(recipe)
    held = join_output(out, plan)
    try:
        with pytest.raises(OutputError, match="another surgery process"):
            finalize_split(out)
        with pytest.raises(OutputError, match="another surgery process"):
            merge(recipe, out, EngineOptions(max_memory=6000))
    finally:
        os.close(held)
        plan.close()
    finalize_split(out)
    assert _files(out) == _files(tmp_path / "single")


def test_share_parsing_and_other_plans(family, tmp_path):
    assert Share.parse("0/4") == Share(0, 4) and Share.parse(" 3 / 4 ") == Share(3, 4)
    for bad in ("4/4", "1/0", "a/b", "1", "-1/3"):
        with pytest.raises(RecipeError):
            Share.parse(bad)
    out = tmp_path / "out"
    _run_shares(_recipe(family, "breadcrumbs"), out, 2)
    with pytest.raises(OutputError, match="different recipe"):
        _run_shares(_recipe(family, "ties_global"), out, 2, only=[0])
    with pytest.raises(OutputError, match="holds no split run"):
        finalize_split(tmp_path)
