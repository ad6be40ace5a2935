"""A mergekit config's tokenizer, chat template and ``model+lora`` references, as recipe fields.

``tokenizer_source`` / ``tokenizer:`` become the recipe's ``tokenizer`` block (the row rule is
``surgery.vocab_union``), ``chat_template`` its Jinja text (``auto``: the template most inputs carry,
mergekit's plurality rule; ties go to the first in config order, where mergekit's order is a set's),
and every ``model+lora`` reference an adapter input with the model it is applied to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from surgery.chat_templates import resolve_chat_template
from surgery.mergekit.config import MergekitConfig, ModelRef
from surgery.tokenizer_files import chat_template_of


def recipe_extras(
    config: MergekitConfig, inputs: tuple[ModelRef, ...], root: Callable[[ModelRef], Path]
) -> dict:
    """``tokenizer``, ``chat_template`` and ``adapter_bases`` for ``make_recipe``. ``inputs``: the
    merged models (engine order); ``root``: a model's folder (tokenizer files)."""
    extras: dict = {"adapter_bases": {r.lora: r.source for r in inputs if r.lora}}
    if config.tokenizer_source is not None:
        extras["tokenizer"] = _tokenizer(config, inputs)
    if config.chat_template is not None:
        extras["chat_template"] = _chat_template(config, inputs, root)
    return extras


def _tokenizer(config: MergekitConfig, inputs: tuple[ModelRef, ...]) -> dict:
    by_text = {str(r): r.input for r in inputs}
    source = config.tokenizer_source
    if source not in ("base", "union"):
        source = by_text.get(source, source.split("+")[0])  # type: ignore[union-attr]
    base = config.base_model.input if config.base_model in inputs else None  # type: ignore[union-attr]
    tokens = {}
    for token, cfg in config.tokens:
        src = cfg["source"]
        if isinstance(src, ModelRef):
            src = {"kind": "model", "model": src.input}
        elif src.get("kind") == "model_token":
            src = {**src, "model": src["model"].input}
        tokens[token] = {"source": src, "force": cfg["force"]}
    return {"source": source, "base": base, "tokens": tokens, "pad_to_multiple_of": config.pad_to_multiple_of}


def _chat_template(
    config: MergekitConfig, inputs: tuple[ModelRef, ...], root: Callable[[ModelRef], Path]
) -> str | None:
    if config.chat_template != "auto":
        return resolve_chat_template(config.chat_template)  # type: ignore[arg-type]
    order = ([config.base_model] if config.base_model else []) + [r for r in inputs if r != config.base_model]
    templates = [t.strip() for t in (chat_template_of(root(r)) for r in order) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None
