"""Tiny Llama models whose tokenizers differ (built offline), and mergekit's vocabulary rule re-derived.

Tokenizers are real: ``tokenizers`` WordLevel models wrapped in ``PreTrainedTokenizerFast`` and saved,
so ``AutoTokenizer`` loads them. The fine-tunes are the base plus noise, with embedding and head rows
placed where their own tokenizer puts each token (rows of tokens the base lacks are fresh).

    base   <unk> <s> </s> w0..w19 x0 x1                       25 tokens, 25 rows
    ft1    the same words in reverse order, y0 y1 y2, added special <|im_start|>
    ft2    w0..w19 x0 y1 z0, added specials <|im_start|> <|im_end|>; 2 padding rows (vocab_size 30)
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(20)]
SPECS = {
    "base": (WORDS + ["x0", "x1"], (), 0),
    "ft1": (WORDS[::-1] + ["y0", "y1", "y2"], ("<|im_start|>",), 0),
    "ft2": (WORDS + ["x0", "y1", "z0"], ("<|im_start|>", "<|im_end|>"), 2),
}


def make_tokenizer(words: list[str], added: tuple[str, ...]) -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL + list(added)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_family(root: Path, chat_templates: dict[str, str] | None = None) -> dict[str, Path]:
    chat_templates = chat_templates or {}
    tokenizers = {name: make_tokenizer(words, added) for name, (words, added, _) in SPECS.items()}
    base_vocab = tokenizers["base"].get_vocab()
    paths = {}
    with torch.random.fork_rng():
        torch.manual_seed(3)
        base = None
        for name, (_, _, padding) in SPECS.items():
            tok = tokenizers[name]
            config = transformers.LlamaConfig(
                vocab_size=len(tok) + padding, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            )  # fmt: skip
            model = transformers.LlamaForCausalLM(config).eval()
            if base is not None:  # a fine-tune: the base's weights (rows by token) plus noise
                state = model.state_dict()
                with torch.no_grad():
                    for key, value in base.state_dict().items():
                        if value.shape == state[key].shape and "embed" not in key and "lm_head" not in key:
                            state[key].copy_(value + 0.02 * torch.randn(value.shape))
                    for key in ("model.embed_tokens.weight", "lm_head.weight"):
                        for token, row in tok.get_vocab().items():
                            if token in base_vocab:
                                b = base.state_dict()[key][base_vocab[token]]
                                state[key][row] = b + 0.02 * torch.randn(b.shape)
            else:
                base = model
            paths[name] = root / name
            model.save_pretrained(paths[name])
            if name in chat_templates:
                tok.chat_template = chat_templates[name]
            tok.save_pretrained(paths[name])
    return paths


def permuted(
    tensors: dict[str, torch.Tensor],
    vocabs: dict[str, dict[str, int]],
    sizes: dict[str, int],
    out_vocab: dict[str, int],
    base: str | None,
    tokens: dict[str, dict] | None = None,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's PermutedVocabulary, written out: each model's rows in the output's order.

    tokens: {token: {"source": model | ("zero",) | ("model_token", model, token_or_id), "force": bool}}.
    """
    tokens = tokens or {}
    order = list(tensors)
    n = len(out_vocab)
    rows = n if not pad_to else -(-n // pad_to) * pad_to

    def own(model: str, token: str) -> int:
        i = vocabs[model].get(token, -1)
        return i if 0 <= i < sizes[model] else -1

    defaults = {}
    for token, _ in sorted(out_vocab.items(), key=lambda kv: kv[1]):
        cfg = tokens.get(token)
        have = [m for m in order if own(m, token) >= 0]
        if not (cfg and cfg["force"]) and len(have) == len(order):
            continue
        if cfg is not None:
            src = cfg["source"]
            if src == ("zero",):
                defaults[token] = torch.zeros(tensors[order[0]].shape[1:])
            elif isinstance(src, tuple):  # model_token
                _, model, which = src
                row = which if isinstance(which, int) else vocabs[model][which]
                defaults[token] = tensors[model][row]
            else:
                defaults[token] = tensors[src][own(src, token)]
        elif len(have) == 1:
            defaults[token] = tensors[have[0]][own(have[0], token)]
        elif not have:
            defaults[token] = torch.zeros(tensors[order[0]].shape[1:])
        elif base in have:
            defaults[token] = tensors[base][own(base, token)]
        else:
            acc = torch.zeros(tensors[order[0]].shape[1:])
            for m in have:
                acc = acc + tensors[m][own(m, token)]
            defaults[token] = acc / len(have)
    out = {}
    for m in order:
        new = torch.zeros((rows, *tensors[m].shape[1:]))
        for token, i in out_vocab.items():
            forced = token in tokens and tokens[token]["force"]
            new[i] = tensors[m][own(m, token)] if own(m, token) >= 0 and not forced else defaults[token]
        if rows > n:
            new[n:] = new[:n].mean(0)
        out[m] = new
    return out
