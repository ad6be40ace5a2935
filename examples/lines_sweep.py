"""LiNeS on the bundled family: the paper's effect on a fine-tune that forgot the base's tasks.

``ft_sort_forget`` was fine-tuned on sorting with a high learning rate and no replay, so it lost the
base's copy and shift skills. ``surgery lines base ft_sort_forget --alpha A`` (beta = 1 - alpha) scales
each block's update by ``alpha + beta * l / (L - 1)``: shallow blocks move back towards the base. The
sweep prints sort accuracy (the fine-tuned task) against copy / shift (the base's tasks), next to plain
uniform scaling of the whole update (task arithmetic with --scale A) for comparison.

Usage: python examples/lines_sweep.py [--n 200] [--finetune ft_sort_forget]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

FAMILY = HERE / "family"
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def surgery(*args: object) -> None:
    subprocess.run(["surgery", *map(str, args), "-q", "--overwrite"], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--finetune", default="ft_sort_forget")
    ap.add_argument("--task", default="sort")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "lines")
    args = ap.parse_args()
    tasks = [args.task, "copy", "shift"]
    ft = FAMILY / args.finetune
    base = FAMILY / "base"
    print(f"| model | {args.task} | copy | shift | mean of base tasks |\n|---|---:|---:|---:|---:|")

    def report(name: str, acc: dict[str, float]) -> None:
        cells = [acc[t] for t in tasks] + [(acc["copy"] + acc["shift"]) / 2]
        print(f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |", flush=True)

    report("base", evaluate(base, tasks, args.n))
    report(args.finetune, evaluate(ft, tasks, args.n))
    for alpha in ALPHAS:
        out = args.out / f"lines_{alpha}"
        surgery("lines", base, ft, "--alpha", alpha, "-o", out)
        report(f"LiNeS alpha={alpha} (beta={1 - alpha:.1f})", evaluate(out, tasks, args.n))
    for scale in (0.4, 0.6):
        out = args.out / f"uniform_{scale}"
        surgery("merge", ft, "--base", base, "--scale", scale, "-o", out)
        report(f"uniform scale {scale} (no depth schedule)", evaluate(out, tasks, args.n))


if __name__ == "__main__":
    main()
