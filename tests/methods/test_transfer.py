"""Diffs, patches, fine-tuning transfer and data-free grafting (METHODS.md checks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ckpt_factory import INT_NAME, load_f32, load_raw, make_family, rank_band_mask, round_to
from click.testing import CliRunner
from safetensors.torch import save_file
from surgery_cli.main import cli

from surgery.engine import EngineOptions, merge
from surgery.errors import PlanError
from surgery.names import natural_key, place
from surgery.recipe import make_recipe

OPTS = EngineOptions(threads=2)


def surgery(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "-q"])
    assert result.exit_code == 0, result.output
    return result


def weights(folder):
    return (folder / "model.safetensors").read_bytes()


def same_tensors(a, b):
    ta, tb = load_raw(a), load_raw(b)
    assert set(ta) == set(tb)
    return all(torch.equal(ta[n], tb[n]) for n in ta)


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "in", n_models=2, dtype="BF16", quantize=True)


def test_diff_apply_round_trip_is_the_finetune(tmp_path, family):
    base, (ft, _) = family
    surgery("diff", base, ft, "-o", tmp_path / "d")
    diff = load_raw(tmp_path / "d")
    assert all(t.dtype == torch.float32 for t in diff.values())  # exact for bf16 inputs
    assert INT_NAME not in diff
    manifest = json.loads((tmp_path / "d" / "surgery_diff.json").read_text())
    assert manifest["kind"] == "dense" and set(manifest["base"]["tensors"]) == set(diff)
    surgery("apply", tmp_path / "d", "--to", base, "-o", tmp_path / "a")
    assert same_tensors(tmp_path / "a", ft)
    b, f = load_f32(base), load_f32(ft)
    for name, tau in diff.items():
        np.testing.assert_array_equal(tau.numpy(), f[name] - b[name])


def test_patch_round_trips(tmp_path, family):
    base, (ft, _) = family
    surgery("diff", base, ft, "--density", "1.0", "-o", tmp_path / "full")
    surgery("apply", tmp_path / "full", "--to", base, "-o", tmp_path / "a")
    assert same_tensors(tmp_path / "a", ft)
    surgery("diff", base, ft, "--density", "0.25", "-o", tmp_path / "p")
    patch = load_raw(tmp_path / "p")
    b, f = load_f32(base), load_f32(ft)
    for name in b:
        if name == INT_NAME:
            continue
        tau = f[name] - b[name]
        idx, val = patch[name + ".indices"].numpy(), patch[name + ".values"].numpy()
        assert idx.size == math.floor(0.25 * tau.size + 1e-9)
        want = np.flatnonzero(rank_band_mask(tau, 0, idx.size))
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(val, tau.reshape(-1)[want])
    surgery("apply", tmp_path / "p", "--to", base, "--scale", "0.5", "-o", tmp_path / "ap")
    got = load_f32(tmp_path / "ap")
    for name in b:
        if name == INT_NAME:
            continue
        flat = b[name].reshape(-1).copy()
        idx, val = patch[name + ".indices"].numpy(), patch[name + ".values"].numpy()
        flat[idx] = flat[idx] + np.float32(0.5) * val
        assert torch.equal(load_raw(tmp_path / "ap")[name], round_to(flat.reshape(b[name].shape), "BF16"))
    assert got.keys() == b.keys()


def graft_reference(base, ft, density):
    """Global top-density of |tau| over the block tensors, ties by (name order, index)."""
    b, f = load_f32(base), load_f32(ft)
    names = sorted((n for n in b if n != INT_NAME and place(n).block is not None), key=natural_key)
    flat = np.concatenate([(f[n] - b[n]).reshape(-1) for n in names])
    mask = rank_band_mask(flat, 0, math.floor(density * flat.size + 1e-9))
    out, pos = {}, 0
    for n in sorted(b):
        if n == INT_NAME:
            continue
        if n in names:
            size = b[n].size
            m = mask[pos : pos + size].reshape(b[n].shape)
            pos += size
            out[n] = round_to(b[n] + np.float32(1.0) * np.where(m, f[n] - b[n], np.float32(0)), "BF16")
        else:
            out[n] = round_to(b[n], "BF16")
    return out


def test_graft_formula_and_patch_equivalence(tmp_path, family):
    base, (ft, _) = family
    surgery("graft", base, ft, "--density", "0.1", "-o", tmp_path / "g")
    got = load_raw(tmp_path / "g")
    for name, want in graft_reference(base, ft, 0.1).items():
        assert torch.equal(got[name], want), name
    surgery("graft", base, ft, "--density", "0.1", "--patch", "-o", tmp_path / "gp")
    surgery("apply", tmp_path / "gp", "--to", base, "-o", tmp_path / "ga")
    assert weights(tmp_path / "g") == weights(tmp_path / "ga")
    manifest = json.loads((tmp_path / "gp" / "surgery_diff.json").read_text())
    blocks = sum(load_f32(base)[n].size for n in manifest["tensors"])
    assert manifest["kept"] == math.floor(0.1 * blocks + 1e-9)
    assert all(place(n).block is not None for n in manifest["tensors"])


def test_graft_full_mask_is_finetune_and_empty_is_base(tmp_path, family):
    base, (ft, _) = family
    surgery("graft", base, ft, "--density", "1.0", "--region", ".", "-o", tmp_path / "full")
    assert same_tensors(tmp_path / "full", ft)
    surgery("graft", base, ft, "--density", "1e-9", "-o", tmp_path / "none")  # floor(n * d) = 0
    assert same_tensors(tmp_path / "none", base)


def test_transfer_checks(tmp_path, family):
    base, (ft, other) = family
    # b_new == b_old -> f_old
    surgery("transfer", "--from", base, "--finetuned", ft, "--to", base, "-o", tmp_path / "same")
    assert same_tensors(tmp_path / "same", ft)
    # scale 0 -> b_new
    surgery(
        "transfer", "--from", base, "--finetuned", ft, "--to", other, "--scale", "0", "-o", tmp_path / "s0"
    )
    assert same_tensors(tmp_path / "s0", other)
    # f_old == b_old -> b_new
    surgery("transfer", "--from", base, "--finetuned", base, "--to", other, "-o", tmp_path / "nop")
    assert same_tensors(tmp_path / "nop", other)
    # formula, and equal to diff + apply
    surgery("transfer", "--from", base, "--finetuned", ft, "--to", other, "-o", tmp_path / "t")
    b, f, n = load_f32(base), load_f32(ft), load_f32(other)
    got = load_raw(tmp_path / "t")
    for name in b:
        if name != INT_NAME:
            assert torch.equal(got[name], round_to(n[name] + np.float32(1) * (f[name] - b[name]), "BF16"))
    surgery("diff", base, ft, "-o", tmp_path / "d")
    result = CliRunner().invoke(
        cli, ["apply", str(tmp_path / "d"), "--to", str(other), "-o", str(tmp_path / "a")]
    )
    assert result.exit_code == 0 and "differs from the base this diff was taken from" in result.output
    assert weights(tmp_path / "a") == weights(tmp_path / "t")


# -- vocabularies -------------------------------------------------------------------------------------
def write_vocab_model(folder, tokens, rows, dim=4, extra_tensor=None):
    """A tiny checkpoint whose embedding row i belongs to tokens[i] (rows: token -> vector)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder.mkdir(parents=True)
    Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(
        str(folder / "tokenizer.json")
    )
    emb = torch.stack([rows[t] for t in tokens]).to(torch.bfloat16)
    tensors = {"model.embed_tokens.weight": emb, "model.layers.0.w": extra_tensor.to(torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(tokens), "num_hidden_layers": 1}))


