"""`surgery inspect`: what a checkpoint holds, from its headers and config alone."""

from __future__ import annotations

from collections import Counter

from surgery.inputs import InputOptions, open_input
from surgery.names import layer_map, natural_key


def describe(source: str, stream: bool = False) -> dict:
    """Files, counts, dtypes, layer placement and tied embeddings of a checkpoint. ``stream``: a Hub
    repo's weights are not downloaded, only their headers are read (one range request per file)."""
    with open_input(source, InputOptions(stream)) as ckpt:
        config = ckpt.config()
        names = list(ckpt.tensors)
        layers = layer_map(names, config)
        positions = Counter(p.position for p in layers.placements.values())
        has_head = any(n.endswith("lm_head.weight") for n in names)
        tied_cfg = (config or {}).get("tie_word_embeddings")
        return {
            "source": ckpt.source,
            "files": [p.name for p in ckpt.files],
            "tensors": len(names),
            "parameters": ckpt.num_parameters,
            "bytes": ckpt.total_bytes,
            "dtypes": dict(sorted(Counter(t.dtype.name for t in ckpt.tensors.values()).items())),
            "layers": {
                "num_blocks": layers.num_blocks,
                "config_layers": layers.config_layers,
                "consistent_with_config": layers.consistent,
                "before": positions.get("before", 0),
                "after": positions.get("after", 0),
                "unknown": list(layers.unknown),
                "block_of": {n: p.block for n, p in layers.placements.items() if p.block is not None},
                "placement": {
                    n: (str(p.block) if p.block is not None else p.position)
                    for n, p in sorted(layers.placements.items(), key=lambda kv: natural_key(kv[0]))
                },
            },
            # lm_head absent means the head reuses the input embeddings
            "tied_embeddings": (not has_head) if tied_cfg is None else bool(tied_cfg),
        }
