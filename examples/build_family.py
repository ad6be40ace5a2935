"""Build the bundled example model family: a tiny Llama base and fine-tunes of it.

Trains, on CPU and deterministically, a ~0.9M-parameter ``LlamaForCausalLM`` on synthetic
character tasks (see ``tasks.py``), then fine-tunes it the way real fine-tunes move weights (low
learning rate, few steps, replay of the base mixture) and writes Hugging Face folders::

    examples/family/base             copy + shift (sees a little of every task); 2+ shards + index
    examples/family/ft_add           + single-digit addition
    examples/family/ft_reverse       + string reversal
    examples/family/ft_sort          + letter sorting
    examples/family/ft_sort_forget   sorting with a high learning rate and no replay: forgets

Every folder holds bf16 safetensors, ``config.json``, ``generation_config.json`` and the tokenizer;
fine-tunes also get a model card whose front matter says ``base_model: ../base``.

Usage: ``python examples/build_family.py [--out examples/family] [--threads 2]``
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate, evaluate_model, format_table  # noqa: E402
from tasks import TASKS, build_tokenizer, encode_batch, sample_mixture, vocabulary  # noqa: E402

BASE_MIXTURE: dict[str, float] = {"copy": 0.4, "shift": 0.4, "add": 0.06, "reverse": 0.07, "sort": 0.07}


@dataclass(frozen=True)
class Stage:
    """One training run: a task mixture, an optimiser schedule and a seed."""

    name: str
    mixture: dict[str, float]
    steps: int
    lr: float
    seed: int
    warmup: int = 20
    batch: int = 64
    weight_decay: float = 0.0
    description: str = ""
    shard_size: str | None = None
    tags: list[str] = field(default_factory=list)


def finetune_mixture(task: str, replay: float) -> dict[str, float]:
    """``task`` with weight ``1 - replay``, plus the base mixture with total weight ``replay``."""
    mix = {t: replay * w for t, w in BASE_MIXTURE.items()}
    mix[task] = mix.get(task, 0.0) + 1.0 - replay
    return mix


BASE = Stage(
    name="base",
    mixture=BASE_MIXTURE,
    steps=1500,
    lr=3e-3,
    seed=1,
    warmup=100,
    weight_decay=0.01,
    description="Pretrained on a mixture of copy and Caesar shift with a little of every task.",
    shard_size="1MB",
)
FINETUNES: tuple[Stage, ...] = (
    Stage(
        "ft_add", finetune_mixture("add", 0.3), steps=150, lr=3e-4, seed=11,
        description="Fine-tuned on single-digit addition (tens digit first), 30% replay.",
    ),
    Stage(
        "ft_reverse", finetune_mixture("reverse", 0.3), steps=150, lr=3e-4, seed=12,
        description="Fine-tuned on string reversal, 30% replay of the base mixture.",
    ),
    Stage(
        "ft_sort", finetune_mixture("sort", 0.3), steps=150, lr=3e-4, seed=13,
        description="Fine-tuned on sorting the letters of a string, 30% replay.",
    ),
    Stage(
        "ft_sort_forget", {"sort": 1.0}, steps=300, lr=2e-3, seed=14,
        description=(
            "Fine-tuned on sorting only, with a high learning rate and no replay: it forgets the"
            " base tasks (a catastrophic-forgetting example for LiNeS)."
        ),
    ),
)


def make_config() -> LlamaConfig:
    """The family's architecture: 4 layers, hidden 128, 4 heads, untied embeddings."""
    vocab = vocabulary()
    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
    )


