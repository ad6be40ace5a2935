"""Run a Hugging Face causal LM block by block, one decoder block's weights resident at a time.

The model is built from its config with every parameter on torch's ``meta`` device (no memory);
buffers stay real, so rotary tables and the like are computed as usual. Only the modules outside
the blocks (embeddings, ...) are loaded up front, from the checkpoint's safetensors files (mmap).

Pass 1 runs the model's own forward on each text with every block replaced by a recorder: it keeps
the hidden state entering block 0 and the arguments the model gives each block (attention masks,
rotary embeddings, position ids), then stops before the final norm. This is what makes the runner
architecture-agnostic: masks and position encodings are built by the model's code, not ours.
Pass 2 walks the blocks: load block i, run it on every text's hidden state (carried over from block
i - 1) with the recorded arguments, hand the block to the caller's hooks, release its weights.
Peak memory is one block plus the hidden states of all texts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgery.checkpoint import Checkpoint
from surgery.errors import IncompatibleTensorsError, MissingTensorError, RecipeError
from surgery.names import place


@dataclass(frozen=True)
class Blocks:
    """The model's decoder blocks: the ModuleList and its dotted name (``model.layers``)."""

    prefix: str
    layers: nn.ModuleList


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward (final norm, head) is not needed."""


class _Recorder(nn.Module):
    def __init__(self, sink: list, index: int, last: bool) -> None:
        super().__init__()
        self.sink, self.index, self.last = sink, index, last

    def forward(self, *args, **kwargs):
        hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        self.sink[self.index] = (args, kwargs)
        if self.index == 0:
            self.sink.append(hidden)
        if self.last:
            raise _Stop
        return hidden


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(root: Path) -> nn.Module:
    """The causal LM of ``root/config.json`` with parameters on meta, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(root, local_files_only=True)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def find_blocks(model: nn.Module) -> Blocks:
    """The ModuleList holding the decoder blocks (names.place says its children are blocks)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and place(f"{name}.0.x").block == 0:
            return Blocks(name, module)
    raise RecipeError(
        f"cannot find the decoder blocks of {type(model).__name__}",
        hint="calibration merges support decoder-only transformers models (Llama, GPT-2, ...)",
    )


class WeightSource:
    """Reads a module's parameters from a checkpoint as float32 tensors (safetensors mmap)."""

    def __init__(self, ckpt: Checkpoint, prefixes: Sequence[str] = ("",)) -> None:
        self.ckpt = ckpt
        self.prefixes = prefixes  # model names may carry a prefix the file lacks (or vice versa)

    def name_of(self, name: str) -> str | None:
        for cand in (name, *(name.removeprefix(p) for p in self.prefixes if p and name.startswith(p))):
            if cand in self.ckpt.tensors:
                return cand
        return None

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self.name_of(name)
        if key is None:
            raise MissingTensorError(
                f"tensor {name!r} is not in checkpoint {self.ckpt.source}",
                hint="the checkpoint does not match its config.json",
                tensor=name,
            )
        with safe_open(self.ckpt.info(key).path, framework="pt") as f:
            return f.get_tensor(key).to(torch.float32)

    def load(self, module: nn.Module, prefix: str, *, skip_missing: bool = False) -> None:
        """Give every meta parameter of ``module`` (named ``prefix.<name>``) its checkpoint values."""
        for pname, param in list(module.named_parameters(recurse=True)):
            full = f"{prefix}.{pname}" if prefix else pname
            if skip_missing and self.name_of(full) is None:
                continue
            value = self.tensor(full)
            if tuple(value.shape) != tuple(param.shape):
                raise IncompatibleTensorsError(
                    f"{full}: checkpoint shape {tuple(value.shape)}, config says {tuple(param.shape)}",
                    hint="the checkpoint does not match its config.json",
                )
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def release(module: nn.Module) -> None:
    """Send a module's parameters back to meta (frees their memory)."""
    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)


@torch.no_grad()
def run_blocks(
    root: Path,
    ckpt: Checkpoint,
    token_ids: Sequence[torch.Tensor],
    on_block: Callable[[int, str, nn.Module], Callable[[], None]],
) -> None:
    """Run every text (``[1, seq]`` token ids) through the model block by block.

    ``on_block(i, prefix, block)`` is called with block i loaded, before the texts run through it;
    it installs its hooks and returns a function that removes them (called after the last text).
    """
    model = empty_model(root)
    blocks = find_blocks(model)
    source = WeightSource(ckpt, prefixes=(f"{model.base_model_prefix}.",))
    head = model.get_output_embeddings()
    for name, module in model.named_children():
        _load_outside(source, module, name, blocks.prefix, head)
    n = len(blocks.layers)
    originals = list(blocks.layers)
    states: list[torch.Tensor] = []
    calls: list[list] = []
    try:
        for i in range(n):
            blocks.layers[i] = _Recorder([None] * n, i, i == n - 1)
        for ids in token_ids:
            sink: list = [None] * n
            for i in range(n):
                blocks.layers[i].sink = sink
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
            states.append(sink.pop())
            calls.append(sink)
    finally:
        for i, layer in enumerate(originals):
            blocks.layers[i] = layer
    for i, block in enumerate(originals):
        prefix = f"{blocks.prefix}.{i}"
        source.load(block, prefix)
        remove = on_block(i, prefix, block)
        try:
            for k, hidden in enumerate(states):
                args, kwargs = calls[k][i]
                out = block(hidden, *args, **kwargs)
                states[k] = out[0] if isinstance(out, tuple) else out
        finally:
            remove()
            release(block)


def _load_outside(source: WeightSource, module: nn.Module, name: str, blocks: str, head) -> None:
    """Load the parameters of ``module`` that sit outside the blocks (the head is never run)."""
    if module is head or name == blocks:
        return
    if blocks.startswith(name + "."):
        for child_name, child in module.named_children():
            _load_outside(source, child, f"{name}.{child_name}", blocks, head)
        for leaf, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[leaf] = nn.Parameter(source.tensor(f"{name}.{leaf}"), requires_grad=False)
        return
    source.load(module, name, skip_missing=False)