def test_transfer_aligns_shuffled_and_extended_vocabulary(tmp_path):
    g = torch.Generator().manual_seed(0)
    vocab = [f"tok{i}" for i in range(12)]
    w = torch.randn(3, 3, generator=g)
    old_rows = {t: torch.randn(4, generator=g) for t in vocab}
    ft_rows = {t: v + 0.1 * torch.randn(4, generator=g) for t, v in old_rows.items()}
    ft_rows["<chat>"] = torch.randn(4, generator=g)  # added by the fine-tune
    new_vocab = list(reversed(vocab)) + ["newtok"]  # a new release: reshuffled ids plus a new token
    new_rows = {t: v + 0.01 for t, v in old_rows.items()} | {"newtok": torch.randn(4, generator=g)}
    write_vocab_model(tmp_path / "old", vocab, old_rows, extra_tensor=w)
    write_vocab_model(tmp_path / "ft", vocab + ["<chat>"], ft_rows, extra_tensor=w + 0.5)
    write_vocab_model(tmp_path / "new", new_vocab, new_rows, extra_tensor=w - 0.5)
    result = surgery(
        "transfer",
        "--from",
        tmp_path / "old",
        "--finetuned",
        tmp_path / "ft",
        "--to",
        tmp_path / "new",
        "-o",
        tmp_path / "out",
    )
    emb = load_f32(tmp_path / "out")["model.embed_tokens.weight"]
    assert emb.shape == (13, 4)  # the fine-tune's vocabulary: its tokenizer goes with the output

    def bf(x):
        return x.to(torch.bfloat16).float()

    for i, t in enumerate(vocab):
        want = round_to((bf(new_rows[t]) + (bf(ft_rows[t]) - bf(old_rows[t]))).numpy(), "BF16").float()
        np.testing.assert_array_equal(emb[i], want.numpy(), err_msg=t)
    np.testing.assert_array_equal(emb[12], bf(ft_rows["<chat>"]).numpy())  # carried over
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 13
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]["<chat>"] == 12
    assert "aligned by token string" in result.output