def train(model: LlamaForCausalLM, tokenizer, stage: Stage, log_every: int = 250) -> None:
    """Train ``model`` in place: AdamW, linear warmup then cosine decay to 10%, clip 1.0."""
    torch.manual_seed(stage.seed)
    rng = random.Random(stage.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    running = 0.0
    for step in range(stage.steps):
        ids, labels = encode_batch(tokenizer, sample_mixture(stage.mixture, stage.batch, rng))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            n = (step % log_every) + 1
            print(f"  [{stage.name}] step {step + 1}/{stage.steps} loss {running / n:.4f}")
            running = 0.0
    model.eval()


def round_to_bf16(model: LlamaForCausalLM) -> None:
    """Round weights to bfloat16 (what is saved) while keeping float32 storage for training."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def flat_weights(model: LlamaForCausalLM) -> torch.Tensor:
    """All parameters as one float32 vector (stable order)."""
    return torch.cat([p.detach().float().flatten() for _, p in sorted(model.named_parameters())])


def relative_update(ft: LlamaForCausalLM, base: LlamaForCausalLM) -> float:
    """``||ft - base|| / ||base||`` over all parameters."""
    b = flat_weights(base)
    return float((flat_weights(ft) - b).norm() / b.norm())


def model_card(stage: Stage, accuracy: dict[str, float], update: float) -> str:
    """README.md with YAML front matter naming the base (relative path, resolved by surgery)."""
    accs = ", ".join(f"{t} {100 * a:.0f}%" for t, a in accuracy.items())
    mix = ", ".join(f"{t} {w:.2f}" for t, w in stage.mixture.items())
    return (
        "---\n"
        "base_model: ../base\n"
        "library_name: transformers\n"
        "pipeline_tag: text-generation\n"
        "tags:\n- model-surgery-example\n- character-tasks\n"
        "---\n\n"
        f"# {stage.name}\n\n"
        f"{stage.description}\n\n"
        f"A tiny LlamaForCausalLM from the model-surgery example family, fine-tuned from `../base`"
        f" for {stage.steps} steps of {stage.batch} examples (AdamW, peak learning rate"
        f" {stage.lr:g}, warmup then cosine decay, seed {stage.seed}).\n\n"
        f"- Task mixture: {mix}\n"
        f"- Relative update ||ft - base|| / ||base||: {100 * update:.1f}%\n"
        f"- Held-out exact-match accuracy: {accs}\n\n"
        "Built by `examples/build_family.py`; evaluate with `examples/evaluate.py`.\n"
    )


def save(model: LlamaForCausalLM, tokenizer, folder: Path, shard_size: str | None) -> None:
    """Save bf16 weights (sharded if ``shard_size``), config, generation config and tokenizer."""
    if folder.exists():
        shutil.rmtree(folder)
    out = copy.deepcopy(model).to(torch.bfloat16)
    out.config.dtype = torch.bfloat16
    out.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    out.save_pretrained(folder, max_shard_size=shard_size or "100MB")
    tokenizer.save_pretrained(folder)


def folder_size(folders: Iterable[Path]) -> int:
    """Total bytes of the files under ``folders``."""
    return sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())


def main() -> None:
    """Train and save the family, then print accuracies and update norms."""
    parser = argparse.ArgumentParser(description="Build the example model family.")
    parser.add_argument("--out", type=Path, default=HERE / "family")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=200, help="held-out examples per task")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    tokenizer = build_tokenizer()

    torch.manual_seed(0)
    base = LlamaForCausalLM(make_config())
    n_params = sum(p.numel() for p in base.parameters())
    print(f"LlamaForCausalLM, {n_params:,} parameters; training {BASE.name}")
    train(base, tokenizer, BASE)
    round_to_bf16(base)
    save(base, tokenizer, args.out / BASE.name, BASE.shard_size)
    print(f"  {BASE.name}: {evaluate_model(base, tokenizer, TASKS, args.n)}")

    updates: dict[str, float] = {}
    for stage in FINETUNES:
        print(f"training {stage.name}")
        ft = copy.deepcopy(base)
        train(ft, tokenizer, stage)
        round_to_bf16(ft)
        updates[stage.name] = relative_update(ft, base)
        accuracy = evaluate_model(ft, tokenizer, TASKS, args.n)
        print(f"  {stage.name}: update {100 * updates[stage.name]:.2f}%, {accuracy}")
        save(ft, tokenizer, args.out / stage.name, stage.shard_size)
        (args.out / stage.name / "README.md").write_text(
            model_card(stage, accuracy, updates[stage.name])
        )
    train_time = time.time() - start

    names = [BASE.name, *(s.name for s in FINETUNES)]
    results = {name: evaluate(args.out / name, TASKS, args.n) for name in names}
    print("\nheld-out exact-match accuracy (reloaded from disk):")
    print(format_table(results, TASKS))
    print("\nrelative update ||ft - base|| / ||base||:")
    for name, u in updates.items():
        print(f"  {name:<15} {100 * u:.2f}%")
    size = folder_size(args.out / name for name in names)
    print(f"\n{n_params:,} parameters; {size / 1e6:.1f} MB on disk; {train_time:.0f} s training")


if __name__ == "__main__":
    main()
