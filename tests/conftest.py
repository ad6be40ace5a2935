"""Shared fixtures: tiny safetensors checkpoints written directly, and a CLI runner.

Heavy imports (torch, safetensors, the CLI) happen inside the fixtures so that collecting a test file
that needs none of them stays cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# numba compiles the kernels once per cache folder; share it between test processes.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "numba-cache"))
# Tests never reach the real Hub: a Hub-like id that is not a local path fails fast instead of waiting on
# the network. The hub tests run their clients in child processes with their own environment.
os.environ["HF_HUB_OFFLINE"] = "1"

# Llama-like names and small shapes: enough for layer parsing, embeddings and a head.
TINY_SHAPES = {
    "model.embed_tokens.weight": (48, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.1.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (48, 16),
}


@pytest.fixture
def write_checkpoint():
    """``write(folder, tensors, config=None, base_model=None)``: one ``model.safetensors`` folder.

    ``base_model`` writes a README.md whose front matter names it (as a Hub model card does).
    """
    from safetensors.torch import save_file

    def write(folder: Path, tensors: dict, config: dict | None = None, base_model: str | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        if base_model is not None:
            (folder / "README.md").write_text(f"---\nbase_model: {base_model}\n---\n\n# a fine-tune\n")
        return folder

    return write


@pytest.fixture
def make_family(tmp_path):
    """``make(n_models=2, dtype=torch.float32, shapes=TINY_SHAPES, seed=0)`` -> (base, [fine-tunes]).

    Fine-tunes are the base plus small seeded perturbations; every folder has a Llama config.json.
    A thin wrapper over ``ckpt_factory.make_family`` (float tensors only).
    """
    import torch
    from ckpt_factory import make_family as write_family

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

    def make(
        n_models: int = 2, dtype=None, shapes: dict | None = None, seed: int = 0, root: Path | None = None
    ):
        dtype = dtype or torch.float32
        config = {"model_type": "llama", "num_hidden_layers": 2, "dtype": str(dtype).removeprefix("torch.")}
        return write_family(Path(root or tmp_path), n_models, names[dtype], seed, shapes=shapes or TINY_SHAPES,
                            int_buffer=False, config=config)  # fmt: skip

    return make


@pytest.fixture
def invoke():
    """``invoke(*args)`` runs the ``surgery`` command in-process; stderr is kept apart from stdout."""
    from click.testing import CliRunner
    from surgery_cli.main import cli

    def run(*args: object):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run
