"""Layer slices of a merge: which input tensor each output tensor is merged from.

A recipe's ``layer_slices`` (mergekit's ``slices:`` for a merging method) lists, per output slice,
one block range [start, end) per input in engine order (base first); the ranges of a slice have one
length. Output block j of slice s reads block ``start_i + (j - first output block of s)`` of input
i, so ``[[0, 8], [4, 12]]`` merges A's blocks 0..7 with B's blocks 4..11 into output blocks 0..7.
Embeddings (names before the blocks) and the final norm / head (after) keep their names in every
input, as in mergekit. A slice may merge other models than the recipe's (``inputs``, the same
number in the same roles): they are opened as extra plan inputs. The result is plan data: per
output tensor, the name read from each input (``TensorJob.sources``) and the plan inputs read
(``TensorJob.inputs``); the engine only reads what the job names.

``layer_count_updates`` is shared with passthrough's stacks: the output's config.json block count
and per-layer lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.errors import PlanError, RecipeError
from surgery.names import layer_map, natural_key, with_block

Ranges = tuple[tuple[int, int], ...]  # one [start, end) per input


@dataclass(frozen=True)
class LayerSlice:
    """One output slice: each input's block range; ``inputs`` (engine order, base first) when the
    slice merges other models than the recipe's (mergekit: a different model per slice)."""

    ranges: Ranges
    inputs: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        out: dict = {"ranges": [list(r) for r in self.ranges]}
        return out | ({"inputs": list(self.inputs)} if self.inputs else {})


def check_layer_slices(value: object, inputs: tuple[str, ...], locate) -> tuple[LayerSlice, ...]:
    """``[{ranges: [[a0, b0], ...], inputs: [PATH, ...]}, ...]``: one range (and, optionally, one
    model) per input, equal lengths; ``locate`` turns a written path into the one the recipe keeps."""
    if not value:
        return ()
    if not isinstance(value, list | tuple):
        raise RecipeError("layer_slices must be a list of {ranges: [[START, END], ...]}")
    out = []
    for i, entry in enumerate(value):
        try:
            ranges = tuple((int(a), int(b)) for a, b in entry["ranges"])
            given = entry.get("inputs")
            models = None if given is None else tuple(locate(str(m)) for m in given)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RecipeError(
                f"layer_slices[{i}] must be {{ranges: [[START, END], ...], inputs: [PATH, ...]}}",
                hint="one range (and optionally one model) per input, in engine order: the base first",
            ) from None
        for what, count in (("ranges", len(ranges)), ("inputs", len(models or inputs))):
            if count != len(inputs):
                raise RecipeError(f"layer_slices[{i}] has {count} {what} for {len(inputs)} inputs",
                                  hint="one per input, the base first")  # fmt: skip
        if any(not 0 <= a < b for a, b in ranges) or len({b - a for a, b in ranges}) != 1:
            raise RecipeError(f"layer_slices[{i}]: ranges {[list(r) for r in ranges]} must be [start, end) "
                              "with 0 <= start < end, all of one length")  # fmt: skip
        out.append(LayerSlice(ranges, None if models == tuple(inputs) else models))
    return tuple(out)


def extra_inputs(inputs: tuple[str, ...], slices: tuple[LayerSlice, ...]) -> list[str]:
    """Models the slices merge that are not among the recipe's inputs, each once, in order."""
    extra: list[str] = []
    for s in slices:
        extra += [m for m in s.inputs or () if m not in inputs and m not in extra]
    return extra


Pick = tuple[str, tuple[str, ...], tuple[int, ...]]  # output name, name read per input, plan inputs


def slice_picks(slices: tuple[LayerSlice, ...], inputs: list, sources: list[str]) -> tuple[list[Pick], dict]:
    """(output name, the tensor read from each input, the plan inputs read) for every output tensor,
    and the config.json updates (block count, per-layer lists as the first input's ranges give
    them). ``inputs`` are the plan's opened inputs, ``sources`` their paths (the recipe's, then the
    slices' own). Embeddings come from the first slice's inputs, final norm and head from the last's
    (as mergekit). Ranges past an input's last block are errors naming the slice."""
    n = len(slices[0].ranges)
    order = [tuple(sources.index(m) for m in s.inputs) if s.inputs else tuple(range(n)) for s in slices]
    maps = [layer_map(list(c.tensors), c.config()) for c in inputs]
    problems = [
        f"layer_slices[{k}]: layers [{a}, {b}) but {inputs[i].source} has {maps[i].num_blocks} blocks"
        for k, (s, idx) in enumerate(zip(slices, order))
        for i, (a, b) in zip(idx, s.ranges)
        if b > maps[i].num_blocks
    ]
    if problems:
        raise PlanError(problems, hint="layer ranges are [start, end) block indices of each input")

    def outside(idx: tuple[int, ...], where: tuple[str, ...]) -> list[Pick]:
        names = sorted(inputs[idx[0]].tensors, key=natural_key)
        return [(m, (m,) * n, idx) for m in names if maps[idx[0]].placements[m].position in where]

    picks = outside(order[0], ("before",))
    out_block = 0
    for s, idx in zip(slices, order):
        first = maps[idx[0]].placements
        names = sorted(inputs[idx[0]].tensors, key=natural_key)
        for offset in range(s.ranges[0][1] - s.ranges[0][0]):
            for name in names:
                if first[name].block == s.ranges[0][0] + offset:
                    read = tuple(with_block(name, a + offset) for a, _ in s.ranges)
                    picks.append((with_block(name, out_block), read, idx))
            out_block += 1
    picks += outside(order[-1], ("after", "unknown"))
    config = inputs[order[0][0]].config()
    parts = [(inputs[idx[0]].config(), s.ranges[0][0], s.ranges[0][1]) for s, idx in zip(slices, order)]
    return picks, layer_count_updates(config, parts)


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
