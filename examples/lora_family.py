"""LoRA adapters in and out on the bundled family: merge a LoRA adapter with full fine-tunes, and
extract adapters from the full fine-tunes at ranks 4 / 16 / 64.

1. trains a LoRA adapter (peft, rank 8 on q/k/v/o/gate/up/down) for one task from
   ``examples/family/base`` and saves it as a PEFT adapter folder (not merged);
2. merges the other two full fine-tunes with that adapter (``surgery merge FT FT ADAPTER --base BASE``,
   task arithmetic and TIES) and, for comparison, the three full fine-tunes;
3. extracts a LoRA adapter from each full fine-tune at ranks 4, 16 and 64 (``extract-lora``) and
   evaluates peft's merge of it: the accuracy each rank keeps, the adapter size, the share of
   ||tau||_F^2 kept.

Usage: ``python examples/lora_family.py --out /tmp/lora_family [--task reverse] [--steps 300]``
(a few minutes on 2 CPU cores). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate_model  # noqa: E402
from lora_intruders import LORA_TARGETS, train  # noqa: E402
from tasks import TASKS  # noqa: E402

FAMILY = HERE / "family"
FINETUNES = ("add", "reverse", "sort")


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def with_adapter(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base), adapter).merge_and_unload()


def row(name: str, accs: dict[str, float], extra: str = "") -> str:
    return f"| {name} | " + " | ".join(f"{100 * accs[t]:.1f}" for t in TASKS) + f" |{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default="reverse", choices=FINETUNES)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ranks", default="4,16,64", help='extraction ranks ("" skips extraction)')
    parser.add_argument("--n", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from surgery import EngineOptions, make_recipe, merge
    from surgery.adapters.extract import RankRule, extract_lora

    base_dir = FAMILY / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    evaluate = lambda model: evaluate_model(model, tokenizer, TASKS, args.n)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. a LoRA adapter for the task, saved as an adapter folder
    start = time.time()
    adapter = args.out / f"lora_{args.task}"
    torch.manual_seed(0)  # lora_A's initialisation
    model = get_peft_model(load(base_dir), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                      target_modules=LORA_TARGETS))  # fmt: skip
    loss = train(model, tokenizer, args.task, args.steps, args.lr, seed=1)
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    took = time.time() - start
    print(
        f"LoRA r={args.rank} on {args.task}: {args.steps} steps, loss {loss:.4f}, {took:.0f} s",
        file=sys.stderr,
    )

    # 2. merges with the adapter standing in for the full fine-tune
    header = "| model | " + " | ".join(TASKS) + " |\n|---|" + "---:|" * len(TASKS)
    lines = [header, row("base", evaluate(load(base_dir))), row(f"lora_{args.task} (adapter)",
             evaluate(with_adapter(base_dir, adapter)))]  # fmt: skip
    fulls = [FAMILY / f"ft_{t}" for t in FINETUNES]
    mixed = [adapter if t == args.task else FAMILY / f"ft_{t}" for t in FINETUNES]
    options = EngineOptions(max_memory=256 * 2**20, overwrite=True)
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.2})):
        for label, models in (("3 full fine-tunes", fulls), (f"2 full + lora_{args.task}", mixed)):
            out = args.out / f"{method}_{'mixed' if models is mixed else 'full'}"
            merge(make_recipe(method, [str(m) for m in models], str(base_dir), params), out, options)
            lines.append(row(f"{method}, {label}", evaluate(load(out))))
    print("\n".join(lines) + "\n")

    # 3. extraction at each rank
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if not ranks:
        return
    whole = r"embed|lm_head|norm"  # --include: saved whole as modules_to_save
    lines = ["| fine-tune | rank | own task | other tasks (mean) | energy kept | adapter MB |"
             " own task, + embeddings/head/norms whole | adapter MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task in FINETUNES:
        ft = FAMILY / f"ft_{task}"
        accs = evaluate(load(ft))
        size = sum(p.stat().st_size for p in ft.glob("*.safetensors")) / 1e6
        others = lambda a, task=task: sum(a[t] for t in TASKS if t != task) / (len(TASKS) - 1)  # noqa: E731
        lines.append(f"| ft_{task} | full | {100 * accs[task]:.1f} | {100 * others(accs):.1f} | 100% | "
                     f"{size:.2f} (whole model) | | |")  # fmt: skip
        for rank in ranks:
            out = args.out / f"extract_{task}_r{rank}"
            started = time.time()
            report = extract_lora(str(base_dir), str(ft), out, RankRule(rank=rank), overwrite=True)
            seconds = time.time() - started
            accs = evaluate(with_adapter(base_dir, out))
            out2 = args.out / f"extract_{task}_r{rank}_whole"
            report2 = extract_lora(
                str(base_dir), str(ft), out2, RankRule(rank=rank), include=whole, overwrite=True
            )
            accs2 = evaluate(with_adapter(base_dir, out2))
            lines.append(f"| ft_{task} | {rank} | {100 * accs[task]:.1f} | {100 * others(accs):.1f} | "
                         f"{100 * report.energy_kept:.1f}% | {report.adapter_bytes / 1e6:.2f} | "
                         f"{100 * accs2[task]:.1f} | {report2.adapter_bytes / 1e6:.2f} |")  # fmt: skip
            print(f"extract ft_{task} r={rank}: {seconds:.1f} s", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
