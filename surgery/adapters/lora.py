"""Where each tensor of a PEFT LoRA adapter lands in its base checkpoint, and its update by rows.

Every adapted weight W (stored m x n, as in the checkpoint) changes by ``scaling * L @ R`` with
L (m x r) and R (r x n) taken from the adapter file:

    nn.Linear   W is out x in     L = lora_B,    R = lora_A
    Conv1D      W is in x out     L = lora_A^T,  R = lora_B^T     (GPT-2; peft's fan_in_fan_out)
    Embedding   W is vocab x dim  L = lora_embedding_A^T,  R = lora_embedding_B^T
    lora_bias   b (m,)            L = lora_B.bias,  R = [[1]]

so rows i0..i1 of the update need rows i0..i1 of L and all of R: a tensor's update is computed a block
of rows at a time, and no more than ``BLOCK_ELEMENTS`` of it ever exists at once.

Any other tensor in the file (``modules_to_save`` copies, the embedding layers peft saves beside an
embedding LoRA) replaces the base tensor of the same name, as it does when peft loads it; a low-rank
update of that tensor then applies on top of the replacement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from surgery.adapters.peft_config import CONFIG_NAME, LoraSettings
from surgery.errors import MissingTensorError

PREFIX = "base_model.model."
BLOCK_ELEMENTS = 1 << 20  # elements of update computed at once (8 MiB of float64 products)

_LORA = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


@dataclass(frozen=True)
class LowRankUpdate:
    """tau of checkpoint tensor ``tensor`` = scaling * L @ R (see the module docstring for L, R)."""

    tensor: str
    module: str  # the module's name in the PEFT model (what target_modules and rank_pattern match)
    kind: str  # "linear", "conv1d", "embedding", "bias"
    a: str  # adapter tensor names
    b: str
    rank: int
    scaling: float

    @property
    def round_first(self) -> bool:
        """peft adds an embedding's delta after casting it to the weight's dtype; a linear's before."""
        return self.kind == "embedding"


@dataclass(frozen=True)
class AdapterLayout:
    """Every base tensor an adapter changes: low-rank updates and whole replacements."""

    settings: LoraSettings
    updates: dict[str, LowRankUpdate]
    replaced: dict[str, str]  # checkpoint name -> adapter tensor name

    def effective_ranks(self) -> dict[str, int]:
        return {name: u.rank for name, u in self.updates.items()}


def map_adapter(settings: LoraSettings, adapter_shapes: dict[str, tuple[int, ...]],
                base_shapes: dict[str, tuple[int, ...]], source: str) -> AdapterLayout:  # fmt: skip
    """Map every adapter key onto a base tensor; every key that maps nowhere is an error that names it."""
    problems: list[str] = []
    pairs: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in sorted(adapter_shapes):
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LORA.match(name)
        if m is None:  # a whole tensor: modules_to_save, or a saved (resized) embedding layer
            plain = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            target = checkpoint_name(plain, base_shapes)
            if target is None:
                problems.append(f"adapter tensor {key!r} maps to no base tensor (looked for {plain!r})")
            elif tuple(adapter_shapes[key]) != base_shapes[target]:
                problems.append(f"adapter tensor {key!r} has shape {list(adapter_shapes[key])} but base "
                                f"tensor {target!r} has {list(base_shapes[target])}")  # fmt: skip
            else:
                replaced[target] = key
            continue
        pairs.setdefault(m["module"], {})[m["part"]] = key
    updates: dict[str, LowRankUpdate] = {}
    for module, parts in pairs.items():
        try:
            for update in _updates(settings, module, parts, adapter_shapes, base_shapes):
                updates[update.tensor] = update
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise MissingTensorError(
            f"adapter {source} does not fit its base ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems[:50]),
            hint="pass the base the adapter was trained on (--base), or check the adapter's "
            f"{CONFIG_NAME} and key names",
            path=source,
        )
    return AdapterLayout(settings, updates, replaced)


def checkpoint_name(peft_name: str, base_shapes: dict) -> str | None:
    """The checkpoint's name for a tensor named in the PEFT model: the same name, or the name without
    the task head's wrapper (``transformer.h.0...`` in GPT-2 checkpoints saved as ``h.0...``), or with
    ``model.`` (an adapter trained on the bare ``LlamaModel``)."""
    candidates = [peft_name, "model." + peft_name]
    if "." in peft_name:
        candidates.insert(1, peft_name.split(".", 1)[1])
    return next((c for c in candidates if c in base_shapes), None)


def _updates(settings: LoraSettings, module: str, parts: dict[str, str], adapter_shapes: dict,
             base_shapes: dict) -> list[LowRankUpdate]:  # fmt: skip
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_key is None or b_key is None:
        raise ValueError(
            f"adapter module {module!r} has only {sorted(parts)}: lora_A and lora_B come in pairs"
        )
    if not settings.targets(module):
        raise ValueError(
            f"adapter module {module!r} is not targeted by {CONFIG_NAME} (target_modules / "
            "layers_to_transform / exclude_modules): peft would ignore its weights"
        )
    rank, _ = settings.rank_and_alpha(module)
    scaling = settings.scaling(module)
    a, b = tuple(adapter_shapes[a_key]), tuple(adapter_shapes[b_key])
    if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
        raise ValueError(f"adapter module {module!r} has lora_A {list(a)} and lora_B {list(b)}, "
                         f"not rank {rank} as {CONFIG_NAME} says")  # fmt: skip
    tensor = checkpoint_name(module + ".weight", base_shapes)
    if tensor is None:
        raise ValueError(f"adapter module {module!r} maps to no base tensor (looked for {module}.weight)")
    shape = base_shapes[tensor]
    if embedding:
        kind, want = "embedding", (a[1], b[0])
    else:
        linear, conv = (b[0], a[1]), (a[1], b[0])  # peft picks by module class; shapes tell it here
        kind = "conv1d" if (settings.fan_in_fan_out and shape == conv) or shape != linear else "linear"
        want = conv if kind == "conv1d" else linear
    if shape != want:
        raise ValueError(f"adapter module {module!r} makes a {list(want)} update but base tensor "
                         f"{tensor!r} is {list(shape)}")  # fmt: skip
    out = [LowRankUpdate(tensor, module, kind, a_key, b_key, rank, scaling)]
    bias_key = parts.get("lora_B.bias")
    if bias_key is not None:
        bias = checkpoint_name(module + ".bias", base_shapes)
        if bias is None or base_shapes[bias] != (b[0],):  # lora_B is out x r for Linear and Conv1D
            raise ValueError(f"adapter tensor {bias_key!r} (lora_bias) maps to no base bias of {module!r}")
        out.append(LowRankUpdate(bias, module, "bias", bias_key, bias_key, rank, scaling))
    return out


def factors(update: LowRankUpdate, read) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) as float32 arrays; ``read(name)`` returns an adapter tensor as float32."""
    a, b = read(update.a), read(update.b)
    if update.kind == "linear":
        return b, a
    if update.kind == "bias":
        return a.reshape(-1, 1), np.ones((1, 1), np.float32)
    return a.T, b.T  # conv1d and embedding store the transpose of the linear layout


def update_rows(update: LowRankUpdate, left: np.ndarray, right: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of the update, float32: fl32(fl32(L @ R) * fl32(scaling)), as peft computes it.

    The products are summed in float64 and rounded once, so a row's values never depend on which
    other rows are computed with it (chunk size) or on BLAS blocking.
    """
    rows = np.matmul(left[r0:r1].astype(np.float64), right.astype(np.float64)).astype(np.float32)
    rows *= np.float32(update.scaling)
    return rows
