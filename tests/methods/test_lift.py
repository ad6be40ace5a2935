"""LIFT principal weights (arXiv 2506.00772) as a patch selector: per block matrix, the top density of
|W_r| (W_r the base's rank-r approximation), ties by lower index, holding the fine-tune's diff."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ckpt_factory import INT_NAME, load_f32, load_raw, make_family, rank_band_mask, round_to
from click.testing import CliRunner
from surgery_cli.main import cli

from surgery.engine import EngineOptions, merge
from surgery.methods.lift import lift_key
from surgery.names import place
from surgery.recipe import make_recipe

DENSITY, RANK = 0.2, 3


def surgery(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "-q"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def pair(tmp_path):
    base, (ft,) = make_family(tmp_path / "in", n_models=1, dtype="BF16")
    return base, ft, tmp_path


def block_matrices(b):
    return [n for n, t in b.items() if n != INT_NAME and t.ndim == 2 and place(n).block is not None]


def reference_positions(w: np.ndarray, k: int) -> np.ndarray:
    """Top-k of |W_r| with W_r from a float64 numpy SVD (ties by lower index)."""
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    key = np.abs((u[:, :RANK] * s[:RANK]) @ vh[:RANK])
    return np.flatnonzero(rank_band_mask(key, 0, k)), key


def test_patch_positions_and_values(pair):
    base, ft, tmp = pair
    surgery("diff", base, ft, "--lift-rank", RANK, "--density", DENSITY, "-o", tmp / "p")
    patch = load_raw(tmp / "p")
    b, f = load_f32(base), load_f32(ft)
    matrices = block_matrices(b)
    assert {n.rsplit(".", 1)[0] for n in patch} == set(matrices)  # no vectors, nothing outside the blocks
    for name in matrices:
        idx, val = patch[name + ".indices"].numpy(), patch[name + ".values"].numpy()
        k = math.floor(DENSITY * b[name].size)
        assert idx.size == k and np.all(np.diff(idx) > 0)
        tau = (f[name] - b[name]).reshape(-1)
        np.testing.assert_array_equal(val, tau[idx])
        # exact given the key the engine used: ranks by a full stable sort
        key = lift_key(b[name], {"lift_rank": RANK})
        np.testing.assert_array_equal(idx, np.flatnonzero(rank_band_mask(key, 0, k)))
        # against a float64 SVD: every selected |W_r| is at least every unselected one, up to float32
        # rounding of the factorisation (1e-5 of the largest |W_r|)
        want, ref_key = reference_positions(b[name], k)
        flat = ref_key.reshape(-1)
        chosen = np.zeros(flat.size, bool)
        chosen[idx] = True
        assert flat[chosen].min() >= flat[~chosen].max() - 1e-5 * flat.max()
        assert len(set(want) & set(idx)) >= k - 1
    manifest = (tmp / "p" / "surgery_diff.json").read_text()
    assert '"method": "lift_patch"' in manifest and '"lift_rank": 3' in manifest


def test_graft_formula_and_patch_equivalence(pair):
    base, ft, tmp = pair
    surgery("graft", base, ft, "--density", DENSITY, "--lift-rank", RANK, "-o", tmp / "g")
    surgery("graft", base, ft, "--density", DENSITY, "--lift-rank", RANK, "--patch", "-o", tmp / "gp")
    surgery("diff", base, ft, "--lift-rank", RANK, "--density", DENSITY, "-o", tmp / "p")
    assert (tmp / "gp" / "model.safetensors").read_bytes() == (tmp / "p" / "model.safetensors").read_bytes()
    b, f = load_f32(base), load_f32(ft)
    got = load_raw(tmp / "g")
    patch = load_raw(tmp / "p")
    for name, w in b.items():
        if name == INT_NAME:
            continue
        mask = np.zeros(w.size, bool)
        if name + ".indices" in patch:
            mask[patch[name + ".indices"].numpy()] = True
        tau = (f[name] - w).reshape(-1)
        want = round_to(
            (w.reshape(-1) + np.float32(1.0) * np.where(mask, tau, np.float32(0))).reshape(w.shape), "BF16"
        )
        assert torch.equal(got[name], want), name
    surgery("apply", tmp / "p", "--to", base, "-o", tmp / "a")
    applied = load_raw(tmp / "a")
    assert all(torch.equal(applied[n], got[n]) for n in got)


@pytest.mark.parametrize("method", ["lift_patch", "lift_graft"])
def test_streamed_equals_whole(pair, method):
    base, ft, tmp = pair
    recipe = make_recipe(method, [str(ft)], str(base), {"density": 0.3, "lift_rank": 2})
    merge(recipe, tmp / "whole", EngineOptions(max_memory=2**30, threads=1))
    merge(recipe, tmp / "tiny", EngineOptions(max_memory=300, threads=3))
    assert (tmp / "whole" / "model.safetensors").read_bytes() == (
        tmp / "tiny" / "model.safetensors"
    ).read_bytes()


def test_flag_errors(pair):
    base, ft, tmp = pair
    res = CliRunner().invoke(cli, ["diff", str(base), str(ft), "--lift-rank", "0", "-o", str(tmp / "x")])
    assert res.exit_code == 1 and "error: lift_patch: lift_rank must be at least 1, not 0" in res.output
    res = CliRunner().invoke(
        cli, ["diff", str(base), str(ft), "--lift-rank", "2", "--breadcrumbs", "-o", str(tmp / "x")]
    )
    assert res.exit_code == 1 and "choose one of --density, --breadcrumbs, --graft, --lift-rank" in res.output
    assert not (tmp / "x").exists()


def test_stats_overlap_with_the_finetunes_top_diff(pair):
    from surgery.analysis.stats import diff_stats

    base, ft, tmp = pair
    _, (ft2,) = make_family(tmp / "in2", n_models=1, dtype="BF16", seed=0, update=0.3)
    report = diff_stats(base, [ft, ft2], effective_ranks=False, lift_rank=RANK, lift_density=DENSITY)
    b = load_f32(base)
    fts = [load_f32(ft), load_f32(ft2)]
    matrices = block_matrices(b)
    assert set(report.lift.per_tensor) == set(matrices)
    layers: dict[str, list[int]] = {}
    for name in matrices:
        k = math.floor(DENSITY * b[name].size)
        lift = rank_band_mask(lift_key(b[name], {"lift_rank": RANK}), 0, k)
        shared = [int((rank_band_mask(f[name] - b[name], 0, k) & lift).sum()) for f in fts]
        assert report.lift.per_tensor[name] == (k, *shared)
        acc = layers.setdefault(str(place(name).block), [0, 0, 0])
        for i, v in enumerate((k, *shared)):
            acc[i] += v
    assert {k: list(v) for k, v in report.lift.layers.items()} == layers
    data = report.to_dict()["lift_overlap"]
    assert data["overall"]["selected"] == sum(v[0] for v in layers.values())
    res = CliRunner().invoke(cli, ["stats", str(base), str(ft), "--no-rank", "-q", "--lift-rank", str(RANK),
                                   "--lift-density", str(DENSITY)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "overlap of the top 0.2 |tau| with LIFT positions (rank 3); independent positions: 20.00%"
        in res.output
    )


def test_lines_auto_alpha_runs_on_the_keyed_selection(pair):
    # LiNeS' auto alpha measures the merged update, so it must see the LIFT selection too
    base, ft, tmp = pair
    recipe = make_recipe(
        "lift_graft", [str(ft)], str(base), {"density": 0.3, "lift_rank": 2}, lines={"alpha": "auto"}
    )
    result = merge(recipe, tmp / "out", EngineOptions(threads=2))
    # alpha = ||tau||_1 / ||tau_merged||_1 over the region (the blocks), tau_merged = tau at LIFT positions
    surgery("diff", base, ft, "--lift-rank", 2, "--density", 0.3, "-o", tmp / "p")
    b, f = load_f32(base), load_f32(ft)
    total = sum(
        np.abs(f[n] - b[n]).astype(np.float64).sum()
        for n in b
        if n != INT_NAME and place(n).block is not None
    )
    kept = sum(
        np.abs(v.numpy()).astype(np.float64).sum()
        for n, v in load_raw(tmp / "p").items()
        if n.endswith(".values")
    )
    assert result.lines.alpha == pytest.approx(total / kept, rel=1e-6)
