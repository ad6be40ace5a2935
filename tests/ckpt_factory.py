"""Tiny checkpoints written directly with safetensors, and independent reference math.

The references here are deliberately written differently from the engine: whole tensors at once,
ranks by a full stable sort (not radix select), numpy instead of numba.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

INT_NAME = "model.rotary.inv_freq_ids"  # an integer buffer every family carries (copied, never merged)
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

SHAPES = {
    "model.embed_tokens.weight": (37, 12),
    "model.layers.0.self_attn.q_proj.weight": (12, 12),
    "model.layers.0.mlp.up_proj.weight": (24, 12),
    "model.layers.0.input_layernorm.weight": (12,),
    "model.layers.1.self_attn.q_proj.weight": (12, 12),
    "model.layers.1.mlp.up_proj.weight": (24, 12),
    "model.layers.1.input_layernorm.weight": (12,),
    "model.norm.weight": (12,),
    "lm_head.weight": (37, 12),
}


def make_family(
    root: Path,
    n_models: int = 2,
    dtype: str = "F32",
    seed: int = 0,
    update: float = 0.05,
    quantize: bool = False,
    shapes: dict | None = None,
    int_buffer: bool = True,
    config: dict | None = None,
) -> tuple[Path, list[Path]]:
    """Write base + n fine-tunes (base + small updates) as single-file checkpoints, each with
    ``config`` as its config.json (default: 2 layers, float32) and, with ``int_buffer``, an integer
    tensor every input shares."""
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    if int_buffer:
        base[INT_NAME] = torch.arange(6, dtype=torch.int64)
    paths = []
    for i in range(n_models + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in base.items():
            if t.dtype == torch.int64:
                tensors[name] = t.clone()
                continue
            if i == 0:
                v = t
            else:
                delta = update * torch.randn(t.shape, generator=g)
                if quantize:  # many equal |tau|: exercises tie-breaking
                    delta = torch.round(delta * 40) / 40
                v = t + delta
            tensors[name] = v.to(TORCH_DTYPES[dtype]).contiguous()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(
            json.dumps(config or {"num_hidden_layers": 2, "dtype": "float32"})
        )
        paths.append(folder)
    return paths[0], paths[1:]


def load_f32(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a single-file checkpoint, float tensors as float32 numpy."""
    from safetensors.torch import load_file

    out = {}
    for name, t in load_file(str(folder / "model.safetensors")).items():
        out[name] = t.float().numpy() if t.is_floating_point() else t.numpy()
    return out


def load_raw(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def round_to(x: np.ndarray, dtype: str) -> torch.Tensor:
    """float32 -> output dtype with torch's round-to-nearest-even."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(TORCH_DTYPES[dtype])


def rank_band_mask(tau: np.ndarray, r_hi: int, r_lo: int) -> np.ndarray:
    """Mask of ranks r_hi+1..r_lo, ranks ordered by |tau| descending, then lower index first."""
    flat = tau.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -np.abs(flat.astype(np.float64))))
    mask = np.zeros(flat.size, bool)
    mask[order[r_hi:r_lo]] = True
    return mask.reshape(tau.shape)


def weighted_sum(taus: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_t w_t * tau_t accumulated in float32, model by model."""
    acc = np.zeros_like(taus[0], dtype=np.float32)
    for w, t in zip(weights, taus):
        acc = acc + np.float32(w) * t
    return acc


def ties_merge(taus: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Elect s = sign(sum_t tau_t); weighted mean of the tau_t with sign s (0 where none)."""
    total = np.zeros_like(taus[0], dtype=np.float32)
    for t in taus:
        total = total + t
    num = np.zeros_like(total)
    den = np.zeros_like(total)
    for w, t in zip(weights, taus):
        agree = (np.sign(t) == np.sign(total)) & (t != 0)
        num = num + np.where(agree, np.float32(w) * t, np.float32(0))
        den = den + np.where(agree, np.float32(w), np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den == 0, 1, den), np.float32(0)).astype(np.float32)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """Reference splitmix64 over uint64 numpy arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
