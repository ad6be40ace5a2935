"""The output's tokenizer as data: what a recipe says about it, and the files that carry it.

A recipe's ``tokenizer:`` block (``TokenizerSpec``) asks for an output vocabulary other than the
base's as is: the base's (``base``, with tokens past its embedding removed), another input's, or the
union of every input's (mergekit's ``tokenizer_source`` / ``tokenizer:`` semantics; the row rule is in
``vocab_union``). This module reads and edits ``tokenizer.json`` / ``tokenizer_config.json`` as JSON,
without ``transformers``: tokens are appended as added tokens (what ``tokenizer.add_tokens`` does), and
a chat template is written as ``chat_template.jinja`` (what ``save_pretrained`` writes in
transformers 5), taking precedence over a ``chat_template`` key, which is removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import RecipeError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# Files of the slow tokenizers (and the legacy added-tokens list): stale once tokenizer.json is
# edited, so an output with an edited vocabulary does not carry them.
SLOW_FILES = (
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
)  # fmt: skip
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", CHAT_TEMPLATE) + SLOW_FILES
_KINDS = ("model", "model_token", "zero")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: a model's row of the same token (``model``), a model's row of
    another token or id (``model_token``), or zeros (``zero``)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    def to_dict(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.model is not None:
            out["model"] = self.model
        if self.token is not None:
            out["token"] = self.token
        if self.token_id is not None:
            out["token_id"] = self.token_id
        return out


@dataclass(frozen=True)
class TokenRule:
    """One entry of ``tokens:``: the token (added to the vocabulary if new), its row's source, and
    ``force`` (use the source even in inputs that have the token)."""

    token: str
    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: ``source`` is ``base``, ``union`` or one input (its path); ``base`` is
    the input whose vocabulary a union starts from and whose row a token missing elsewhere takes
    (mergekit's base_model; None: the first input starts the union and shared rows are averaged)."""

    source: str
    base: str | None = None
    tokens: tuple[TokenRule, ...] = ()
    pad_to_multiple_of: int | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "base": self.base,
            "tokens": {r.token: {"source": r.source.to_dict(), "force": r.force} for r in self.tokens},
            "pad_to_multiple_of": self.pad_to_multiple_of,
        }

    def models(self) -> list[str]:
        """Every model path the spec names (each must be an input, ``source`` may be a folder)."""
        named = [self.base] + [r.source.model for r in self.tokens]
        return [m for m in named if m is not None]


def tokenizer_spec(data: object, path_of=lambda p: p) -> TokenizerSpec:
    """Check a recipe's ``tokenizer:`` mapping (or re-check a spec); ``path_of`` turns a model path as
    written into the recipe's form (absolute)."""
    if isinstance(data, TokenizerSpec):
        data = data.to_dict()
    if not isinstance(data, dict) or not data.get("source"):
        raise RecipeError(
            "tokenizer: must be a mapping with 'source' (base, union or a model path)",
            hint="for example tokenizer: {source: union}",
        )
    extra = sorted(set(data) - {"source", "base", "tokens", "pad_to_multiple_of"})
    if extra:
        raise RecipeError(
            f"tokenizer: unknown key(s) {', '.join(extra)}",
            hint="its keys: source, base, tokens, pad_to_multiple_of",
        )
    source = str(data["source"])
    if source not in ("base", "union"):
        source = path_of(source)
    pad = data.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"tokenizer: pad_to_multiple_of must be a positive integer, not {pad!r}")
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise RecipeError("tokenizer: tokens must map token strings to {source: ..., force: ...}")
    rules = tuple(_token_rule(str(t), cfg, path_of) for t, cfg in tokens.items())
    base = path_of(str(data["base"])) if data.get("base") else None
    return TokenizerSpec(source, base, rules, pad)


def check_chat_template(template: object) -> str | None:
    """A recipe's ``chat_template``: Jinja text (names are resolved when a mergekit config is read)."""
    if template is None:
        return None
    if not isinstance(template, str) or "{" not in template:
        raise RecipeError(
            "chat_template must be Jinja text (a named template is resolved when a mergekit config is read)",
            hint='for example chat_template: "{% for m in messages %}...{% endfor %}"',
        )
    return template


