"""Issue 10, item 10: a floor on --max-memory, and a --dry-run estimate from passes, bytes and chunks."""

from __future__ import annotations

import json

import pytest
from cli_checks import assert_fails

from surgery.plan import estimate_seconds


@pytest.mark.parametrize("budget", ["0", "1KiB", "4095"])
def test_budget_below_the_floor(invoke, make_family, tmp_path, budget):
    base, (ft1, ft2) = make_family()
    result = invoke("merge", ft1, ft2, "--base", base, "-o", tmp_path / "out", "--max-memory", budget)
    assert_fails(result, f"--max-memory {budget} is below the floor of 4KiB", hint="give the working buffers")
    assert not (tmp_path / "out").exists()


def _dry(invoke, fam, tmp_path, *extra):
    base, (ft1, ft2) = fam
    result = invoke("merge", ft1, ft2, "--base", base, "-o", tmp_path / "out", "--dry-run", *extra)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    return json.loads(result.stdout)


def test_dry_run_estimate_follows_passes_and_chunks(invoke, make_family, tmp_path):
    fam = make_family(shapes={"model.layers.0.w": (512, 512), "model.layers.1.w": (512, 512)})
    plain = _dry(invoke, fam, tmp_path, "--threads", "1")
    crumbs = _dry(invoke, fam, tmp_path, "--threads", "1", "--breadcrumbs")
    tiny = _dry(invoke, fam, tmp_path, "--threads", "1", "--max-memory", "4KiB")
    assert plain["passes_over_inputs"] == 1 and crumbs["passes_over_inputs"] == 3
    assert plain["estimated_seconds"] > 0
    assert crumbs["estimated_seconds"] > plain["estimated_seconds"]
    assert tiny["chunks"] > plain["chunks"] == plain["tensors"]  # 2GiB: one chunk per tensor
    assert tiny["estimated_seconds"] > plain["estimated_seconds"]
    lines = _dry(invoke, fam, tmp_path, "--threads", "1", "--lines")
    assert lines["passes_over_inputs"] == 2  # auto alpha measures the merged update first


def test_estimate_formula():
    """1 GB read cold + 2 later passes from the page cache (3 GB/s) + 0.3 GB written + 1000 chunks."""
    gb = 10**9
    expect = 1.0 + 1.0 + 2 * 1 / 3 + 1.0 + 3 * 1000 * 40e-6
    assert estimate_seconds(gb, 3 * gb // 10, 3, 1000, 1) == pytest.approx(expect, abs=0.01)
