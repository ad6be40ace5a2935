"""Diff statistics against numpy computed independently (whole tensors, float64, concatenation for
layers), on tiny checkpoints written with safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from ckpt_factory import load_f32, make_family
from click.testing import CliRunner
from safetensors.torch import save_file

from surgery.analysis.stats import diff_stats, effective_rank
from surgery.errors import RecipeError

SHAPES = {
    "model.embed_tokens.weight": (20, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 16),
    "model.norm.weight": (8,),
    "lm_head.weight": (20, 8),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def trio(tmp_path):
    """Base + 3 fine-tunes with exact zeros, correlated updates and a low-rank update (float32)."""
    rng = np.random.default_rng(7)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    folders = [tmp_path / "base", tmp_path / "ft_a", tmp_path / "ft_b", tmp_path / "ft_c"]
    taus = {}
    for n, s in SHAPES.items():
        a = 0.05 * rng.standard_normal(s) * (rng.random(s) > 0.3)  # ~30% exact zeros
        b = (0.5 * a + 0.03 * rng.standard_normal(s)) * (rng.random(s) > 0.5)
        c = np.outer(rng.standard_normal(s[0]), rng.standard_normal(s[1])) * 0.01 if len(s) == 2 else 0 * a
        taus[n] = [a, b, c]
    for i, folder in enumerate(folders):
        folder.mkdir()
        tensors = {n: base[n] + (taus[n][i - 1] if i else 0) for n in SHAPES}
        tensors = {n: torch.from_numpy(np.asarray(t, np.float32)) for n, t in tensors.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return folders[0], folders[1:]


def reference(base: Path, models: list[Path], names: list[str]) -> dict:
    """Numpy statistics of the concatenation of ``names`` (one tensor, a layer, or everything)."""
    b = load_f32(base)
    fts = [load_f32(m) for m in models]
    w0 = np.concatenate([b[n].astype(np.float64).ravel() for n in names])
    taus = [np.concatenate([(f[n] - b[n]).astype(np.float64).ravel() for n in names]) for f in fts]
    out = {
        "norm": [np.linalg.norm(t) for t in taus],
        "relative_norm": [np.linalg.norm(t) / np.linalg.norm(w0) for t in taus],
        "sparsity": [np.mean(t == 0) for t in taus],
        "cosine": [],
        "sign_conflicts": [],
        "both_nonzero": [],
    }
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            ti, tj = taus[i], taus[j]
            den = np.linalg.norm(ti) * np.linalg.norm(tj)
            out["cosine"].append(ti @ tj / den if den else None)
            out["sign_conflicts"].append(int(np.sum((ti > 0) & (tj < 0)) + np.sum((ti < 0) & (tj > 0))))
            out["both_nonzero"].append(int(np.sum((ti != 0) & (tj != 0))))
    return out


def erank_numpy(tau: np.ndarray) -> float:
    s = np.linalg.svd(tau.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def check(stats, ref: dict, pairs) -> None:
    assert stats.norms == pytest.approx(ref["norm"], rel=1e-6)
    assert stats.relative_norms == pytest.approx(ref["relative_norm"], rel=1e-6)
    assert stats.sparsity == pytest.approx(ref["sparsity"], abs=0)
    got = stats.cosines(pairs)
    assert [g is None for g in got] == [r is None for r in ref["cosine"]]
    assert [g for g in got if g is not None] == pytest.approx(
        [r for r in ref["cosine"] if r is not None], rel=1e-6
    )
    assert list(stats.conflicts) == ref["sign_conflicts"]
    assert list(stats.both_nonzero) == ref["both_nonzero"]
    assert stats.conflict_rates == pytest.approx([c / stats.numel for c in ref["sign_conflicts"]])


def test_against_numpy(trio):
    base, models = trio
    report = diff_stats(base, models)
    names = [t.label for t in report.tensors]
    assert sorted(names) == sorted(SHAPES)
    assert report.pairs == ((0, 1), (0, 2), (1, 2))
    b, fts = load_f32(base), [load_f32(m) for m in models]
    for t in report.tensors:
        check(t, reference(base, models, [t.label]), report.pairs)
        for m, f in enumerate(fts):
            tau = f[t.label] - b[t.label]
            if tau.ndim == 2 and np.any(tau):
                assert t.effective_ranks[m] == pytest.approx(erank_numpy(tau), rel=1e-4)
            else:
                assert t.effective_ranks[m] is None
    # the rank-1 update has effective rank ~1, the noisy ones much more
    q = next(t for t in report.tensors if t.label == "model.layers.0.mlp.up_proj.weight")
    assert q.effective_ranks[2] == pytest.approx(1.0, abs=1e-3) and q.effective_ranks[0] > 4

    layers = {s.label: s for s in report.layers}
    assert list(layers) == ["before", "0", "1", "after"]
    for label, layer in layers.items():
        members = [t.label for t in report.tensors if t.layer == label]
        check(layer, reference(base, models, members), report.pairs)
        ranks = [t.effective_ranks[0] for t in report.tensors if t.layer == label and len(t.shape) == 2]
        assert layer.effective_ranks[0] == pytest.approx(np.mean(ranks))
    check(report.overall, reference(base, models, names), report.pairs)
    assert report.overall.tensors == len(SHAPES)


def test_chunked_equals_whole(trio):
    base, models = trio
    whole = diff_stats(base, models, effective_ranks=False)
    tiny = diff_stats(base, models, effective_ranks=False, chunk_elements=7)
    for a, b in zip(whole.tensors, tiny.tensors, strict=True):
        counts = lambda s: (s.zeros, s.conflicts, s.both_nonzero, s.numel)  # noqa: E731
        assert counts(a) == counts(b)
        assert a.sq == pytest.approx(b.sq, rel=1e-12) and a.dots == pytest.approx(b.dots, rel=1e-9, abs=1e-15)
        assert a.base_sq == pytest.approx(b.base_sq, rel=1e-12)
        assert a.effective_ranks == (None, None, None)


def test_bf16_family(tmp_path):
    """BF16 storage is decoded exactly: the same numbers as numpy on the float32 upcast."""
    base, models = make_family(tmp_path, n_models=2, dtype="BF16")
    report = diff_stats(base, models, include=r"layers\.")
    assert all(".layers." in t.label for t in report.tensors)
    for t in report.tensors:
        check(t, reference(base, models, [t.label]), report.pairs)
    assert report.skipped == ()


def test_single_model_and_skips(trio, tmp_path):
    base, models = trio
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = {n: torch.zeros(s) for n, s in SHAPES.items() if n != "model.norm.weight"}
    tensors["lm_head.weight"] = torch.zeros(21, 8)  # resized vocabulary
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(odd / "model.safetensors"))
    report = diff_stats(base, [odd], effective_ranks=False)
    assert report.pairs == () and report.overall.dots == ()
    reasons = dict(report.skipped)
    assert set(reasons) == {"model.norm.weight", "lm_head.weight", "model.extra.weight"}
    assert reasons["model.extra.weight"] == "not in the base"
    assert "missing in" in reasons["model.norm.weight"] and "shape [21, 8]" in reasons["lm_head.weight"]
    assert report.overall.sparsity == (0.0,)
    assert report.overall.relative_norms[0] == pytest.approx(1.0)  # tau = -W0
    json.dumps(report.to_dict())  # serialisable
    with pytest.raises(RecipeError, match="no float tensor is shared"):
        diff_stats(base, models, include="nothing_matches")


def test_effective_rank_formula():
    assert effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(np.ones(5)) == pytest.approx(5.0)
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(np.zeros(3)) is None


def test_cli_stats(trio, tmp_path):
    from surgery_cli.analysis import stats
    from surgery_cli.main import SurgeryGroup

    @click.group(cls=SurgeryGroup)
    def group() -> None:
        pass

    group.add_command(stats)
    base, models = trio
    runner = CliRunner()
    args = ["stats", str(base), *map(str, models), "-q"]
    res = runner.invoke(group, [*args, "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    titles = ("relative norm", "sparsity", "effective rank", "cosine of task vectors", "sign-conflict rate")
    assert all(title in res.stdout for title in titles)
    assert "ft_a~ft_b" in res.stdout
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(runner.invoke(group, [*args, "--json", "--no-rank"]).stdout)
    ref = reference(base, list(models), [t["label"] for t in data["tensors"]])
    assert data["overall"]["cosine"] == pytest.approx(ref["cosine"], rel=1e-6)  # no None overall
    assert data["overall"]["effective_rank"] == [None, None, None]
    res = runner.invoke(group, [*args, "--tensors", "--no-rank"])
    assert "model.layers.1.mlp.down_proj.weight" in res.stdout
    res = runner.invoke(group, ["stats", str(base), str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.stderr.startswith("error: checkpoint not found")