def test_transfer_vocabulary_that_cannot_be_aligned_is_an_error(tmp_path):
    g = torch.Generator().manual_seed(1)
    vocab = [f"tok{i}" for i in range(6)]
    rows = {t: torch.randn(4, generator=g) for t in vocab}
    w = torch.randn(3, 3, generator=g)
    write_vocab_model(tmp_path / "old", vocab, rows, extra_tensor=w)
    write_vocab_model(tmp_path / "ft", vocab, rows, extra_tensor=w)
    write_vocab_model(tmp_path / "new", vocab[:4] + ["other"], rows | {"other": rows["tok0"]}, extra_tensor=w)
    recipe = make_recipe("transfer", [str(tmp_path / "old"), str(tmp_path / "ft")], str(tmp_path / "new"))
    with pytest.raises(PlanError, match="tok4"):
        merge(recipe, tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()


def test_transfer_keeps_new_base_vocabulary_on_request(tmp_path):
    g = torch.Generator().manual_seed(2)
    vocab = [f"tok{i}" for i in range(8)]
    w = torch.randn(3, 3, generator=g)
    old_rows = {t: torch.randn(4, generator=g) for t in vocab}
    ft_rows = {t: v + 0.1 for t, v in old_rows.items()} | {"<chat>": torch.randn(4, generator=g)}
    new_vocab = ["newtok", *reversed(vocab)]
    new_rows = {t: v - 0.2 for t, v in old_rows.items()} | {"newtok": torch.randn(4, generator=g)}
    write_vocab_model(tmp_path / "old", vocab, old_rows, extra_tensor=w)
    write_vocab_model(tmp_path / "ft", [*vocab, "<chat>"], ft_rows, extra_tensor=w)
    write_vocab_model(tmp_path / "new", new_vocab, new_rows, extra_tensor=w)
    surgery("transfer", "--from", tmp_path / "old", "--finetuned", tmp_path / "ft", "--to", tmp_path / "new",
            "--tokenizer-from", "new-base", "-o", tmp_path / "out")  # fmt: skip
    emb = load_raw(tmp_path / "out")["model.embed_tokens.weight"]
    assert emb.shape == (9, 4)
    assert torch.equal(emb[0], new_rows["newtok"].to(torch.bfloat16))  # no update to transfer
    for i, t in enumerate(new_vocab[1:], start=1):
        b = {
            k: v.to(torch.bfloat16).float()
            for k, v in (("n", new_rows[t]), ("o", old_rows[t]), ("f", ft_rows[t]))
        }
        assert torch.equal(emb[i], (b["n"] + (b["f"] - b["o"])).to(torch.bfloat16)), t
    assert "newtok" in json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]
