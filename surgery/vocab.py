"""Aligning embedding rows by token string, for fine-tuning transfer across vocabularies.

When the old and new base releases tokenize differently, row ``i`` of ``embed_tokens`` means a
different token in each, so ``b_new + (f_old - b_old)`` by index would add the wrong rows. Instead,
each output row is assembled from the rows that hold *the same token string* in each input:

    out[s] = b_new[s] + scale * (f_old[s] - b_old[s])   token s in all three
    out[s] = f_old[s]                                    s only in the fine-tune (added tokens):
                                                         carried over with its trained row
    out[s] = b_new[s]                                    s only in the new base (tokenizer from
                                                         the new base): no update to transfer

Output rows follow the tokenizer the output gets (the old fine-tune's by default). A token of that
tokenizer that cannot be placed (in the old base but not the new one) is an error naming it. Rows
past the tokenizer (padding rows) are aligned by index when they are padding in every input.

The same ``RowMap`` carries merges of models with different tokenizers (``vocab_union``): there an
input that lacks a token gets a row borrowed from the others (``fills``), and rows padded past the
vocabulary hold the mean of the input's aligned rows (``mean_from``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery.errors import PlanError

# row modes
COMBINE, CARRY, BASE = 0, 1, 2


@dataclass(frozen=True)
class RowMap:
    """For each output row: the source row in each input (transfer: new base, old base, old
    fine-tune), -1 for none, and how the row is made (COMBINE, CARRY or BASE).

    An input's row -1 reads as zeros, unless the output row has a ``fills`` entry: then it reads as
    the float32 mean of the listed (input, row) pairs, summed in that order (an empty entry: zeros).
    Rows from ``mean_from`` on (padding) read, in each input, as the mean of that input's rows
    ``0..mean_from-1`` as this map gathers them.
    """

    rows: np.ndarray  # int64 [n_out, n_inputs]
    mode: np.ndarray  # int8 [n_out]
    dropped: tuple[str, ...]  # tokens of the other vocabulary that the output cannot hold
    fills: Mapping[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    mean_from: int | None = None

    @property
    def n_out(self) -> int:
        return int(self.rows.shape[0])


def load_vocab(root: Path) -> dict[str, int] | None:
    """token string -> id from tokenizer.json (model vocab + added tokens), or vocab.json."""
    tok = root / "tokenizer.json"
    if tok.is_file():
        return vocab_of(json.loads(tok.read_text())) or None
    plain = root / "vocab.json"
    if plain.is_file():
        return {str(k): int(v) for k, v in json.loads(plain.read_text()).items()}
    return None


def vocab_of(tokenizer: dict) -> dict[str, int]:
    """token string -> id of a parsed tokenizer.json: the model's vocabulary, then its added tokens
    (what ``tokenizer.get_vocab()`` returns)."""
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    vocab = dict(vocab)
    for added in tokenizer.get("added_tokens") or []:
        vocab[added["content"]] = int(added["id"])
    return vocab


def _tokens(vocab: dict[str, int], rows: int) -> list[str | None]:
    out: list[str | None] = [None] * rows
    for token, i in vocab.items():
        if 0 <= i < rows:
            out[i] = token
    return out


def align_rows(
    new_base: dict[str, int],
    old_base: dict[str, int],
    old_ft: dict[str, int],
    rows: tuple[int, int, int],
    tokenizer_from: str = "finetuned",
) -> RowMap:
    """Row map for vocabulary-indexed tensors (``rows``: their first dimension in N, O, F)."""
    n_rows, o_rows, f_rows = rows
    tok_n, tok_o, tok_f = _tokens(new_base, n_rows), _tokens(old_base, o_rows), _tokens(old_ft, f_rows)
    in_n = {t: i for i, t in enumerate(tok_n) if t is not None}
    in_o = {t: i for i, t in enumerate(tok_o) if t is not None}
    in_f = {t: i for i, t in enumerate(tok_f) if t is not None}
    out_tokens = tok_f if tokenizer_from == "finetuned" else tok_n
    rows_out = np.full((len(out_tokens), 3), -1, np.int64)
    mode = np.zeros(len(out_tokens), np.int8)
    unplaceable = []
    for r, s in enumerate(out_tokens):
        if s is None:  # padding row: by index where it is padding everywhere
            if r < min(n_rows, o_rows, f_rows) and tok_n[r] is None and tok_o[r] is None and tok_f[r] is None:
                rows_out[r] = (r, r, r)
            elif tokenizer_from == "finetuned":
                rows_out[r, 2], mode[r] = r, CARRY
            else:
                rows_out[r, 0], mode[r] = r, BASE
            continue
        n, o, f = in_n.get(s, -1), in_o.get(s, -1), in_f.get(s, -1)
        if n >= 0 and o >= 0 and f >= 0:
            rows_out[r] = (n, o, f)
        elif tokenizer_from == "finetuned" and f >= 0 and o < 0:
            rows_out[r, 2], mode[r] = f, CARRY  # added by the fine-tune: keep its trained row
        elif tokenizer_from != "finetuned" and n >= 0:
            rows_out[r, 0], mode[r] = n, BASE  # new-base token the fine-tune never saw
        else:
            unplaceable.append(s)
    if unplaceable:
        shown = ", ".join(repr(t) for t in unplaceable[:10])
        raise PlanError(
            [
                f"{len(unplaceable)} token(s) of the output vocabulary exist in the old base but not in "
                f"the new base, so their rows cannot be aligned: {shown}"
            ],
            hint="transfer needs every old-base token of the fine-tune's vocabulary in the new base; "
            "or pass --tokenizer-from new-base to keep the new base's vocabulary",
        )
    other = in_n if tokenizer_from == "finetuned" else in_f
    kept = set(t for t in out_tokens if t is not None)
    dropped = tuple(sorted(t for t in other if t not in kept))
    return RowMap(rows_out, mode, dropped)
