"""TuCo, TuCo steering and optimised skill grafting on the bundled model family.

Usage::

    python examples/tuco_and_localize.py [--family examples/family] [--n 100] [--tuco-n 25] [--steps 60]

1. TuCo of each fine-tune on prompts of its own task vs. the base's tasks (copy, shift): the
   fine-tuned task should show the larger tuning contribution.
2. Accuracy of ft_sort on held-out sort problems as a function of the steering alpha
   (x_{l+1} = x_l + PTC_l + alpha * FTC_l): 0 = the base's blocks, 1 = the fine-tune.
3. Sort graft at a fixed density: data-free top-|tau| patch vs. the optimised mask (same number of
   parameters, the default), both applied with `surgery apply` and evaluated on held-out problems.

Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate, task_accuracy  # noqa: E402
from tasks import eval_set, make_example  # noqa: E402

from surgery.analysis.localize import localize  # noqa: E402
from surgery.analysis.tuco import load_pair, steering, tuco  # noqa: E402
from surgery.engine import EngineOptions, merge  # noqa: E402
from surgery.recipe import make_recipe  # noqa: E402


def tuco_table(family: Path, n: int) -> None:
    print("== TuCo (mean over prompts, last prompt token) ==")
    tasks = ("copy", "shift", "add", "reverse", "sort")
    print(f"{'fine-tune':<16}" + "".join(f"{t:>9}" for t in tasks))
    for ft in ("ft_add", "ft_reverse", "ft_sort", "ft_sort_forget"):
        pt_model, ft_model, tok = load_pair(family / "base", family / ft)
        row = [
            tuco(pt_model, ft_model, [e.prompt for e in eval_set(t, n)], tokenizer=tok).mean_tuco
            for t in tasks
        ]
        print(f"{ft:<16}" + "".join(f"{v:9.4f}" for v in row))


def steering_table(family: Path, n: int) -> None:
    print("\n== steering ft_sort: accuracy vs alpha (held-out, greedy) ==")
    pt_model, ft_model, tok = load_pair(family / "base", family / "ft_sort")
    print(f"{'alpha':>6}  {'sort':>6}  {'copy':>6}")
    for alpha in (0.0, 0.5, 1.0, 1.5):
        with steering(pt_model, ft_model, alpha):
            accs = [task_accuracy(ft_model, tok, eval_set(t, n)) for t in ("sort", "copy")]
        print(f"{alpha:6.1f}  " + "  ".join(f"{100 * a:5.1f}%" for a in accs))


def graft_table(family: Path, n: int, steps: int, density: float, train: int) -> None:
    print(f"\n== ft_sort graft at density {density:g} of the blocks (held-out sort accuracy) ==")
    rng = random.Random(0)
    data = [(e.prompt, e.answer) for e in (make_example("sort", rng, "train") for _ in range(train))]
    base, ft = family / "base", family / "ft_sort"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        # held-out problems are drawn separately below: train on all of `data`
        rep = localize(base, ft, data, density, tmp / "opt", steps=steps, fixed_density=True, holdout=0.0)
        seconds = time.perf_counter() - t0
        params = {"density": density, "granularity": "global", "region": None}
        merge(make_recipe("patch", [str(ft)], str(base), params), tmp / "df", EngineOptions(threads=1))
        rows = {"base": base, "fine-tune": ft}
        for name in ("df", "opt"):
            merge(make_recipe("apply_patch", [str(tmp / name)], str(base), {}), tmp / f"{name}_model")
            rows[{"df": "data-free graft", "opt": "optimised graft"}[name]] = tmp / f"{name}_model"
        fracs = {"base": 0.0, "fine-tune": 1.0, "data-free graft": rep.data_free_fraction,
                 "optimised graft": rep.fraction}  # fmt: skip
        sc = rep.scores
        train_scores = {"base": sc["base"], "fine-tune": sc["finetuned"], "data-free graft": sc["data_free"],
                        "optimised graft": sc["optimised"]}  # fmt: skip
        print(f"{'model':<16}  {'params':>8}  {'train acc':>9}  {'held-out sort':>13}  {'held-out copy':>13}")
        for name, path in rows.items():
            acc = evaluate(path, ("sort", "copy"), n)
            print(f"{name:<16}  {100 * fracs[name]:7.3g}%  {100 * train_scores[name]['accuracy']:8.1f}%  "
                  f"{100 * acc['sort']:12.1f}%  {100 * acc['copy']:12.1f}%")  # fmt: skip
        print(
            f"(optimised: {steps} steps on {train} training examples, best step {rep.best_step}, "
            f"{seconds:.0f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, default=HERE / "family")
    parser.add_argument("--n", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--tuco-n", type=int, default=25, help="prompts per task for TuCo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--train", type=int, default=256, help="labelled sort examples for the graft")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tuco_table(args.family, args.tuco_n)
    steering_table(args.family, args.n)
    graft_table(args.family, args.n, args.steps, args.density, args.train)


if __name__ == "__main__":
    main()
