"""Where a tensor sits in the network, from its name alone: one explicit rule set.

Block patterns (the first, outermost numbered block container in a name decides, so that
``layers.5.mlp.experts.0`` is block 5, never block 0):

    model.layers.N. / layers.N.   Llama, Mistral, Qwen, Gemma, Phi, MoE models, encoder.layers.N.
    h.N.                          GPT-2, GPT-J, Falcon, BLOOM
    encoder.layer.N. / layer.N.   BERT, RoBERTa
    block.N. / blocks.N.          T5, ViT-style codebases
    resblocks.N.                  CLIP

Names before the first block (embeddings) are ``before``; names that contain no block and are not
embeddings (final norm, lm_head, pooler) are ``after``. Anything else is ``unknown`` and reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")
_BEFORE = re.compile(
    r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|patch_embed|"
    r"class_embedding|positional_embedding|conv1|shared\.weight|pre_layrnorm|pre_layernorm|ln_pre)"
)
_AFTER = re.compile(
    r"(lm_head|(^|\.)norm\.|(^|\.)layernorm\.|final_layer_norm|final_layernorm|ln_f|ln_post|"
    r"post_layernorm|pooler|score|classifier|(^|\.)cls\.|(^|\.)head\.|output_layer|proj$|projection)"
)


@dataclass(frozen=True)
class Placement:
    position: str  # "block", "before", "after", "unknown"
    block: int | None = None


def place(name: str) -> Placement:
    """Block index of a tensor, or before/after the blocks, or unknown."""
    m = _BLOCK.search(name)
    if m:
        return Placement("block", int(m.group(1)))
    if _BEFORE.search(name):
        return Placement("before")
    if _AFTER.search(name):
        return Placement("after")
    return Placement("unknown")


@dataclass(frozen=True)
class LayerMap:
    placements: dict[str, Placement]
    num_blocks: int
    unknown: tuple[str, ...]
    config_layers: int | None  # num_hidden_layers / n_layer from config.json, when present

    @property
    def consistent(self) -> bool:
        return self.config_layers is None or self.config_layers == self.num_blocks


_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_map(names: list[str], config: dict | None = None) -> LayerMap:
    """Place every name; L = 1 + the largest block index (cross-checked with config.json)."""
    placements = {n: place(n) for n in names}
    blocks = [p.block for p in placements.values() if p.block is not None]
    config_layers = None
    for key in _CONFIG_KEYS:
        if config and isinstance(config.get(key), int):
            config_layers = config[key]
            break
    if config and config_layers is None and isinstance(config.get("text_config"), dict):
        return layer_map(names, config["text_config"])
    unknown = tuple(sorted(n for n, p in placements.items() if p.position == "unknown"))
    return LayerMap(placements, (max(blocks) + 1) if blocks else 0, unknown, config_layers)


def with_block(name: str, index: int) -> str:
    """The same tensor in block ``index``: ``model.layers.5.mlp.w`` -> ``model.layers.2.mlp.w``."""
    m = _BLOCK.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not inside a block")
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
