"""LoRA vs full fine-tuning on the example family: LoRA leaves intruder dimensions, full fine-tuning not.

Shuttleworth et al. (2024, arXiv 2410.21228) found that LoRA fine-tunes, even at the accuracy of a full
fine-tune, carry *intruder dimensions*: high-ranking singular vectors of the fine-tuned weights that are
nearly orthogonal to every singular vector of the pre-trained weights. This script reproduces that on
the bundled tiny Llama family:

1. fine-tunes one task twice from ``examples/family/base``: fully (all weights, small learning rate)
   and with LoRA (peft, rank 8 on q/k/v/o and gate/up/down, merged with ``merge_and_unload``), to
   similar held-out accuracy;
2. saves both as bf16 Hugging Face folders under ``--out``;
3. counts intruder dimensions of both with ``surgery.analysis`` (the base SVDs are cached, so the
   second analysis reuses them), prints the per-layer table and writes the plot.

Usage: ``python examples/lora_intruders.py --out /tmp/lora [--task sort] [--steps 300]``
(about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate_model  # noqa: E402
from tasks import TASKS, encode_batch, sample_mixture  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mixture(task: str) -> dict[str, float]:
    """Mostly the new task, plus replay of the base's copy/shift so the base skills stay."""
    return {task: 0.7, "copy": 0.15, "shift": 0.15}


def train(model, tokenizer, task: str, steps: int, lr: float, seed: int) -> float:
    """AdamW with warmup and cosine decay on the trainable parameters; returns the last loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss = float("nan")
    for _ in range(steps):
        ids, labels = encode_batch(tokenizer, sample_mixture(mixture(task), 64, rng))
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
    model.eval()
    return loss


def save_bf16(model, tokenizer, folder: Path) -> None:
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the two fine-tunes")
    parser.add_argument("--base", type=Path, default=HERE / "family" / "base")
    parser.add_argument("--task", default="sort", choices=TASKS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n", type=int, default=200, help="held-out examples per task")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the model is tiny: 1 avoids contention)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG path [default: OUT/intruders.png]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from surgery_cli.analysis import render_intruders

    from surgery.analysis.intruders import find_intruders
    from surgery.analysis.plots import plot_intruders
    from surgery.analysis.stats import diff_stats

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, local_files_only=True)
    tasks = [args.task, *(t for t in TASKS if t != args.task)]  # the others show forgetting
    accuracy = {"base": evaluate_model(base, tokenizer, tasks, args.n)}

    full = copy.deepcopy(base)
    loss = train(full, tokenizer, args.task, args.steps, args.full_lr, seed=1)
    accuracy["full"] = evaluate_model(full, tokenizer, tasks, args.n)
    print(f"full fine-tune: lr {args.full_lr:g}, {args.steps} steps, final loss {loss:.4f}")

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    lora = get_peft_model(copy.deepcopy(base), config)
    loss = train(lora, tokenizer, args.task, args.steps, args.lora_lr, seed=1)
    lora = lora.merge_and_unload()
    accuracy["lora"] = evaluate_model(lora, tokenizer, tasks, args.n)
    print(f"LoRA r={args.rank} fine-tune: lr {args.lora_lr:g}, {args.steps} steps, final loss {loss:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in (("full", full), ("lora", lora)):
        save_bf16(model, tokenizer, args.out / name)
    train_s = time.time() - start

    print(f"\nheld-out exact-match accuracy ({args.n} examples per task):")
    print(f"{'model':<6}" + "".join(f"{t:>9}" for t in tasks))
    for name, accs in accuracy.items():
        print(f"{name:<6}" + "".join(f"{100 * accs[t]:8.1f}%" for t in tasks))

    start = time.time()
    cache = args.out / "svd-cache"
    reports = [find_intruders(args.base, args.out / name, cache_dir=cache) for name in ("full", "lora")]
    stats = diff_stats(args.base, [args.out / "full", args.out / "lora"], include=r"layers\.")
    print()
    print(render_intruders(reports))
    rel = stats.overall.relative_norms
    print(f"\nrelative update ||tau|| / ||W0|| (blocks): full {rel[0]:.4f}, lora {rel[1]:.4f}")
    print(f"cosine between the two task vectors: {stats.overall.cosines(stats.pairs)[0]:+.3f}")
    plot = plot_intruders(reports, args.plot or args.out / "intruders.png", ["full", f"LoRA r={args.rank}"])
    print(f"\nintruders: full {reports[0].total}, LoRA {reports[1].total} (of "
          f"{sum(len(m.max_cos) for m in reports[0].matrices)} top-{reports[0].k} vectors)")  # fmt: skip
    print(f"plot: {plot}; training {train_s:.0f} s, analysis {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
