"""RegMean: the block-by-block Gram pass and the solve against an independent in-memory RegMean.

The reference loads each tiny transformers model whole, runs its ordinary forward with hooks that
keep every block linear layer's inputs, forms X^T X, and merges with numpy's inverse in float64.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from surgery import calibration
from surgery.errors import InputNotFoundError, RecipeError
from surgery.methods.regmean import regmean_solve

TEXTS = [
    ["w1 w2 w3 w4 w5", "w7 w7 w9 w1", "w20 w21 w22 w23 w24 w25 w26", "w3"],
    ["w30 w31 w2 w2", "w40 w41 w42 w43 w44 w45", "w5 w6 w7 w8 w9 w10 w11 w12"],
]


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config(request.param)).eval()
    paths = []
    for i in range(2):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        path = root / f"ft{i}"
        ft.save_pretrained(path, max_shard_size="40KB")  # sharded: the pass reads across shards
        save_tokenizer(path, 64)
        data = root / f"calib{i}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[i]))
        paths.append((path, data))
    return request.param, paths


def reference_grams(path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """X^T X per block linear weight, from the whole model's ordinary forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    inputs: dict[str, list] = {}
    handles = []
    for name, mod in model.named_modules():
        if (".layers." in name or ".h." in name) and (
            isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"
        ):
            key = name + ".weight"
            handles.append(
                mod.register_forward_pre_hook(lambda m, a, key=key: inputs.setdefault(key, []).append(a[0]))
            )
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    for h in handles:
        h.remove()
    out = {}
    for key, xs in inputs.items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in xs]).double().numpy()
        out[key] = x.T @ x
    return out


def test_block_by_block_grams_equal_the_whole_model_forward(family, tmp_path):
    arch, paths = family
    (path, data) = paths[0]
    got = calibration.collect_grams(path, data, cache_dir=tmp_path)
    ref = reference_grams(path, TEXTS[0])
    assert set(got.uses) == set(ref)
    assert got.texts == 4 and got.tokens == sum(len(t.split()) for t in TEXTS[0])
    for weight, g in ref.items():
        np.testing.assert_allclose(got.gram(weight).numpy(), g, rtol=1e-5, atol=1e-6 * np.abs(g).max())
    if arch == "llama":  # q/k/v and gate/up read one input: one stored Gram each
        assert (
            got.uses["model.layers.0.self_attn.k_proj.weight"]
            == got.uses["model.layers.0.self_attn.q_proj.weight"]
        )
        assert (
            got.uses["model.layers.1.mlp.up_proj.weight"] == got.uses["model.layers.1.mlp.gate_proj.weight"]
        )
        assert len(set(got.uses.values())) == 4 * 2  # attention in, o_proj in, mlp in, down_proj in
    else:
        assert got.layouts["transformer.h.0.attn.c_attn.weight"] == "in_out"


def test_grams_are_cached_by_model_and_data(family, tmp_path, monkeypatch):
    _, paths = family
    path, data = paths[0]
    first = calibration.collect_grams(path, data, cache_dir=tmp_path)
    monkeypatch.setattr(calibration, "_gram_pass", lambda *a: pytest.fail("forward pass not cached"))
    again = calibration.collect_grams(path, data, cache_dir=tmp_path)
    assert again.folder == first.folder
    other = tmp_path / "other.txt"
    other.write_text("w1 w2\n")
    monkeypatch.undo()
    assert calibration.collect_grams(path, other, cache_dir=tmp_path).folder != first.folder
    assert not list(tmp_path.glob("*.partial-*"))


def reference_regmean(ws: list[np.ndarray], gs: list[np.ndarray], alpha: float) -> np.ndarray:
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    return sum(w @ g for w, g in zip(ws, shrunk)) @ np.linalg.inv(sum(shrunk))


@pytest.mark.parametrize("alpha", [0.9, 0.5])  # alpha 1 with fewer tokens than dims is singular
def test_regmean_merge_of_the_family_matches_in_memory_regmean(family, tmp_path, alpha):
    arch, paths = family
    sets = [calibration.collect_grams(p, d, cache_dir=tmp_path) for p, d in paths]
    refs = [reference_grams(p, TEXTS[i]) for i, (p, _) in enumerate(paths)]
    models = [transformers.AutoModelForCausalLM.from_pretrained(p).float().state_dict() for p, _ in paths]
    for weight in refs[0]:
        ws = [m[weight].double().numpy() for m in models]
        layout = sets[0].layouts[weight]
        grams = torch.stack([s.gram(weight) for s in sets])
        got = regmean_solve(torch.stack([m[weight] for m in models]), grams, alpha=alpha, layout=layout)
        if layout == "in_out":
            ws = [w.T for w in ws]
        ref = reference_regmean(ws, [r[weight] for r in refs], alpha)
        ref = ref.T if layout == "in_out" else ref
        np.testing.assert_allclose(got.numpy(), ref, atol=2e-5)


def test_regmean_invariants():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5, 4))
    x = rng.standard_normal((50, 4))
    g = np.stack([x.T @ x] * 3)
    # equal Grams: a weighted mean with equal weights is the plain mean
    np.testing.assert_allclose(regmean_solve(w, g), w.mean(0), atol=1e-5)
    # one model: itself
    np.testing.assert_allclose(regmean_solve(w[:1], g[:1]), w[0], atol=1e-5)
    # alpha = 0: diagonal Grams, each column a weighted mean by that input's energy
    gs = np.stack([np.diag(rng.uniform(0.5, 2, 4)) + 0.3 for _ in range(3)])
    d = np.stack([np.diag(gi) for gi in gs])
    np.testing.assert_allclose(
        regmean_solve(w, gs, alpha=0.0), (w * d[:, None, :]).sum(0) / d.sum(0), atol=1e-5
    )
    # a dead input dimension (never active in any model): that column is the mean
    x0 = x.copy()
    x0[:, 2] = 0
    g0 = np.stack([x0.T @ x0] * 3)
    got = regmean_solve(w, g0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:, 2], w[:, :, 2].mean(0), atol=1e-5)


def test_read_texts_formats_and_errors(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first line\n\nsecond {line}\n")
    assert calibration.read_texts(plain) == ["first line", "second {line}"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "x y"}\n{"text": "z", "label": 1}\n')
    assert calibration.read_texts(jl) == ["x y", "z"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "x"}\n{"prompt": "no text"}\n')
    with pytest.raises(RecipeError, match=":2: no string field"):
        calibration.read_texts(bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RecipeError, match="holds no text"):
        calibration.read_texts(tmp_path / "empty.txt")
    with pytest.raises(InputNotFoundError):
        calibration.read_texts(tmp_path / "missing.txt")


def test_concurrent_callers_run_the_gram_pass_once(family, tmp_path, monkeypatch):
    """Shares of a split run ask for the same Grams at the same time: one computes, the others wait for
    it and load the same folder (threads here: each opens the lock file itself, as processes do)."""
    import threading

    _, paths = family
    path, data = paths[0]
    real, calls, started = calibration._gram_pass, [], threading.Event()

    def slow_pass(*args):
        calls.append(1)
        started.set()
        time.sleep(0.5)  # the others arrive while this one runs
        return real(*args)

    monkeypatch.setattr(calibration, "_gram_pass", slow_pass)
    results = []

    def call():
        results.append(calibration.collect_grams(path, data, cache_dir=tmp_path).folder)

    threads = [threading.Thread(target=call) for _ in range(3)]
    threads[0].start()
    started.wait(10)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    assert not list(tmp_path.glob("*.partial-*"))
