"""Run mergekit 0.1.5 and `surgery run` on the same configs and compare the outputs tensor by tensor.

Not part of the test suite (mergekit is no dependency): mergekit runs from a throwaway venv, e.g.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    PYTHONPATH=. python scripts/mergekit_compare/compare.py --mergekit /tmp/mk/bin/mergekit-yaml WORKDIR

The configs are mergekit's examples/ (linear, ties, gradient-slerp, orcamini-platy-44layer, ...) with
the model names replaced by four tiny float32 Llama models built here (base + 3 fine-tunes).
Prints one line per config: match (max relative difference), differs, or refused (our message).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
import yaml

B, A, C, D = "BASE", "FT1", "FT2", "FT3"
CONFIGS = {
    "linear": {
        "models": [
            {"model": A, "parameters": {"weight": 1.0}},
            {"model": C, "parameters": {"weight": 0.3}},
            {"model": D, "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float32",
    },
    "linear_f16": {
        "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 0.3}}],
        "merge_method": "linear",
        "dtype": "float16",
    },
    "ties_example": {  # examples/ties.yml: gradients, filters, unequal weights
        "models": [
            {"model": A, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": C, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {
                "model": D,
                "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            },
        ],
        "merge_method": "ties",
        "base_model": B,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    },
    "ties_equal_weights": {
        "models": [
            {"model": A, "parameters": {"density": [1, 0.7, 0.1], "weight": 0.5}},
            {"model": C, "parameters": {"density": [1, 0.7, 0.1], "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": B,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    },
    "ties_normalize_false": {  # bio-merge style
        "models": [
            {"model": A, "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": C, "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": B,
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float32",
    },
    "gradient_slerp": {
        "slices": [{"sources": [{"model": A, "layer_range": [0, 4]}, {"model": C, "layer_range": [0, 4]}]}],
        "merge_method": "slerp",
        "base_model": A,
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float32",
    },
    # orcamini-platy-44layer.yml: [0, 24] + [20, 40] of 40 layers -> here [0, 3] + [1, 4] of 4
    "passthrough_44layer": {
        "slices": [
            {"sources": [{"model": A, "layer_range": [0, 3]}]},
            {"sources": [{"model": C, "layer_range": [1, 4]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    },
    "task_arithmetic": {
        "models": [
            {"model": A, "parameters": {"weight": 0.6}},
            {"model": C, "parameters": {"weight": [0.2, 0.8]}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": B,
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    },
    "breadcrumbs": {
        "models": [
            {"model": A, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.125}},
            {"model": C, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.125}},
        ],
        "merge_method": "breadcrumbs",
        "base_model": B,
        "dtype": "float32",
    },
    "breadcrumbs_ties": {
        "models": [
            {"model": A, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.125}},
            {"model": C, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.125}},
        ],
        "merge_method": "breadcrumbs_ties",
        "base_model": B,
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "model_stock": {
        "models": [{"model": A}, {"model": C}, {"model": D}],
        "merge_method": "model_stock",
        "base_model": B,
        "dtype": "float32",
    },
    "dare_linear_default": {
        "models": [{"model": A, "parameters": {"weight": 0.5, "density": 0.3}}],
        "merge_method": "dare_linear",
        "base_model": B,
        "dtype": "float32",
    },
    "dare_ties_default": {
        "models": [
            {"model": A, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": C, "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "merge_method": "dare_ties",
        "base_model": B,
        "dtype": "float32",
    },
    "multislerp": {
        "models": [
            {"model": A, "parameters": {"weight": 1.0}},
            {"model": C, "parameters": {"weight": 0.5}},
            {"model": D, "parameters": {"weight": 0.25}},
        ],
        "merge_method": "multislerp",
        "base_model": B,
        "dtype": "float32",
    },
    "karcher": {"models": [{"model": A}, {"model": C}], "merge_method": "karcher", "dtype": "float32"},
    "nearswap": {
        "models": [{"model": A}],
        "merge_method": "nearswap",
        "base_model": B,
        "parameters": {"t": 0.01},
        "dtype": "float32",
    },
    "della": {
        "models": [{"model": A, "parameters": {"weight": 1.0, "density": 0.5}}],
        "merge_method": "della",
        "base_model": B,
        "parameters": {"epsilon": 0.1},
        "dtype": "float32",
    },
    "della_three": {  # mergekit's defaults (epsilon 0.15, rescale, normalize), unequal weights
        "models": [
            {"model": A, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": C, "parameters": {"weight": 0.3, "density": 0.4, "epsilon": 0.1}},
            {"model": D, "parameters": {"weight": 0.5, "density": 0.7, "epsilon": 0.2}},
        ],
        "merge_method": "della",
        "base_model": B,
        "parameters": {"lambda": 1.1},
        "dtype": "float32",
    },
    "della_linear_one": {
        "models": [{"model": A, "parameters": {"weight": 1.0, "density": 0.3}}],
        "merge_method": "della_linear",
        "base_model": B,
        "parameters": {"epsilon": 0.2},
        "dtype": "float32",
    },
    "della_linear_two": {
        "models": [{"model": A, "parameters": {"weight": 0.5}}, {"model": C, "parameters": {"weight": 0.5}}],
        "merge_method": "della_linear",
        "base_model": B,
        "parameters": {"density": [0.3, 0.7], "epsilon": 0.15},
        "dtype": "float32",
    },
    "della_linear_no_rescale": {
        "models": [{"model": A, "parameters": {"weight": 1.0, "density": 0.4}}],
        "merge_method": "della_linear",
        "base_model": B,
        "parameters": {"epsilon": 0.25, "rescale": False},
        "dtype": "float32",
    },
    "ties_rescale": {
        "models": [
            {"model": A, "parameters": {"weight": 0.7, "density": 0.3}},
            {"model": C, "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": B,
        "parameters": {"rescale": True},
        "dtype": "float32",
    },
    "breadcrumbs_rescale": {
        "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 0.5}}],
        "merge_method": "breadcrumbs_ties",
        "base_model": B,
        "parameters": {"density": 0.4, "gamma": 0.02, "rescale": True},
        "dtype": "float32",
    },
    "arcee_fusion": {
        "models": [{"model": A}],
        "merge_method": "arcee_fusion",
        "base_model": B,
        "dtype": "float32",
    },
    "nuslerp": {
        "models": [{"model": A, "parameters": {"weight": 0.3}}, {"model": C, "parameters": {"weight": 0.7}}],
        "merge_method": "nuslerp",
        "dtype": "float32",
    },
    "nuslerp_base_rows": {
        "models": [{"model": A, "parameters": {"weight": 0.3}}, {"model": C, "parameters": {"weight": 0.7}}],
        "merge_method": "nuslerp",
        "base_model": B,
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    },
    "nuslerp_base_columns": {
        "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 0.5}}],
        "merge_method": "nuslerp",
        "base_model": B,
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "dtype": "float32",
    },
    "nearswap_filter": {
        "models": [{"model": A}],
        "merge_method": "nearswap",
        "base_model": B,
        "parameters": {"t": [{"filter": "mlp", "value": 0.03}, {"value": 0.01}]},
        "dtype": "float32",
    },
    "multislerp_no_base": {
        "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 1.0}}],
        "merge_method": "multislerp",
        "dtype": "float32",
    },
    "multislerp_unnormalized": {
        "models": [{"model": A, "parameters": {"weight": 0.5}}, {"model": C, "parameters": {"weight": 1.0}}],
        "merge_method": "multislerp",
        "base_model": B,
        "parameters": {"normalize_weights": False},
        "dtype": "float32",
    },
    "karcher_three": {
        "models": [{"model": A}, {"model": C}, {"model": D}],
        "merge_method": "karcher",
        "dtype": "float32",
    },
    "karcher_with_base": {
        "models": [{"model": B}, {"model": A}, {"model": C}],
        "merge_method": "karcher",
        "base_model": B,
        "parameters": {"max_iter": 3},
        "dtype": "float32",
    },
    "sce": {
        "models": [{"model": A}, {"model": C}, {"model": D}],
        "merge_method": "sce",
        "base_model": B,
        "dtype": "float32",
    },
    "sce_topk": {
        "models": [{"model": A}, {"model": C}, {"model": D}],
        "merge_method": "sce",
        "base_model": B,
        "parameters": {"select_topk": 0.3},
        "dtype": "float32",
    },
}


def build_family(root: Path) -> dict[str, str]:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(7)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    paths = {B: root / "base"}
    base.save_pretrained(paths[B])
    for i, key in enumerate((A, C, D), 1):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[key] = root / key.lower()
        ft.save_pretrained(paths[key])
    return {k: str(v) for k, v in paths.items()}


def substitute(value, paths):
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    return paths.get(value, value) if isinstance(value, str) else value


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_random(ours: Path, theirs: Path, base: Path, model: Path) -> str:
    """DARE, DELLA: masks come from different generators; compare the kept fraction, the L1 norm of
    the update (which mergekit's rescale preserves for one model), and for DELLA the changed fraction
    by quartile of |tau| rank in each row of the 2-D tensors (tau of the first model)."""
    a, b, base_t, first = load(ours), load(theirs), load(base), load(model)
    kept = [0, 0, 0]
    ratios = []
    quart = torch.zeros(2, 4, dtype=torch.float64)
    count = torch.zeros(4, dtype=torch.float64)
    for name in a:
        ua, ub = (a[name] - base_t[name]).double(), (b[name] - base_t[name]).double()
        kept[0] += int((ua != 0).sum())
        kept[1] += int((ub != 0).sum())
        kept[2] += ua.numel()
        ratios.append(float(ua.abs().sum() / ub.abs().sum()))
        if ua.dim() == 2:
            tau = (first[name] - base_t[name]).abs()
            rank = torch.argsort(torch.argsort(tau, dim=1), dim=1)
            q = (rank * 4) // tau.shape[1]
            for i in range(4):
                quart[0, i] += float((ua[q == i] != 0).sum())
                quart[1, i] += float((ub[q == i] != 0).sum())
                count[i] += float((q == i).sum())
    ratios.sort()
    by_rank = " ".join(f"{x:.3f}/{y:.3f}" for x, y in zip(quart[0] / count, quart[1] / count))
    return (
        f"random masks: changed fraction {kept[0] / kept[2]:.3f} (surgery) / {kept[1] / kept[2]:.3f} "
        f"(mergekit), L1(update) ratio median {ratios[len(ratios) // 2]:.4f}; by |tau| rank quartile "
        f"(low..high, surgery/mergekit): {by_rank}"
    )


def compare_entries(ours: Path, theirs: Path) -> str:
    """Arcee Fusion: each entry is the base's or the fine-tune's; count the entries that differ."""
    a, b = load(ours), load(theirs)
    differ = sum(int((a[n] != b[n]).sum()) for n in a)
    total = sum(t.numel() for t in a.values())
    tensors = sum(1 for n in a if not torch.equal(a[n], b[n]))
    return f"{differ} of {total} entries differ ({differ / total:.2e}), in {tensors} of {len(a)} tensors"


def compare(ours: Path, theirs: Path) -> str:
    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        return f"differs: tensor names {sorted(set(a) ^ set(b))[:4]}"
    worst = 0.0
    for name in a:
        if a[name].dtype != b[name].dtype:
            return f"differs: {name} dtype {a[name].dtype} vs {b[name].dtype}"
        x, y = a[name].double(), b[name].double()
        rel = float((x - y).abs().max() / max(float(y.abs().max()), 1e-30))
        worst = max(worst, rel)
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((theirs / "config.json").read_text())
    layers = (cfg_a.get("num_hidden_layers"), cfg_b.get("num_hidden_layers"))
    status = "match" if worst <= 1e-5 and layers[0] == layers[1] else "differs"
    return f"{status}: max relative difference {worst:.2e}, num_hidden_layers {layers[0]} / {layers[1]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--only", default=None, help="comma-separated config names (default: all)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = build_family(args.workdir / "models")
    for name, data in CONFIGS.items():
        if args.only and name not in args.only.split(","):
            continue
        cfg = args.workdir / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(substitute(data, paths), sort_keys=False))
        ours, theirs = args.workdir / f"{name}.surgery", args.workdir / f"{name}.mergekit"
        cmd = [
            sys.executable,
            "-m",
            "surgery_cli.main",
            "run",
            str(cfg),
            "-o",
            str(ours),
            "-q",
            "--overwrite",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        mk = subprocess.run([args.mergekit, str(cfg), str(theirs), "--allow-crimes", "--lazy-unpickle"],
                            capture_output=True, text=True)  # fmt: skip
        if mk.returncode != 0:
            print(f"{name:22} mergekit failed: {mk.stderr.strip().splitlines()[-1:]}")
            continue
        if run.returncode != 0:
            error = next((line for line in run.stderr.splitlines() if line.startswith("error:")), run.stderr)
            print(f"{name:22} refused: {error}")
            continue
        if name.startswith(("dare", "della")):
            print(f"{name:22} {compare_random(ours, theirs, Path(paths[B]), Path(paths[A]))}")
            continue
        if name == "arcee_fusion":
            print(f"{name:22} {compare_entries(ours, theirs)}")
            continue
        print(f"{name:22} {compare(ours, theirs)}")


if __name__ == "__main__":
    main()
