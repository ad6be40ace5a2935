"""Evidence for diffs, fine-tuning transfer and grafting on the bundled family.

1. Builds a genuine "new release" of the bundled base: the same base, pretrained for a while longer on
   its own mixture with fresh data (``examples/family/base_v2``, committed; rebuild with --rebuild).
2. Transfers each fine-tune to it: ``surgery transfer --from base --finetuned FT --to base_v2``.
3. Grafts each fine-tune's top-D task-vector entries (over the transformer blocks) onto the base at
   several densities: ``surgery graft base FT --density D``; reports the patch sizes too.
4. Prints the accuracy tables (markdown) used in the README.

Usage: python examples/new_release.py [--n 200] [--out examples/out/release]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_family import BASE_MIXTURE, Stage, round_to_bf16, save, train  # noqa: E402
from evaluate import evaluate  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

FAMILY = HERE / "family"
FINETUNES = {"ft_add": "add", "ft_reverse": "reverse", "ft_sort": "sort"}
BASE_TASKS = ("copy", "shift")
DENSITIES = (0.001, 0.01, 0.05, 0.2)

RELEASE = Stage(
    name="base_v2",
    mixture=BASE_MIXTURE,
    steps=300,
    lr=1e-3,
    seed=2,
    warmup=30,
    weight_decay=0.01,
    description="base, pretrained 300 more steps on the same mixture with fresh data: a 'new release'.",
    shard_size="1MB",
)


def build_release(folder: Path) -> None:
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(FAMILY / "base")
    model = LlamaForCausalLM.from_pretrained(FAMILY / "base", dtype=torch.float32)
    train(model, tokenizer, RELEASE)
    round_to_bf16(model)
    save(model, tokenizer, folder, RELEASE.shard_size)
    (folder / "README.md").write_text(
        f"---\nlibrary_name: transformers\n---\n\n# base_v2\n\n{RELEASE.description}\n"
    )


def surgery(*args: object) -> None:
    subprocess.run(["surgery", *map(str, args), "-q", "--overwrite"], check=True, stdout=subprocess.DEVNULL)


def row(name: str, acc: dict[str, float], task: str) -> str:
    cells = [acc[task]] + [acc[t] for t in BASE_TASKS]
    return f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "release")
    ap.add_argument("--rebuild", action="store_true", help="retrain base_v2")
    args = ap.parse_args()
    v2 = FAMILY / "base_v2"
    if args.rebuild or not (v2 / "config.json").is_file():
        build_release(v2)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = ["add", "reverse", "sort", *BASE_TASKS]
    acc = {name: evaluate(FAMILY / name, tasks, args.n) for name in ("base", "base_v2", *FINETUNES)}

    print("### Fine-tuning transfer to a new base release\n")
    print("| model | own task | copy | shift |\n|---|---:|---:|---:|")
    for ft, task in FINETUNES.items():
        out = args.out / f"{ft}_on_v2"
        surgery("transfer", "--from", FAMILY / "base", "--finetuned", FAMILY / ft, "--to", v2, "-o", out)
        acc[out.name] = evaluate(out, tasks, args.n)
        print(row(f"base ({task})", acc["base"], task))
        print(row(f"base_v2 ({task})", acc["base_v2"], task))
        print(row(f"{ft} (on base)", acc[ft], task))
        print(row(f"{ft} transferred to base_v2", acc[out.name], task))

    print("\n### Data-free grafts on the base (top-D of |tau| over the blocks)\n")
    print("| fine-tune | density | patch KB | own task | copy | shift |\n|---|---:|---:|---:|---:|---:|")
    for ft, task in FINETUNES.items():
        for d in DENSITIES:
            patch = args.out / f"{ft}_graft_{d}"
            surgery("graft", FAMILY / "base", FAMILY / ft, "--density", d, "--patch", "-o", patch)
            kb = sum(p.stat().st_size for p in patch.glob("*.safetensors")) / 1e3
            kept = json.loads((patch / "surgery_diff.json").read_text())["kept"]
            grafted = args.out / f"{ft}_grafted_{d}"
            surgery("apply", patch, "--to", FAMILY / "base", "-o", grafted)
            a = evaluate(grafted, tasks, args.n)
            print(f"| {ft} | {d} ({kept:,} params) | {kb:.1f} | " + " | ".join(
                f"{100 * a[t]:.1f}" for t in (task, *BASE_TASKS)) + " |")  # fmt: skip
        print(f"| {ft} | 1 (full fine-tune) | - | " + " | ".join(
            f"{100 * acc[ft][t]:.1f}" for t in (task, *BASE_TASKS)) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
