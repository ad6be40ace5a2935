"""Synthetic character tasks and the character-level tokenizer of the example model family.

Every example is ``<bos>`` + prompt + answer + ``<eos>``; a prompt is a task token, the input and
``=``, for instance ``<add>7+5=`` -> ``12``. Training puts loss on the answer tokens (and ``<eos>``)
only.

Tasks:

- ``copy``: ``<copy>dog=`` -> ``dog``
- ``shift``: Caesar shift by one letter, ``<shift>yza=`` -> ``zab``
- ``add``: single-digit addition, tens digit first, ``<add>7+5=`` -> ``12``, ``<add>2+3=`` -> ``05``
- ``reverse``: ``<reverse>abc=`` -> ``cba``
- ``sort``: sort the letters, ``<sort>cab=`` -> ``abc``

Held-out split: a string whose CRC-32 is divisible by ``HOLDOUT_MOD`` belongs to the evaluation
split only, so training never sees an evaluated string. Addition has only 100 problems, all of them
in both splits (its evaluation measures whether the table was learnt, not generalisation).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

TASKS: tuple[str, ...] = ("copy", "shift", "add", "reverse", "sort")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
PUNCT = "=+"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
MIN_LEN, MAX_LEN = 3, 6
HOLDOUT_MOD = 8
IGNORE_INDEX = -100

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Example:
    """One task instance: the model reads ``prompt`` and must produce ``answer``."""

    task: str
    prompt: str
    answer: str


def task_token(task: str) -> str:
    """The special token that opens a prompt of ``task``."""
    return f"<{task}>"


def vocabulary() -> dict[str, int]:
    """Token -> id map: special tokens, task tokens, then every character the tasks use."""
    tokens = [*SPECIAL_TOKENS, *(task_token(t) for t in TASKS), *LETTERS, *DIGITS, *PUNCT]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real Hugging Face fast tokenizer: one token per character (task tokens whole), ``<bos>``
    prepended."""
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.add_special_tokens([*SPECIAL_TOKENS, *(task_token(t) for t in TASKS)])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=32,
    )


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _in_split(text: str, split: Split) -> bool:
    heldout = zlib.crc32(text.encode()) % HOLDOUT_MOD == 0
    return heldout if split == "eval" else not heldout


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)


def make_example(task: str, rng: random.Random, split: Split = "train") -> Example:
    """Draw one example of ``task`` from ``split`` using ``rng``."""
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return Example(task, f"<add>{a}+{b}=", f"{a + b:02d}")
    word = _random_word(rng)
    while not _in_split(word, split):
        word = _random_word(rng)
    if task == "copy":
        answer = word
    elif task == "shift":
        answer = _shift(word)
    elif task == "reverse":
        answer = word[::-1]
    elif task == "sort":
        answer = "".join(sorted(word))
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return Example(task, f"{task_token(task)}{word}=", answer)


def sample_mixture(
    weights: dict[str, float], n: int, rng: random.Random, split: Split = "train"
) -> list[Example]:
    """``n`` examples whose tasks are drawn with the given relative ``weights``."""
    names = list(weights)
    tasks = rng.choices(names, weights=[weights[t] for t in names], k=n)
    return [make_example(t, rng, split) for t in tasks]


def eval_set(task: str, n: int, seed: int = 20261128) -> list[Example]:
    """A fixed held-out evaluation set (its own seed, evaluation split)."""
    rng = random.Random(f"{seed}-{task}")
    return [make_example(task, rng, "eval") for _ in range(n)]


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` with loss on answer tokens and ``<eos>`` only."""
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
    return ids, labels
