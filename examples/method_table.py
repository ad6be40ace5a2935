"""Every merge method on the bundled family, at its default and at its scale tuned by `surgery tune`.

Usage::

    python examples/method_table.py [--out examples/out/methods] [--n 200] [--dev 40]

Merges ft_add, ft_reverse and ft_sort (base: examples/family/base) with each method, at its default
parameters and at the best point of a grid chosen by ``surgery.tune`` on a dev set (its own seed,
disjoint from the test examples by construction of the eval split's seeds), then prints a Markdown
table of normalised accuracy (merged / fine-tuned expert, per task) on ``--n`` held-out examples per
task, and the wall time of each default merge. RegMean gets 256 calibration texts per fine-tune
(prompt + answer of its own task, training split) and tunes its alpha instead of a scale.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate  # noqa: E402
from tasks import eval_set, make_example  # noqa: E402

from surgery import tune  # noqa: E402
from surgery.engine import EngineOptions, merge  # noqa: E402
from surgery.recipe import make_recipe  # noqa: E402

FAMILY = HERE / "family"
TASKS = ("add", "reverse", "sort")
SCALES = "scale=0.5,0.8,1.0,1.5,2.0"
WIDE = "scale=0.5,1.0,1.5,2.0,2.5,3.0"  # the spectral methods' authors tune alpha in (0, 3]
METHODS = {  # name -> (default parameters, tuning grid)
    "task_arithmetic": ({}, SCALES),
    "ties": ({}, SCALES),
    "breadcrumbs": ({}, SCALES),
    "tsv_merge": ({}, WIDE),
    "iso_c": ({}, WIDE),
    "iso_cts": ({}, WIDE),
    "cart": ({}, "scale=0.5,1.0,2.0,3.0,4.0"),
    "star": ({}, WIDE),
    "wudi": ({}, WIDE),
    "regmean": ({}, "regmean_alpha=0.5,0.7,0.9,0.95"),
}


def write_texts(out: Path, n: int = 256) -> list[str]:
    files = []
    for task in TASKS:
        rng = random.Random(f"calibration-{task}")
        path = out / f"calibration_{task}.jsonl"
        lines = [
            json.dumps({"text": (e := make_example(task, rng, "train")).prompt + e.answer}) for _ in range(n)
        ]
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return files


def write_dev(out: Path, n: int) -> Path:
    path = out / "dev.jsonl"
    rows = [{"prompt": e.prompt, "answer": e.answer} for t in TASKS for e in eval_set(t, n, seed=7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "methods")
    parser.add_argument("--n", type=int, default=200, help="held-out test examples per task")
    parser.add_argument("--dev", type=int, default=40, help="dev examples per task for tuning")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_GRAM_CACHE", str(args.out / "grams"))
    calibration = write_texts(args.out)
    dev = tune.read_eval(write_dev(args.out, args.dev))
    models = [str(FAMILY / f"ft_{t}") for t in TASKS]
    experts = {t: evaluate(FAMILY / f"ft_{t}", [t], args.n)[t] for t in TASKS}
    options = EngineOptions(max_memory=256 * 2**20, threads=2, overwrite=True)
    rows = []
    for name in args.methods.split(","):
        defaults, grid = METHODS[name]
        params = dict(defaults, calibration=calibration) if name == "regmean" else dict(defaults)
        base = None if name == "regmean" else str(FAMILY / "base")
        recipe = make_recipe(name, models, base, params)
        t0 = time.perf_counter()
        merge(recipe, args.out / name, options)
        seconds = time.perf_counter() - t0
        default_acc = evaluate(args.out / name, TASKS, args.n)
        result = tune.tune(recipe, tune.parse_grid([grid]), dev, args.out / f"{name}_tuned",
                           lambda r, folder: merge(r, folder, options), overwrite=True)  # fmt: skip
        tuned_acc = evaluate(args.out / f"{name}_tuned", TASKS, args.n)
        rows.append((name, seconds, default_acc, result.best.params, tuned_acc))
        print(json.dumps({"method": name, "seconds": seconds, "default": default_acc,
                          "tuned": result.best.params, "tuned_acc": tuned_acc}), flush=True)  # fmt: skip
    print(f"\nexperts: {experts}\n")
    head = (
        "| method | merge s | " + " | ".join(TASKS) + " | mean | tuned | " + " | ".join(TASKS) + " | mean |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, seconds, acc, best, tuned in rows:
        norm = [acc[t] / experts[t] for t in TASKS]
        tnorm = [tuned[t] / experts[t] for t in TASKS]
        best_text = ", ".join(f"{k}={v}" for k, v in best.items())
        cells = " | ".join(f"{v:.2f}" for v in norm) + f" | **{sum(norm) / 3:.3f}**"
        tcells = " | ".join(f"{v:.2f}" for v in tnorm) + f" | **{sum(tnorm) / 3:.3f}**"
        print(f"| {name} | {seconds:.1f} | {cells} | {best_text} | {tcells} |")


if __name__ == "__main__":
    main()
