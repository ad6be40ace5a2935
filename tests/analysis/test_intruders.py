"""Intruder dimensions (METHODS.md): W == W0 gives 0, a big random rank-1 spike gives exactly 1, counts
are monotone in eps and k, GPT-2 Conv1D orientation, the base-SVD cache, the mitigation, and the CLI.

Base matrices get a decaying spectrum (as trained weights have): with an i.i.d. Gaussian W0 the top
singular values are nearly degenerate and any perturbation mixes their vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.analysis.intruders import find_intruders, is_conv1d, mitigate_intruders
from surgery.errors import OutputError, RecipeError

LLAMA = "model.layers.{}.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny SVDs: OpenMP threads only add contention on a shared machine. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def decaying(rng: np.random.Generator, out: int, inn: int) -> np.ndarray:
    """U diag(s) V^T with s_i = 10 * 0.9^i (well-separated singular values)."""
    r = min(out, inn)
    u, _ = np.linalg.qr(rng.standard_normal((out, r)))
    v, _ = np.linalg.qr(rng.standard_normal((inn, r)))
    return (u * (10 * 0.9 ** np.arange(r))) @ v.T


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal(n)
    return x / np.linalg.norm(x)


def top_sv(w: np.ndarray) -> float:
    return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


def write(folder: Path, tensors: dict[str, np.ndarray], config: dict | None = None, dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    data = {n: torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(dtype) for n, t in tensors.items()}
    save_file(data, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "num_hidden_layers": 3}))
    return folder


@pytest.fixture
def spiked(tmp_path):
    """Base with 3 block matrices (+ embeddings, a norm); FT spikes layers 0 and 2 with 2x the top s."""
    rng = np.random.default_rng(0)
    base = {LLAMA.format(i): decaying(rng, 96, 64) for i in range(3)}
    base["model.embed_tokens.weight"] = rng.standard_normal((50, 64))
    base["model.layers.0.input_layernorm.weight"] = np.ones(64)
    ft = dict(base)
    for i in (0, 2):
        w = base[LLAMA.format(i)]
        ft[LLAMA.format(i)] = w + 2 * top_sv(w) * np.outer(unit(rng, 96), unit(rng, 64))
    ft["model.embed_tokens.weight"] = rng.standard_normal((50, 64))  # wholly new: never analysed
    return write(tmp_path / "base", base), write(tmp_path / "ft", ft), base


def test_identical_models_have_no_intruders(spiked):
    base, _, _ = spiked
    report = find_intruders(base, base)
    assert [m.name for m in report.matrices] == [LLAMA.format(i) for i in range(3)]  # no embeddings, norms
    assert report.total == 0
    assert set(report.curve().values()) == {0}
    assert all(c > 0.999 for m in report.matrices for c in m.max_cos)


def test_random_rank1_spike_is_exactly_one_intruder(spiked):
    base, ft, _ = spiked
    report = find_intruders(base, ft)
    counts = {m.name: m.count(0.5) for m in report.matrices}
    assert counts == {LLAMA.format(0): 1, LLAMA.format(1): 0, LLAMA.format(2): 1}
    for i in (0, 2):  # the spike is the largest singular direction
        assert report.matrices[i].intruders(0.5) == (0,)
    assert report.total == 2
    assert report.per_layer() == {"0": 1, "1": 0, "2": 1}
    assert report.to_dict()["total"] == 2


def test_counts_non_decreasing_in_eps_and_k(tmp_path):
    rng = np.random.default_rng(3)
    w0 = decaying(rng, 80, 60)
    w = w0 + 0.3 * rng.standard_normal(w0.shape) + 15 * np.outer(unit(rng, 80), unit(rng, 60))
    base = write(tmp_path / "b", {LLAMA.format(0): w0})
    ft = write(tmp_path / "f", {LLAMA.format(0): w})
    grid = tuple(np.round(np.linspace(0, 1, 21), 2))
    counts = {k: find_intruders(base, ft, k=k, eps_grid=grid) for k in (1, 2, 5, 10, 30, 60, 500)}
    for report in counts.values():
        curve = list(report.curve().values())
        assert curve == sorted(curve)
    for e in grid:
        by_k = [counts[k].count(e) for k in sorted(counts)]
        assert by_k == sorted(by_k)
    assert counts[500].count(1.0) >= 1 and counts[500].count(0.0) == 0
    assert len(counts[500].matrices[0].max_cos) == 60  # k is capped by the rank


def test_gpt2_conv1d_orientation(tmp_path):
    """Weights stored [in, out]: the left singular vectors that matter live in the OUT space."""
    rng = np.random.default_rng(5)
    n_in, n_out = 48, 144
    lin = {"attn.c_attn": decaying(rng, n_out, n_in), "mlp.c_fc": decaying(rng, n_out, n_in)}
    ft = {}
    # Directions of W0's SMALLEST singular value, so that the spike does not add to an existing top one.
    # c_attn: out-direction = a left vector of W0, in-direction spread over all of W0's right vectors.
    u0, s0, v0t = np.linalg.svd(lin["attn.c_attn"], full_matrices=False)
    spread_in = v0t.T @ np.ones(n_in) / np.sqrt(n_in)
    ft["attn.c_attn"] = lin["attn.c_attn"] + 2 * s0[0] * np.outer(u0[:, -1], spread_in)
    # c_fc: out-direction spread over W0's left vectors, in-direction = a right vector of W0.
    u0, s0, v0t = np.linalg.svd(lin["mlp.c_fc"], full_matrices=False)
    spread_out = u0 @ np.ones(n_in) / np.sqrt(n_in)
    ft["mlp.c_fc"] = lin["mlp.c_fc"] + 2 * s0[0] * np.outer(spread_out, v0t[-1])
    name = "transformer.h.0.{}.weight".format
    gpt2 = {"model_type": "gpt2", "n_layer": 1}
    base = write(tmp_path / "b", {name(k): w.T for k, w in lin.items()}, gpt2)  # Conv1D: [in, out]
    ft_dir = write(tmp_path / "f", {name(k): w.T for k, w in ft.items()}, gpt2)

    report = find_intruders(base, ft_dir)
    assert {m.name: (m.count(0.5), m.transposed, m.shape) for m in report.matrices} == {
        name("attn.c_attn"): (0, True, (n_out, n_in)),
        name("mlp.c_fc"): (1, True, (n_out, n_in)),
    }
    wrong = find_intruders(base, ft_dir, conv1d=False)  # as if they were Linear weights
    assert {m.name: m.count(0.5) for m in wrong.matrices} == {name("attn.c_attn"): 1, name("mlp.c_fc"): 0}

    assert is_conv1d(name("attn.c_attn"), None)  # GPT-2 names without a config
    assert not is_conv1d(name("attn.c_attn"), {"model_type": "gpt_bigcode"})  # same names, Linear
    assert not is_conv1d(LLAMA.format(0), {"model_type": "gpt2"})

    out = mitigate_intruders(base, ft_dir, tmp_path / "out", 0.0)
    assert out.modified == (name("mlp.c_fc"),)
    fixed = load_file(str(tmp_path / "out" / "model.safetensors"))[name("mlp.c_fc")].numpy()
    assert fixed.shape == (n_in, n_out)  # written back in the stored orientation
    assert top_sv(fixed) == pytest.approx(top_sv(lin["mlp.c_fc"]), rel=0.02)


def test_base_svd_cache(spiked, tmp_path):
    base, ft, _ = spiked
    cache = tmp_path / "cache"
    first = find_intruders(base, ft, cache_dir=cache)
    files = sorted(cache.glob("*.npz"))
    assert first.cache_hits == 0 and len(files) == 3
    second = find_intruders(base, ft, cache_dir=cache)
    assert second.cache_hits == 3 and sorted(cache.glob("*.npz")) == files
    assert [m.max_cos for m in second.matrices] == [m.max_cos for m in first.matrices]
    assert second.total == first.total
    # another fine-tune of the same base reuses the entries
    assert find_intruders(base, base, cache_dir=cache).cache_hits == 3
    # a damaged entry is recomputed and repaired, not trusted
    files[0].write_bytes(b"not a zip")
    third = find_intruders(base, ft, cache_dir=cache)
    assert third.cache_hits == 2 and third.total == first.total
    assert find_intruders(base, ft, cache_dir=cache).cache_hits == 3
    assert not list(cache.glob(".*tmp"))  # no staging leftovers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mitigation(spiked, tmp_path, dtype):
    _, _, base_tensors = spiked
    rng = np.random.default_rng(11)
    ft_tensors = dict(base_tensors)
    w0 = base_tensors[LLAMA.format(1)]
    ft_tensors[LLAMA.format(1)] = w0 + 2 * top_sv(w0) * np.outer(unit(rng, 96), unit(rng, 64))
    ft_tensors[LLAMA.format(2)] = base_tensors[LLAMA.format(2)] + 0.01 * rng.standard_normal((96, 64))
    base = write(tmp_path / "b", base_tensors, dtype=dtype)
    ft = write(tmp_path / "f", ft_tensors, dtype=dtype)
    (ft / "tokenizer.json").write_text("{}")
    original = load_file(str(ft / "model.safetensors"))

    same = mitigate_intruders(base, ft, tmp_path / "lam1", 1.0)
    assert same.total == 1 and same.modified == ()
    kept = load_file(str(tmp_path / "lam1" / "model.safetensors"))
    assert all(torch.equal(kept[n], original[n]) for n in original)
    assert (tmp_path / "lam1" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "lam1" / "config.json").read_bytes() == (ft / "config.json").read_bytes()
    record = json.loads((tmp_path / "lam1" / "surgery_intruders.json").read_text())
    assert record["lambda"] == 1.0 and record["total"] == 1
    assert not (tmp_path / "lam1" / ".surgery-partial").exists()

    removed = mitigate_intruders(base, ft, tmp_path / "lam0", 0.0)
    assert removed.modified == (LLAMA.format(1),)
    out = load_file(str(tmp_path / "lam0" / "model.safetensors"))
    assert out[LLAMA.format(1)].dtype == dtype
    assert top_sv(out[LLAMA.format(1)].float().numpy()) == pytest.approx(top_sv(w0), rel=0.02)
    assert top_sv(original[LLAMA.format(1)].float().numpy()) > 1.9 * top_sv(w0)
    assert all(torch.equal(out[n], original[n]) for n in original if n != LLAMA.format(1))
    assert find_intruders(base, tmp_path / "lam0").total == 0


def test_mitigation_output_safety(spiked, tmp_path):
    base, ft, _ = spiked
    with pytest.raises(OutputError, match="overlaps input"):
        mitigate_intruders(base, ft, ft / "inside", 0.0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="is not empty"):
        mitigate_intruders(base, ft, tmp_path / "busy", 0.0)
    # --overwrite replaces only a previous surgery output, never files surgery did not write
    with pytest.raises(OutputError, match=r"holds files surgery did not write \(keep.txt\)"):
        mitigate_intruders(base, ft, tmp_path / "busy", 0.0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    mitigate_intruders(base, ft, tmp_path / "out", 0.5)
    mitigate_intruders(base, ft, tmp_path / "out", 0.0, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "surgery_intruders.json").read_text())["lambda"] == 0.0


def test_selection_errors(spiked):
    base, ft, _ = spiked
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        find_intruders(base, ft, include="(")
    with pytest.raises(RecipeError, match="no 2-D weight matching --include 'nothing'"):
        find_intruders(base, ft, include="nothing")
    with pytest.raises(RecipeError, match=r"eps must lie in \[0, 1\]"):
        find_intruders(base, ft, eps=2.0)
    report = find_intruders(base, ft, include="embed_tokens|layers.0.mlp")  # embeddings on request
    assert [m.name for m in report.matrices] == ["model.embed_tokens.weight", LLAMA.format(0)]


# -- CLI -------------------------------------------------------------------------------------------
@pytest.fixture
def run_cli():
    from surgery_cli.analysis import intruders, stats
    from surgery_cli.main import SurgeryGroup

    @click.group(cls=SurgeryGroup)
    def group() -> None:
        pass

    group.add_command(intruders)
    group.add_command(stats)
    runner = CliRunner()
    return lambda *args: runner.invoke(group, [str(a) for a in args])


def test_cli_intruders(spiked, tmp_path, run_cli):
    base, ft, _ = spiked
    cache = tmp_path / "cache"
    res = run_cli("intruders", base, ft, base, "--cache-dir", cache, "--plot", tmp_path / "p.png", "-q")
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()]
    assert ["layer", "matrices", "ft", "base"] in rows and ["total", "3", "2", "0"] in rows
    assert ["0", "1", "1", "0"] in rows and ["2", "1", "1", "0"] in rows
    assert "base SVDs from the cache: 3 of 6" in res.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    res = run_cli("intruders", base, ft, "--cache-dir", cache, "--json", "-q", "--eps", "0.3")
    data = json.loads(res.stdout)
    assert data["total"] == 2 and data["eps"] == 0.3 and data["cache_hits"] == 3
    assert [m["count"] for m in data["matrices"]] == [1, 0, 1]

    res = run_cli("intruders", base, ft, "--no-cache", "--mitigate", "0", "-o", tmp_path / "m", "-q")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_intruders_errors(spiked, tmp_path, run_cli):
    base, ft, _ = spiked
    res = run_cli("intruders", base, ft, "--mitigate", "0.5", "--no-cache")
    assert res.exit_code == 1
    assert res.stderr.startswith("error: --mitigate LAMBDA and -o OUT go together")
    res = run_cli("intruders", base, ft, "--include", "(", "--no-cache")
    assert res.exit_code == 1 and "is not a valid regular expression" in res.stderr
    res = run_cli("intruders", base, tmp_path / "nope", "--no-cache")
    assert res.exit_code == 1 and res.stderr.startswith("error: checkpoint not found")