def _token_rule(token: str, cfg: object, path_of) -> TokenRule:
    where = f"tokenizer: tokens[{token!r}]"
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        raise RecipeError(f"{where} must be {{source: ..., force: true|false}}")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force must be true or false")
    source = cfg.get("source")
    if source is None:
        raise RecipeError(
            f"{where} has no source",
            hint="give source: MODEL, {kind: zero} or {kind: model_token, model: MODEL, token: TEXT}",
        )
    if isinstance(source, str):
        return TokenRule(token, TokenSource("model", path_of(source)), force)
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind not in _KINDS or set(source) - {"kind", "model", "token", "token_id"}:
        raise RecipeError(f"{where}.source must be a model path or a mapping with kind: {', '.join(_KINDS)}")
    if kind == "zero":
        return TokenRule(token, TokenSource("zero"), force)
    if not source.get("model"):
        raise RecipeError(f"{where}.source needs a model")
    token_id = source.get("token_id")
    if kind == "model_token" and (source.get("token") is None) == (token_id is None):
        raise RecipeError(f"{where}.source needs exactly one of token or token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise RecipeError(f"{where}.source token_id must be a non-negative integer")
    src_token = str(source["token"]) if source.get("token") is not None else None
    return TokenRule(token, TokenSource(kind, path_of(str(source["model"])), src_token, token_id), force)


# -- tokenizer.json ------------------------------------------------------------------------------------
def read_tokenizer(folder: Path) -> dict | None:
    """The parsed tokenizer.json of a folder, or None when it has none."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is not valid JSON: {exc}", hint="re-save the tokenizer") from None


def strip_unused(tokenizer: dict, vocab_size: int, where: str) -> dict:
    """mergekit's stripped tokenizer: tokens with an id past the embedding (>= vocab_size) removed,
    with the BPE merges that involve them (as parts, or, which mergekit misses and the tokenizers
    library then refuses to load, as the result). Only BPE vocabularies can be stripped (as in
    mergekit)."""
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab") or {}
    added = tokenizer.get("added_tokens") or []
    unused = {t for t, i in (vocab.items() if isinstance(vocab, dict) else []) if i >= vocab_size}
    unused |= {a["content"] for a in added if a["id"] >= vocab_size}
    if isinstance(vocab, list) and len(vocab) > vocab_size:
        unused.add("")  # forces the refusal below
    if not unused:
        return tokenizer
    if model.get("type") != "BPE":
        raise RecipeError(
            f"the tokenizer of {where} has tokens past its embedding ({vocab_size} rows) and is "
            f"{model.get('type')}: only BPE tokenizers can be trimmed (as in mergekit)",
            hint="resize the model's embeddings to its tokenizer, or choose another tokenizer source",
        )
    out = json.loads(json.dumps(tokenizer))
    out["added_tokens"] = [a for a in added if a["id"] < vocab_size]
    out["model"]["vocab"] = {t: i for t, i in vocab.items() if t not in unused}

    def keep(merge: object) -> bool:  # mergekit checks the two parts; a merge into a removed token
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)  # type: ignore[arg-type]
        return not any(p in unused for p in parts + ["".join(parts)])  # would not load: dropped too

    out["model"]["merges"] = [m for m in model.get("merges") or [] if keep(m)]
    return out


def append_tokens(tokenizer: dict, entries: list[dict]) -> dict:
    """``tokenizer`` with ``entries`` (added-token settings without ids) appended as added tokens,
    numbered from the next free id, as ``add_tokens`` numbers them."""
    if not entries:
        return tokenizer
    out = json.loads(json.dumps(tokenizer))
    vocab = (out.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
    ids += [a["id"] for a in out.get("added_tokens") or []]
    next_id = max(ids, default=-1) + 1
    added = out.setdefault("added_tokens", [])
    for entry in entries:
        added.append({"id": next_id, **entry})
        next_id += 1
    return out


def plain_token(content: str) -> dict:
    """What ``tokenizer.add_tokens("text")`` records: a non-special, normalized added token."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}  # fmt: skip


def added_entry(entry: dict) -> dict:
    """An added token's settings as ``tokenizer.json`` lists them, without its id."""
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return {k: entry.get(k, plain_token(entry["content"])[k]) for k in keys}


def output_files(
    folder: Path, tokenizer: dict | None, new: list[dict], chat_template: str | None
) -> dict[str, bytes | None]:
    """Every tokenizer file of the output, from the tokenizer ``folder``: an edited ``tokenizer``
    (None: as is), ``new`` added-token entries (with ids) mirrored in tokenizer_config.json's
    added_tokens_decoder when it keeps one, and the chat template. None marks a file to leave out."""
    files: dict[str, bytes | None] = {name: None for name in TOKENIZER_FILES}
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and not (tokenizer is not None and name in SLOW_FILES):
            files[name] = (folder / name).read_bytes()
    if tokenizer is not None:
        files[TOKENIZER_JSON] = (json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n").encode()
    config_bytes = files[TOKENIZER_CONFIG]
    if config_bytes is not None and (new or chat_template is not None):
        config = json.loads(config_bytes)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in new:
                decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        if chat_template is not None:
            config.pop("chat_template", None)
        files[TOKENIZER_CONFIG] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    if chat_template is not None:
        files[CHAT_TEMPLATE] = chat_template.encode()
    return files


def chat_template_of(folder: Path) -> str | None:
    """A folder's chat template as transformers reads it: chat_template.jinja, else the
    ``chat_template`` key of tokenizer_config.json (a list of named templates: the default one)."""
    jinja = folder / CHAT_TEMPLATE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
