"""Layer slices of a merge: which input tensor each output tensor is merged from.

A recipe's ``layer_slices`` (mergekit's ``slices:`` for a merging method) lists, per output slice,
one block range [start, end) per input in engine order (base first); the ranges of a slice have one
length. Output block j of slice s reads block ``start_i + (j - first output block of s)`` of input
i, so ``[[0, 8], [4, 12]]`` merges A's blocks 0..7 with B's blocks 4..11 into output blocks 0..7.
Embeddings (names before the blocks) and the final norm / head (after) keep their names in every
input, as in mergekit. The result is plan data: per output tensor, the name read from each input
(``TensorJob.sources``); the engine only reads what the job names.

``layer_count_updates`` is shared with passthrough's stacks: the output's config.json block count
and per-layer lists.
"""

from __future__ import annotations

from surgery.errors import PlanError, RecipeError
from surgery.names import layer_map, natural_key, with_block

Ranges = tuple[tuple[int, int], ...]  # one [start, end) per input


def check_layer_slices(value: object, n_inputs: int) -> tuple[Ranges, ...]:
    """``[{ranges: [[a0, b0], [a1, b1], ...]}, ...]``: one range per input, equal lengths."""
    if not value:
        return ()
    if not isinstance(value, list | tuple):
        raise RecipeError("layer_slices must be a list of {ranges: [[START, END], ...]}")
    out = []
    for i, entry in enumerate(value):
        try:
            ranges = tuple((int(a), int(b)) for a, b in entry["ranges"])
        except (KeyError, TypeError, ValueError):
            raise RecipeError(
                f"layer_slices[{i}] must be {{ranges: [[START, END], ...]}} (one range per input)",
                hint="inputs in engine order: the base first, then the models",
            ) from None
        if len(ranges) != n_inputs:
            raise RecipeError(f"layer_slices[{i}] has {len(ranges)} ranges for {n_inputs} inputs",
                              hint="one [start, end) per input, the base first")  # fmt: skip
        if any(not 0 <= a < b for a, b in ranges) or len({b - a for a, b in ranges}) != 1:
            raise RecipeError(f"layer_slices[{i}]: ranges {[list(r) for r in ranges]} must be [start, end) "
                              "with 0 <= start < end, all of one length")  # fmt: skip
        out.append(ranges)
    return tuple(out)


def slice_picks(slices: tuple[Ranges, ...], inputs: list) -> tuple[list[tuple[str, tuple[str, ...]]], dict]:
    """(output name, the tensor read from each input) for every output tensor, and the config.json
    updates (block count, per-layer lists as input 0's ranges give them). Ranges past an input's
    last block are errors naming the slice."""
    maps = [layer_map(list(c.tensors), c.config()) for c in inputs]
    problems = [
        f"layer_slices[{s}]: layers [{a}, {b}) but {inputs[i].source} has {maps[i].num_blocks} blocks"
        for s, ranges in enumerate(slices)
        for i, (a, b) in enumerate(ranges)
        if b > maps[i].num_blocks
    ]
    if problems:
        raise PlanError(problems, hint="layer ranges are [start, end) block indices of each input")
    names = sorted(inputs[0].tensors, key=natural_key)
    placements = maps[0].placements
    n = len(inputs)
    picks = [(name, (name,) * n) for name in names if placements[name].position == "before"]
    out_block = 0
    for ranges in slices:
        for offset in range(ranges[0][1] - ranges[0][0]):
            for name in names:
                if placements[name].block == ranges[0][0] + offset:
                    sources = tuple(with_block(name, a + offset) for a, _ in ranges)
                    picks.append((with_block(name, out_block), sources))
            out_block += 1
    picks += [(name, (name,) * n) for name in names if placements[name].position in ("after", "unknown")]
    config = inputs[0].config()
    updates = layer_count_updates(config, [(config, r[0][0], r[0][1]) for r in slices])
    return picks, updates


def layer_count_updates(config: dict | None, parts: list[tuple[dict | None, int, int]]) -> dict:
    """num_hidden_layers (or the config's own key) = the stacked block count; per-layer lists such as
    layer_types are stacked the same way."""
    if config is None:
        return {}
    total = sum(b - a for _, a, b in parts)
    updates: dict = {
        k: total for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in config
    }
    for key, value in config.items():
        if (
            isinstance(value, list)
            and key != "architectures"
            and len(value) == config.get("num_hidden_layers")
        ):
            sources = [(c or {}).get(key) for c, _, _ in parts]
            if all(isinstance(v, list) for v in sources):
                updates[key] = [x for v, (_, a, b) in zip(sources, parts) for x in v[a:b]]
    return updates
