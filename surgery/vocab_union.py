"""Merging models whose tokenizers differ: one output vocabulary, every input's rows aligned to it.

mergekit 0.1.5's rule (``tokenizer_source`` / ``tokenizer:``), re-derived, as a ``vocab.RowMap`` the
engine gathers rows with (plan data, no method sees it):

- output vocabulary: the base's tokenizer without tokens past its embedding (``base``), one input's
  tokenizer (a model), or the union: the base's, then every other input's new tokens as added tokens
  (plain tokens first, then the inputs' added tokens with their settings), then ``tokens:`` entries
  that are new; ``pad_to_multiple_of`` rounds the row count up;
- input ``i``'s row for token ``s``: its own row of ``s`` (tokens past its embedding do not count);
- a token some input lacks (or a ``force``d one) gets one default row, used by every input that
  lacks it: the ``tokens:`` entry's source when given; else the only input that has it; zeros when
  none has it; the base's row when the base has it; else the mean of the inputs that have it;
- padding rows: in each input, the mean of its aligned rows.

Order differs from mergekit where mergekit's is not defined: mergekit lists new tokens in hash-map
order (different in every process); here they come input by input (base first, then the recipe's
order), each input's in id order. Rows are aligned by token string either way, so the two outputs
hold the same rows, possibly numbered differently.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from surgery.checkpoint import Checkpoint
from surgery.errors import PlanError
from surgery.tokenizer_files import (
    SLOW_FILES,
    TokenizerSpec,
    TokenRule,
    added_entry,
    append_tokens,
    output_files,
    plain_token,
    read_tokenizer,
    strip_unused,
)
from surgery.vocab import COMBINE, RowMap, vocab_of


def align_vocabularies(
    spec: TokenizerSpec | None,
    chat_template: str | None,
    inputs: list[Checkpoint],
    sources: list[str],
    vocab_rows: list[int],
) -> tuple[RowMap | None, dict[str, bytes | None], list[str]]:
    """The row map for vocabulary-indexed tensors (None: every input's rows already sit where the
    output's do), the output's tokenizer files, and notes. ``sources``: the inputs as the recipe
    names them; ``vocab_rows``: each input's embedding rows."""
    if spec is None:  # chat template only: the tokenizer source's files, template replaced
        return None, output_files(inputs[0].root, None, [], chat_template), []
    index = {s: i for i, s in enumerate(sources)}
    missing = [m for m in spec.models() if m not in index]
    if missing:
        raise PlanError(
            [f"tokenizer: {m} is not one of the inputs" for m in missing],
            hint="tokenizer base and token sources must be models of the merge",
        )
    base = index[spec.base] if spec.base is not None else None
    start = base if base is not None else 0
    roots = [c.root for c in inputs]
    sizes = [_vocab_size(c, rows) for c, rows in zip(inputs, vocab_rows)]
    parsed = [read_tokenizer(root) for root in roots]
    if parsed[start] is None:
        raise PlanError(
            [f"{sources[start]} has no tokenizer.json, which the output vocabulary starts from"],
            hint="tokenizer_source needs fast (tokenizer.json) tokenizers",
        )
    parsed[start] = strip_unused(parsed[start], sizes[start], sources[start])  # type: ignore[arg-type]
    slow = [sources[i] for i, (p, root) in enumerate(zip(parsed, roots)) if p is None and _has_slow(root)]
    if slow:  # its vocabulary is unknown to us: assuming the base's could misplace every row
        raise PlanError(
            [f"{m} has a tokenizer without tokenizer.json (a slow tokenizer only)" for m in slow],
            hint="save it as a fast tokenizer: AutoTokenizer.from_pretrained(M).save_pretrained(M)",
        )
    notes = [
        f"{sources[i]} has no tokenizer.json: its rows are aligned as {sources[start]}'s"
        for i, p in enumerate(parsed)
        if p is None
    ]
    vocabs = [vocab_of(p if p is not None else parsed[start]) for p in parsed]  # type: ignore[arg-type]
    out, folder = _output_tokenizer(spec, parsed, vocabs, sizes, start, index, roots)
    have = set(vocab_of(out))
    extra = []
    for rule in spec.tokens:  # tokens: entries the vocabulary lacks are added (add_tokens)
        if rule.token not in have:
            have.add(rule.token)
            extra.append(plain_token(rule.token))
    out = append_tokens(out, extra)
    on_disk = read_tokenizer(folder) or {}
    known = set(vocab_of(on_disk))
    new = [e for e in out.get("added_tokens") or [] if e["content"] not in known]
    files = output_files(folder, out if out != on_disk else None, new, chat_template)
    tokens = _by_id(vocab_of(out))
    row_map = _row_map(spec, tokens, vocabs, sizes, base, index, sources)
    notes.append(
        f"tokenizer {spec.source}: {len(tokens)} tokens, {row_map.n_out} embedding rows, aligned by "
        f"token string ({len(row_map.fills)} tokens missing from some input)"
    )
    identity = np.arange(row_map.n_out)[:, None]
    if all(r == row_map.n_out for r in vocab_rows) and not row_map.fills and (row_map.rows == identity).all():
        return None, files, notes  # one vocabulary everywhere: rows by index, bytes as they are
    return row_map, files, notes


def _has_slow(root: Path) -> bool:
    return any((root / name).is_file() for name in SLOW_FILES)


def _vocab_size(ckpt: Checkpoint, rows: int) -> int:
    """mergekit's vocab_size: config.json's, else the embedding's rows."""
    size = (ckpt.config() or {}).get("vocab_size")
    return int(size) if isinstance(size, int) and size > 0 else rows


def _output_tokenizer(
    spec: TokenizerSpec,
    parsed: list[dict | None],
    vocabs: list[dict[str, int]],
    sizes: list[int],
    start: int,
    index: dict[str, int],
    roots: list[Path],
) -> tuple[dict, Path]:
    """The output's tokenizer.json (before ``tokens:`` additions) and the folder its other
    tokenizer files come from."""
    if spec.source == "base":
        return parsed[start], roots[start]  # type: ignore[return-value]
    if spec.source != "union":
        i = index.get(spec.source)
        folder = Path(spec.source) if i is None else roots[i]
        data = read_tokenizer(folder) if i is None else parsed[i]
        if data is None:
            raise PlanError(
                [f"tokenizer source {spec.source} has no tokenizer.json"],
                hint="name an input (or a local folder) with a fast tokenizer",
            )
        return data, folder
    base_vocab = vocabs[start]
    plain: dict[str, None] = {}
    added: dict[str, dict] = {}
    order = [start] + [i for i in range(len(parsed)) if i != start]
    for i in order:
        data = parsed[i]
        if data is None:
            continue
        entries = sorted(data.get("added_tokens") or [], key=lambda a: a["id"])
        for token in _by_id(vocabs[i])[: sizes[i]]:
            if token is not None and token not in base_vocab:
                plain.setdefault(token, None)
        for entry in entries:
            if entry["id"] < sizes[i]:
                added.setdefault(entry["content"], added_entry(entry))
    new = [plain_token(t) for t in plain if t not in added]
    new += [e for t, e in added.items() if t not in base_vocab]
    return append_tokens(parsed[start], new), roots[start]  # type: ignore[arg-type]


def _by_id(vocab: dict[str, int]) -> list[str | None]:
    """Tokens by id; ids must be 0..n-1 (an output row per token)."""
    n = max(vocab.values(), default=-1) + 1
    tokens: list[str | None] = [None] * n
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def _row_map(
    spec: TokenizerSpec,
    tokens: list[str | None],
    vocabs: list[dict[str, int]],
    sizes: list[int],
    base: int | None,
    index: dict[str, int],
    sources: list[str],
) -> RowMap:
    n_vocab = len(tokens)
    if any(t is None for t in tokens):
        raise PlanError(
            [f"the output tokenizer skips ids (no token for id {tokens.index(None)})"],
            hint="every id below the vocabulary size must name a token",
        )
    pad = spec.pad_to_multiple_of
    n_out = math.ceil(n_vocab / pad) * pad if pad else n_vocab
    n_in = len(vocabs)
    rows = np.full((n_out, n_in), -1, np.int64)
    for i, (vocab, size) in enumerate(zip(vocabs, sizes)):
        for r, token in enumerate(tokens):
            j = vocab.get(token, -1)  # type: ignore[arg-type]
            rows[r, i] = j if 0 <= j < size else -1
    rules = {r.token: r for r in spec.tokens}
    fills: dict[int, tuple[tuple[int, int], ...]] = {}
    problems: list[str] = []
    for r, token in enumerate(tokens):
        rule = rules.get(token)  # type: ignore[arg-type]
        if rule is not None and rule.force:
            rows[r] = -1
        present = [i for i in range(n_in) if rows[r, i] >= 0]
        if len(present) == n_in:
            continue
        if rule is not None:
            fills[r] = _rule_rows(rule, vocabs, sizes, index, sources, problems)
        else:  # the only input that has it, else the base's row, else the mean (none: zeros)
            donor = present[0] if len(present) == 1 else base if base in present else None
            chosen = [donor] if donor is not None else present
            fills[r] = tuple((i, int(rows[r, i])) for i in chosen)
    if problems:
        raise PlanError(problems, hint="a token's source model must have that token (or token id)")
    return RowMap(rows, np.full(n_out, COMBINE, np.int8), (), fills, n_vocab if n_out > n_vocab else None)


def _rule_rows(
    rule: TokenRule,
    vocabs: list[dict[str, int]],
    sizes: list[int],
    index: dict[str, int],
    sources: list[str],
    problems: list[str],
) -> tuple[tuple[int, int], ...]:
    """The default row a ``tokens:`` entry names: () for zeros, else one (input, row)."""
    src = rule.source
    if src.kind == "zero":
        return ()
    m = index[src.model]  # type: ignore[index]
    if src.kind == "model":
        row = int(vocabs[m].get(rule.token, -1))
        what = f"token {rule.token!r}"
    elif src.token_id is not None:
        row, what = src.token_id, f"token id {src.token_id}"
    else:
        row, what = int(vocabs[m].get(src.token, -1)), f"token {src.token!r}"  # type: ignore[arg-type]
    if not 0 <= row < sizes[m]:
        problems.append(f"tokenizer: tokens[{rule.token!r}] takes {what} of {sources[m]}, which it lacks")
        return ()
    return ((m, row),)
