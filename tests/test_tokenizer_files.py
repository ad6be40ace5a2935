"""Editing tokenizer files as JSON (surgery/tokenizer_files.py) and a recipe's tokenizer block."""

from __future__ import annotations

import json

import pytest

from surgery.errors import RecipeError
from surgery.tokenizer_files import (
    TokenizerSpec,
    TokenRule,
    TokenSource,
    append_tokens,
    chat_template_of,
    output_files,
    plain_token,
    strip_unused,
    tokenizer_spec,
)
from surgery.vocab import vocab_of

tokenizers = pytest.importorskip("tokenizers")


def bpe(vocab_size: int = 40) -> dict:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"])
    tok.train_from_iterator(["the cat sat on the mat", "a bat ate the hat"] * 5, trainer)
    tok.add_special_tokens([tokenizers.AddedToken("<extra>", special=True)])
    return json.loads(tok.to_str())


def test_strip_unused_drops_tokens_past_the_embedding_and_their_merges():
    data = bpe()
    vocab = vocab_of(data)
    keep = 20
    stripped = strip_unused(data, keep, "m")
    assert vocab_of(stripped) == {t: i for t, i in vocab.items() if i < keep}
    gone = {t for t, i in vocab.items() if i >= keep}
    for merge in stripped["model"]["merges"]:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        assert not gone & set(parts + ["".join(parts)])  # nor merges into a removed token
    tokenizers.Tokenizer.from_str(json.dumps(stripped))  # still a valid tokenizer
    assert strip_unused(data, len(vocab), "m") is data  # nothing to strip: unchanged


def test_only_bpe_can_be_stripped():
    word_level = {"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "c": 2}}, "added_tokens": []}
    with pytest.raises(RecipeError, match="WordLevel: only BPE tokenizers can be trimmed"):
        strip_unused(word_level, 2, "org/m")


def test_append_tokens_numbers_from_the_next_free_id():
    data = bpe()
    n = len(vocab_of(data))
    out = append_tokens(data, [plain_token("<new>"), {**plain_token("<sp>"), "special": True}])
    assert vocab_of(out)["<new>"] == n and vocab_of(out)["<sp>"] == n + 1
    assert out["added_tokens"][-1] == {"id": n + 1, **plain_token("<sp>"), "special": True}
    tok = tokenizers.Tokenizer.from_str(json.dumps(out))
    assert tok.encode("the <new> cat").tokens[1] == "<new>"
    assert data is not out and "<new>" not in vocab_of(data)


def test_output_files_edit_config_and_template(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe()))
    (tmp_path / "vocab.json").write_text("{}")  # a slow tokenizer's file: stale once edited
    config = {"chat_template": "old", "added_tokens_decoder": {"0": {"content": "<unk>"}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template_of(tmp_path) == "old"
    edited = append_tokens(bpe(), [plain_token("<new>")])
    new = [edited["added_tokens"][-1]]
    files = output_files(tmp_path, edited, new, "{{ messages }} template")
    assert files["vocab.json"] is None and files["merges.txt"] is None
    written = json.loads(files["tokenizer_config.json"])
    assert "chat_template" not in written
    assert written["added_tokens_decoder"][str(new[0]["id"])]["content"] == "<new>"
    assert files["chat_template.jinja"] == b"{{ messages }} template"
    unchanged = output_files(tmp_path, None, [], None)
    assert unchanged["vocab.json"] == b"{}"
    assert unchanged["tokenizer_config.json"] == (tmp_path / "tokenizer_config.json").read_bytes()
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "D"}]})
    )
    assert chat_template_of(tmp_path) == "D"


def test_recipe_tokenizer_block():
    spec = tokenizer_spec(
        {
            "source": "union",
            "base": "b",
            "tokens": {"<z>": {"source": {"kind": "zero"}}, "<m>": {"source": "a", "force": True}},
            "pad_to_multiple_of": 64,
        },
        lambda p: "/abs/" + p,
    )
    assert spec == TokenizerSpec(
        "union",
        "/abs/b",
        (TokenRule("<z>", TokenSource("zero")), TokenRule("<m>", TokenSource("model", "/abs/a"), True)),
        64,
    )
    assert tokenizer_spec(spec.to_dict()) == spec  # the saved form reads back
    assert spec.models() == ["/abs/b", "/abs/a"]
    bad = [
        ({"source": "union", "tokens": {"<x>": {}}}, "has no source"),
        (
            {"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "a"}}}},
            "exactly one of",
        ),
        ({"source": "union", "pad_to_multiple_of": -1}, "positive integer"),
        ({"source": "union", "extra": 1}, "unknown key"),
        ({"tokens": {}}, "must be a mapping with 'source'"),
    ]
    for data, message in bad:
        with pytest.raises(RecipeError, match=message):
            tokenizer_spec(data)
