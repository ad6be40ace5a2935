"""Half reset (HFT, Hui et al. 2024): per block exactly floor(fraction * n) matrices or elements take the
base's bits, the rest the fine-tune's; the permutation is checked against a scalar re-implementation,
the update-size rule against norms computed here, and streamed output equals whole-tensor output."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from ckpt_factory import INT_NAME, load_raw, make_family
from click.testing import CliRunner
from surgery_cli.main import cli

from surgery.engine import EngineOptions, merge
from surgery.names import natural_key, place
from surgery.recipe import make_recipe

# 5 matrices and a norm per block: floor(0.5 * 5) = 2 exercises the floor
SHAPES = {"model.embed_tokens.weight": (20, 8), "model.norm.weight": (8,), "lm_head.weight": (20, 8)}
for _b in range(3):
    for _m, _s in (("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)), ("self_attn.o_proj", (8, 8)),
                   ("mlp.up_proj", (12, 8)), ("mlp.down_proj", (8, 12))):  # fmt: skip
        SHAPES[f"model.layers.{_b}.{_m}.weight"] = _s
    SHAPES[f"model.layers.{_b}.input_layernorm.weight"] = (8,)


@pytest.fixture
def pair(tmp_path):
    base, (ft,) = make_family(tmp_path / "in", n_models=1, dtype="BF16", shapes=SHAPES, update=0.2)
    return base, ft, tmp_path


def blocks():
    out: dict[int, list[str]] = {}
    for name in sorted(SHAPES, key=natural_key):
        if place(name).block is not None and len(SHAPES[name]) == 2:
            out.setdefault(place(name).block, []).append(name)
    return out


def scalar_pi(x: int, n: int, seed: int, block: int) -> int:
    """The permutation, written with Python integers one element at a time."""
    key = int.from_bytes(
        hashlib.blake2b(f"half_reset\0{seed}\0{block}".encode(), digest_size=8).digest(), "little"
    )
    if n <= 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, m64 = (1 << half) - 1, (1 << 64) - 1

    def f(v, r):
        z = (v + (key + 0x9E3779B97F4A7C15 * (r + 1))) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return (z ^ (z >> 31)) & mask

    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ f(right, r)
        x = (left << half) | right
        if x < n:
            return x


def run(base, ft, out, **params):
    full = {"fraction": 0.5, "by": "matrix", "select": "random", "seed": 0} | params
    merge(make_recipe("half_reset", [str(ft)], str(base), full), out, EngineOptions(threads=2))
    return load_raw(out)


def test_matrix_random_exact_counts_and_permutation(pair):
    base, ft, tmp = pair
    b, f = load_raw(base), load_raw(ft)
    for fraction, seed in ((0.5, 0), (0.5, 7), (0.3, 3), (0.8, 1)):
        got = run(base, ft, tmp / f"out{fraction}{seed}", fraction=fraction, seed=seed)
        for block, members in blocks().items():
            k = math.floor(fraction * len(members) + 1e-9)
            want = {m for j, m in enumerate(members) if scalar_pi(j, len(members), seed, block) < k}
            reset = {m for m in members if torch.equal(got[m], b[m])}
            assert reset == want and len(reset) == k
            assert all(torch.equal(got[m], f[m]) for m in members if m not in want)
        for name in SHAPES:  # vectors and non-block tensors keep the fine-tune
            if name not in sum(blocks().values(), []):
                assert torch.equal(got[name], f[name]), name
        assert torch.equal(got[INT_NAME], f[INT_NAME])
    # the seed matters, and the same seed gives the same bytes
    runs = {s: run(base, ft, tmp / f"s{s}", seed=s) for s in (0, 1, 2)}
    assert any(not torch.equal(runs[0][m], runs[s][m]) for s in (1, 2) for m in SHAPES)
    again = run(base, ft, tmp / "again", seed=0)
    assert all(torch.equal(again[n], runs[0][n]) for n in again)


def test_element_random_exact_counts(pair):
    base, ft, tmp = pair
    b, f = load_raw(base), load_raw(ft)
    got = run(base, ft, tmp / "out", by="element", fraction=0.5, seed=4)
    for block, members in blocks().items():
        n = sum(math.prod(SHAPES[m]) for m in members)
        k = n // 2
        offset, total = 0, 0
        for m in members:
            size = math.prod(SHAPES[m])
            mask = np.array([scalar_pi(offset + i, n, 4, block) < k for i in range(size)])
            total += int(mask.sum())
            want = torch.where(torch.from_numpy(mask).reshape(SHAPES[m]), b[m], f[m])
            assert torch.equal(got[m], want), m
            offset += size
        assert total == k


def test_fraction_zero_is_finetune_and_one_is_base_in_blocks(pair):
    base, ft, tmp = pair
    b, f = load_raw(base), load_raw(ft)
    matrices = set(sum(blocks().values(), []))
    for by in ("matrix", "element"):
        zero = run(base, ft, tmp / f"zero{by}", fraction=0.0, by=by)
        assert all(torch.equal(zero[n], f[n]) for n in f)
        one = run(base, ft, tmp / f"one{by}", fraction=1.0, by=by)
        assert all(torch.equal(one[n], b[n] if n in matrices else f[n]) for n in f)


@pytest.mark.parametrize("select", ["smallest-update", "largest-update"])
def test_select_by_relative_update(pair, select):
    base, ft, tmp = pair
    b, f = load_raw(base), load_raw(ft)
    got = run(base, ft, tmp / "out", select=select, fraction=0.6)
    for members in blocks().values():
        rel = {m: float(np.linalg.norm((f[m].double() - b[m].double()).numpy()) /
                        np.linalg.norm(b[m].double().numpy())) for m in members}  # fmt: skip
        order = sorted(members, key=lambda m: rel[m], reverse=select == "largest-update")
        want = set(order[:3])  # floor(0.6 * 5)
        assert {m for m in members if torch.equal(got[m], b[m])} == want


@pytest.mark.parametrize("params", [{"by": "element", "seed": 5}, {"select": "smallest-update"}], ids=str)
def test_streamed_equals_whole(pair, params):
    base, ft, tmp = pair
    recipe = make_recipe("half_reset", [str(ft)], str(base), params)
    merge(recipe, tmp / "whole", EngineOptions(max_memory=2**30, threads=1))
    merge(recipe, tmp / "tiny", EngineOptions(max_memory=300, threads=3))
    assert (tmp / "whole" / "model.safetensors").read_bytes() == (
        tmp / "tiny" / "model.safetensors"
    ).read_bytes()


def test_cli_records_recipe_and_card(pair):
    base, ft, tmp = pair
    res = CliRunner().invoke(cli, ["reset", str(base), str(ft), "--fraction", "0.4", "--seed", "3",
                                   "-o", str(tmp / "out"), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    recipe = (tmp / "out" / "surgery_recipe.yaml").read_text()
    assert "method: half_reset" in recipe and "fraction: 0.4" in recipe and "seed: 3" in recipe
    card = (tmp / "out" / "README.md").read_text()
    assert "Half reset" in card and "fraction" in card
    res = CliRunner().invoke(cli, ["reset", str(base), str(ft), "--seed", "1", "--select", "smallest-update",
                                   "-o", str(tmp / "x")])  # fmt: skip
    assert res.exit_code == 1 and "error: choose --seed" in res.output
    res = CliRunner().invoke(cli, ["reset", str(base), str(ft), "--fraction", "1.5", "-o", str(tmp / "x")])
    assert res.exit_code == 1 and "error: half_reset: fraction = 1.5 is outside [0, 1]" in res.output
    assert not (tmp / "x").exists()


def tied_pair(root):
    """Base entries +-1, +-2 and relative updates in {0.25, 0.5, 0.75, 1}: exact in bf16, so many
    elements share one relative update and the k-th falls inside a tie group spanning matrices."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    folders = []
    for name in ("base", "ft"):
        (root / name).mkdir(parents=True)
        folders.append(root / name)
    tensors_b, tensors_f = {}, {}
    for n, shape in SHAPES.items():
        b = torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, shape, generator=g)]
        d = torch.tensor([0.25, 0.5, 0.75, 1.0])[torch.randint(0, 4, shape, generator=g)]
        tensors_b[n], tensors_f[n] = b.bfloat16(), (b * (1 + d)).bfloat16()
    save_file(tensors_b, str(folders[0] / "model.safetensors"))
    save_file(tensors_f, str(folders[1] / "model.safetensors"))
    return folders


