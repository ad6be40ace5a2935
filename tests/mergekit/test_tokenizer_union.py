"""mergekit configs over models whose tokenizers differ: tokenizer_source, the tokenizer: block,
chat_template. Checked against mergekit 0.1.5's vocabulary rule re-derived in ``vocab_family.permuted``
(each model's rows in the output's order) followed by the method's math, float32, 1e-5 relative; the
output tokenizer and model load in transformers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.mergekit.test_run_mergekit import gta, magnitude, write_config
from tests.test_e2e_transformers import load_state

transformers = pytest.importorskip("transformers")
from tests.mergekit.vocab_family import build_family, permuted  # noqa: E402

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TOKENS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(20)] + ["x0", "x1"]
# the union: the base's 25, then ft1's new plain tokens in its id order, ft2's, then added specials
UNION = BASE_TOKENS + ["y0", "y1", "y2", "z0", "<|im_start|>", "<|im_end|>"]
CHATML_PROMPT = "<|im_start|>user\nw1 y0<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("vocab"))


def vocab_of(folder) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def inputs(fam, *names):
    """Per model: state dict, vocabulary, vocab_size (config)."""
    states = {n: load_state(fam[n]) for n in names}
    vocabs = {n: vocab_of(fam[n]) for n in names}
    sizes = {n: json.loads((fam[n] / "config.json").read_text())["vocab_size"] for n in names}
    return states, vocabs, sizes


def aligned(states, vocabs, sizes, out_vocab, base, tensor, **kw):
    return permuted({n: s[tensor] for n, s in states.items()}, vocabs, sizes, out_vocab, base, **kw)


def check(out, expect) -> None:
    got = load_state(out)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expect(name), rtol=1e-5, atol=1e-7, msg=name)


def test_union_linear_chatml_loads_and_generates(fam, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "base_model": str(fam["base"]),
            "models": [
                {"model": str(fam["base"]), "parameters": {"weight": 0.5}},
                {"model": str(fam["ft1"]), "parameters": {"weight": 0.3}},
                {"model": str(fam["ft2"]), "parameters": {"weight": 0.2}},
            ],
            "dtype": "float32",
            "tokenizer_source": "union",
            "chat_template": "chatml",
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert vocab_of(out) == {t: i for i, t in enumerate(UNION)}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(UNION)
    states, vocabs, sizes = inputs(fam, "base", "ft1", "ft2")
    out_vocab = {t: i for i, t in enumerate(UNION)}
    w = {"base": 0.5, "ft1": 0.3, "ft2": 0.2}
    rows = {k: aligned(states, vocabs, sizes, out_vocab, "base", k) for k in VOCAB_KEYS}

    def expect(name):
        parts = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        return sum(w[n] * parts[n] for n in w) / sum(w.values())

    check(out, expect)
    # the written tokenizer: the union's ids, the added tokens special or not as their models had them
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w1 y0 z0 <|im_start|>")["input_ids"] == [
        out_vocab[t] for t in ("w1", "y0", "z0", "<|im_start|>")
    ]
    assert tok.convert_ids_to_tokens(tok("w1 <|im_end|>", add_special_tokens=False)["input_ids"]) == [
        "w1",
        "<|im_end|>",
    ]
    decoder = tok.added_tokens_decoder
    assert decoder[out_vocab["<|im_end|>"]].special and not decoder[out_vocab["y0"]].special
    messages = [{"role": "user", "content": "w1 y0"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == CHATML_PROMPT
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(UNION)
    ids = tok(CHATML_PROMPT, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 3)


def tokens_config(fam, method: str, **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["ft1"]), "parameters": {"weight": 0.6, **params}},
            {"model": str(fam["ft2"]), "parameters": {"weight": 0.4, **params}},
        ],
        "dtype": "float32",
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 8,
            "tokens": {
                "<|im_start|>": {"source": str(fam["ft2"]), "force": True},
                "<new>": {"source": {"kind": "zero"}},
                "y9": {"source": {"kind": "model_token", "model": str(fam["ft1"]), "token": "y1"}},
                "w3": {
                    "source": {"kind": "model_token", "model": str(fam["ft2"]), "token_id": 5},
                    "force": True,
                },
            },
        },
    }


TOKENS = {
    "<|im_start|>": {"source": "ft2", "force": True},
    "<new>": {"source": ("zero",), "force": False},
    "y9": {"source": ("model_token", "ft1", "y1"), "force": False},
    "w3": {"source": ("model_token", "ft2", 5), "force": True},
}


def test_tokens_block_force_and_padding_task_arithmetic(fam, invoke, tmp_path):
    cfg = write_config(tmp_path, tokens_config(fam, "task_arithmetic"))
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    expected = UNION + ["<new>", "y9"]  # tokens: entries the union lacks, appended in order
    assert vocab_of(out) == {t: i for i, t in enumerate(expected)}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 40  # 33 rounded up to 8
    states, vocabs, sizes = inputs(fam, "base", "ft1", "ft2")
    out_vocab = {t: i for i, t in enumerate(expected)}
    rows = {
        k: aligned(states, vocabs, sizes, out_vocab, "base", k, tokens=TOKENS, pad_to=8) for k in VOCAB_KEYS
    }

    def expect(name):
        p = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        return gta(p["base"], [p["ft1"], p["ft2"]], [0.6, 0.4])

    check(out, expect)
    # streamed in tiny chunks on 3 threads: the same bytes (padding means included)
    again = invoke("run", cfg, "-o", tmp_path / "small", "-q", "--max-memory", "4KiB", "--threads", "3")
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "small" / "model.safetensors").read_bytes()
    # the device-resident path (torch kernels on CPU tensors): rows gathered into staging buffers,
    # fills and padding means made on the host and written into the device chunk; the same bytes
    dev = invoke("run", cfg, "-o", tmp_path / "dev", "-q", "--device", "torch-cpu", "--max-memory", "4KiB")
    assert dev.exit_code == 0, dev.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "dev" / "model.safetensors").read_bytes()
    # the output's recipe reproduces it, tokenizer files included
    rerun = invoke("run", out / "surgery_recipe.yaml", "-o", tmp_path / "rerun", "-q")
    assert rerun.exit_code == 0, rerun.output
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).read_bytes() == (tmp_path / "rerun" / name).read_bytes(), name


def test_ties_on_aligned_rows(fam, invoke, tmp_path):
    cfg = tokens_config(fam, "ties", density=0.5)
    del cfg["tokenizer"]["pad_to_multiple_of"]  # identical padding rows make exact magnitude ties
    result = invoke("run", write_config(tmp_path, cfg), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    states, vocabs, sizes = inputs(fam, "base", "ft1", "ft2")
    out_vocab = vocab_of(tmp_path / "out")
    rows = {k: aligned(states, vocabs, sizes, out_vocab, "base", k, tokens=TOKENS) for k in VOCAB_KEYS}

    def expect(name):
        p = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        return gta(p["base"], [p["ft1"], p["ft2"]], [0.6, 0.4], sparsify=lambda d, i: magnitude(d, 0.5),
                   consensus=True, normalize=True)  # fmt: skip

    check(tmp_path / "out", expect)


@pytest.mark.parametrize("source", ["base", "ft1"])
def test_one_models_tokenizer_aligns_the_others(fam, invoke, tmp_path, source):
    """tokenizer_source base (mergekit's: the base's, rows of every model moved to its ids) or a
    model: ft1 numbers its words in reverse, so rows by index would add the wrong tokens."""
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 1.0}}],
        "tokenizer_source": source if source == "base" else str(fam[source]),
    }
    result = invoke("run", write_config(tmp_path, cfg), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert vocab_of(out) == vocab_of(fam[source])
    states, vocabs, sizes = inputs(fam, "base", "ft1")
    rows = {k: aligned(states, vocabs, sizes, vocab_of(out), "base", k) for k in VOCAB_KEYS}

    def expect(name):
        p = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        return gta(p["base"], [p["ft1"]], [1.0])

    check(out, expect)
    assert (out / "tokenizer.json").read_bytes() == (fam[source] / "tokenizer.json").read_bytes()


def test_same_tokenizers_keep_rows_by_index(fam, invoke, tmp_path):
    """No alignment needed (one vocabulary): the merge is the plain one, bit for bit."""
    twin = tmp_path / "twin"  # the base's tokenizer; weights of ft1 with its rows in the base's order
    shutil.copytree(fam["base"], twin)
    state = load_state(fam["ft1"])
    order = [vocab_of(fam["ft1"]).get(t, 0) for t in BASE_TOKENS]
    for key in VOCAB_KEYS:
        state[key] = state[key][order].contiguous()
    save_file(state, str(twin / "model.safetensors"))
    common = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
              "models": [{"model": str(twin), "parameters": {"weight": 0.5}}]}  # fmt: skip
    a = invoke("run", write_config(tmp_path, common), "-o", tmp_path / "a", "-q")
    (tmp_path / "merge.yml").unlink()
    b = invoke(
        "run", write_config(tmp_path, {**common, "tokenizer_source": "base"}), "-o", tmp_path / "b", "-q"
    )
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_chat_template_auto_jinja_and_convert(tmp_path_factory, invoke, tmp_path):
    a = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
    b = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"
    fam = build_family(tmp_path_factory.mktemp("tpl"), {"base": b, "ft1": a, "ft2": a})
    models = [{"model": str(fam[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")]
    data = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "models": models,
            "tokenizer_source": "union", "chat_template": "auto"}  # fmt: skip
    result = invoke("run", write_config(tmp_path, data), "-o", tmp_path / "auto", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "auto" / "chat_template.jinja").read_text() == a  # two of three carry it
    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "merge.yml").unlink()
    stack = {"merge_method": "passthrough", "chat_template": jinja,
             "slices": [{"sources": [{"model": str(fam["base"]), "layer_range": [0, 2]}],
                         "residual_weight": 0.3}]}  # fmt: skip
    cfg = write_config(tmp_path, stack)
    converted = invoke("convert", cfg)
    assert converted.exit_code == 0, converted.output
    recipe = yaml.safe_load(converted.stdout)
    assert recipe["chat_template"] == jinja and "tokenizer" not in recipe
    result = invoke("run", cfg, "-o", tmp_path / "jinja", "-q")
    assert result.exit_code == 0, result.output
    assert "note: mergekit config: residual_weight has no effect in mergekit 0.1.5" in result.stderr
    assert load_state(tmp_path / "jinja").keys() == load_state(fam["base"]).keys()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "jinja")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert (tmp_path / "jinja" / "tokenizer.json").read_bytes() == (
        fam["base"] / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"merge_method": "passthrough", "slices": "FT1", "tokenizer_source": "union"},
            r"merge_method passthrough with tokenizer_source: union is not supported yet",
        ),
        (
            {"tokenizer": {"tokens": {"<q>": {"source": "/elsewhere/model"}}}},
            r"tokenizer: /elsewhere/model is not one of the inputs",
        ),
        (
            {"tokenizer": {"tokens": {"<q>": {"source": "FT1"}}}},
            r"takes token '<q>' of .*ft1, which it lacks",
        ),
        ({"chat_template": "exaone"}, "chat_template: exaone is not supported yet"),
    ],
)
def test_refusals(fam, invoke, tmp_path, change, message):
    data = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 1.0}}], **change}  # fmt: skip
    if data.get("slices") == "FT1":
        data = {k: v for k, v in data.items() if k not in ("models", "base_model")}
        data["slices"] = [{"sources": [{"model": str(fam["ft1"]), "layer_range": [0, 2]}]}]
    text = yaml.safe_dump(data).replace("FT1", str(fam["ft1"]))
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "hint:" in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


def test_native_recipe_with_relative_paths_equals_the_mergekit_config(fam, invoke, tmp_path):
    """The tokenizer block is a recipe feature: written by hand (paths relative to the recipe file),
    it gives the bytes the mergekit config gives; `surgery convert` prints that block."""
    cfg = write_config(tmp_path, tokens_config(fam, "task_arithmetic"))
    converted = invoke("convert", cfg)
    assert converted.exit_code == 0, converted.output
    block = yaml.safe_load(converted.stdout)["tokenizer"]
    assert (
        block["source"] == "union" and block["base"] == str(fam["base"]) and block["pad_to_multiple_of"] == 8
    )
    assert block["tokens"]["<new>"] == {"source": {"kind": "zero"}, "force": False}
    root = fam["base"].parent
    recipe = {
        "method": "task_arithmetic",
        "base": "base",
        "models": ["ft1", "ft2"],
        "parameters": {"weights": [0.6, 0.4]},
        "output": {"dtype": "float32"},
        "tokenizer": json.loads(json.dumps(block).replace(str(root) + "/", "")),
    }
    assert (
        recipe["tokenizer"]["base"] == "base"
        and recipe["tokenizer"]["tokens"]["y9"]["source"]["model"] == "ft1"
    )
    (root / "native.yml").write_text(yaml.safe_dump(recipe))
    a = invoke("run", cfg, "-o", tmp_path / "a", "-q")
    b = invoke("run", root / "native.yml", "-o", tmp_path / "b", "-q")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_an_input_without_tokenizer_files_is_read_as_the_bases(fam, invoke, tmp_path):
    """mergekit's rule for a model whose tokenizer does not load: its rows are the base's tokens. A
    slow tokenizer alone (no tokenizer.json) is refused instead: its vocabulary is unknown here."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fam["base"] / name, bare / name)
    state = load_state(fam["base"])
    save_file({k: v + 0.01 for k, v in state.items()}, str(bare / "model.safetensors"))
    data = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "tokenizer_source": "union",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (fam["ft1"], bare)]}  # fmt: skip
    result = invoke("run", write_config(tmp_path, data), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert f"{bare} has no tokenizer.json: its rows are aligned as {fam['base']}'s" in result.stderr
    states, vocabs, sizes = inputs(fam, "base", "ft1")
    states["bare"], vocabs["bare"], sizes["bare"] = load_state(bare), vocabs["base"], sizes["base"]
    out_vocab = vocab_of(tmp_path / "out")
    rows = {k: aligned(states, vocabs, sizes, out_vocab, "base", k) for k in VOCAB_KEYS}

    def expect(name):
        p = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        return gta(p["base"], [p["ft1"], p["bare"]], [0.5, 0.5])

    check(tmp_path / "out", expect)
    (bare / "vocab.json").write_text("{}")
    result = invoke("run", tmp_path / "merge.yml", "-o", tmp_path / "out2", "-q")
    assert result.exit_code == 1 and "has a tokenizer without tokenizer.json" in result.stderr
    assert "hint: save it as a fast tokenizer" in result.stderr and not (tmp_path / "out2").exists()


def test_bfloat16_inputs_gather_decode_fill_and_pad(fam, invoke, tmp_path):
    """bfloat16 inputs: rows are read raw, decoded once per chunk, filled rows decoded on their own;
    the result is the float32 reference rounded once, and tiny chunks give the same bytes."""
    half = {}
    for name in ("base", "ft1", "ft2"):
        half[name] = tmp_path / name
        shutil.copytree(fam[name], half[name])
        state = {k: v.to(torch.bfloat16) for k, v in load_state(fam[name]).items()}
        save_file(state, str(half[name] / "model.safetensors"), metadata={"format": "pt"})
    data = tokens_config(half, "task_arithmetic")
    del data["dtype"]
    cfg = write_config(tmp_path, data)
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    states, vocabs, sizes = inputs(half, "base", "ft1", "ft2")
    states = {n: {k: v.float() for k, v in s.items()} for n, s in states.items()}
    rows = {k: aligned(states, vocabs, sizes, vocab_of(tmp_path / "out"), "base", k, tokens=TOKENS, pad_to=8)
            for k in VOCAB_KEYS}  # fmt: skip
    got = load_state(tmp_path / "out")
    for name, tensor in got.items():
        p = rows[name] if name in rows else {n: s[name] for n, s in states.items()}
        want = gta(p["base"], [p["ft1"], p["ft2"]], [0.6, 0.4])
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor.float(), want.bfloat16().float(), rtol=8e-3, atol=1e-6, msg=name)
    expected = (tmp_path / "out" / "model.safetensors").read_bytes()
    for name, flags in {"small": ("--threads", "3"), "dev": ("--device", "torch-cpu")}.items():
        again = invoke("run", cfg, "-o", tmp_path / name, "-q", "--max-memory", "4KiB", *flags)
        assert again.exit_code == 0, again.output
        assert (tmp_path / name / "model.safetensors").read_bytes() == expected, name
