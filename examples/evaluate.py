"""Exact-match accuracy of example models on the held-out character tasks.

Usage::

    python examples/evaluate.py examples/family/base examples/family/ft_add [--tasks add,sort]
        [--n 200] [--json]

Each folder is loaded offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``; answers are
decoded greedily.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TASKS, Example, eval_set  # noqa: E402

MAX_NEW_TOKENS = 8


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, tokenizer, prompts: Sequence[str]) -> list[str]:
    """Greedy answers to ``prompts`` (up to ``<eos>``), batched by prompt length: no padding."""
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = tokenizer(list(prompts))["input_ids"]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for idx in by_len.values():
        ids = torch.tensor([encoded[i] for i in idx])
        start = ids.shape[1]
        done = torch.zeros(len(idx), dtype=torch.bool)
        for _ in range(MAX_NEW_TOKENS):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            nxt = torch.where(done, eos, nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        for row, i in zip(ids[:, start:].tolist(), idx, strict=True):
            row = row[: row.index(eos)] if eos in row else row
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def task_accuracy(model: PreTrainedModel, tokenizer, examples: Sequence[Example]) -> float:
    """Fraction of ``examples`` whose greedy answer matches exactly."""
    preds = greedy_answers(model, tokenizer, [e.prompt for e in examples])
    return sum(p == e.answer for p, e in zip(preds, examples, strict=True)) / len(examples)


def evaluate_model(
    model: PreTrainedModel, tokenizer, tasks: Sequence[str] = TASKS, n: int = 200
) -> dict[str, float]:
    """Accuracy per task of an in-memory model on ``n`` held-out examples each."""
    model.eval()
    return {t: task_accuracy(model, tokenizer, eval_set(t, n)) for t in tasks}


def evaluate(model_dir: str | Path, tasks: Sequence[str] = TASKS, n: int = 200) -> dict[str, float]:
    """Load ``model_dir`` offline (weights upcast to float32) and return accuracy per task."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return evaluate_model(model, tokenizer, tasks, n)


def format_table(results: dict[str, dict[str, float]], tasks: Sequence[str]) -> str:
    """Rows = models, columns = tasks, accuracy in percent."""
    width = max([len("model"), *(len(name) for name in results)])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{t:>7}" for t in tasks)]
    for name, accs in results.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * accs[t]:6.1f}%" for t in tasks))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="+", help="model folders to evaluate")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--n", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    results = {d: evaluate(d, tasks, args.n) for d in args.model_dirs}
    print(json.dumps(results, indent=2) if args.json else format_table(results, tasks))


if __name__ == "__main__":
    main()