@pytest.mark.parametrize("select", ["smallest-update", "largest-update"])
def test_element_select_by_relative_update(tmp_path, select):
    base, ft = tied_pair(tmp_path / "in")
    b, f = load_raw(base), load_raw(ft)
    got = run(base, ft, tmp_path / "out", by="element", select=select, fraction=0.3)
    for members in blocks().values():
        keys = np.concatenate([(np.abs(f[m].float().numpy() - b[m].float().numpy()) /
                                np.abs(b[m].float().numpy())).reshape(-1) for m in members])  # fmt: skip
        k = math.floor(0.3 * keys.size)
        order = np.lexsort((np.arange(keys.size), keys if select == "smallest-update" else -keys))
        assert keys[order[k - 1]] == keys[order[k]]  # the cut falls inside a tie group
        reset = np.zeros(keys.size, bool)
        reset[order[:k]] = True
        offset = 0
        for m in members:
            size = math.prod(SHAPES[m])
            mask = torch.from_numpy(reset[offset : offset + size].reshape(SHAPES[m]))
            assert torch.equal(got[m], torch.where(mask, b[m], f[m])), m
            offset += size
    recipe = make_recipe("half_reset", [str(ft)], str(base), {"by": "element", "select": select})
    merge(recipe, tmp_path / "whole", EngineOptions(max_memory=2**30, threads=1))
    merge(recipe, tmp_path / "tiny", EngineOptions(max_memory=300, threads=3))
    whole, tiny = (tmp_path / "whole" / "model.safetensors"), (tmp_path / "tiny" / "model.safetensors")
    assert whole.read_bytes() == tiny.read_bytes()
