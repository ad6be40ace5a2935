"""Build the bundled example model family: a tiny Llama base and fine-tunes of it.

Trains, on CPU and deterministically, a ~0.86M-parameter ``LlamaForCausalLM`` on synthetic
character tasks (see ``tasks.py``), then fine-tunes it the way real fine-tunes move weights (low
learning rate, few steps, replay) and writes Hugging Face folders::

    examples/family/base             copy + shift, 2% each of add/reverse/sort; 2 shards + index
    examples/family/ft_add           + single-digit addition
    examples/family/ft_reverse       + string reversal
    examples/family/ft_sort          + letter sorting
    examples/family/ft_sort_forget   sorting, high learning rate, no replay: forgets the base tasks

The replay of the three fine-tunes is distillation from the base on the *other* tasks (Learning
without Forgetting): it keeps each update specific to its task, so that task vectors barely
interfere and a task-arithmetic merge keeps much of each skill. Replaying the base mixture with
its true labels instead makes every fine-tune continue the base's training in one shared
direction (task-vector cosines ~0.2 instead of ~0.01) and merges then lose nearly all the skills.

Every folder holds bf16 safetensors, ``config.json``, ``generation_config.json`` and the tokenizer;
fine-tunes also get a model card whose front matter says ``base_model: ../base``.

Usage: ``python examples/build_family.py [--out examples/family] [--threads 1]`` (one thread is
the fastest for a model this small and keeps results bit-reproducible).
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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate, evaluate_model, format_table  # noqa: E402
from tasks import (  # noqa: E402
    IGNORE_INDEX,
    TASKS,
    build_tokenizer,
    encode_batch,
    sample_mixture,
    vocabulary,
)

BASE_MIXTURE: dict[str, float] = {
    "copy": 0.47,
    "shift": 0.47,
    "add": 0.02,
    "reverse": 0.02,
    "sort": 0.02,
}


@dataclass(frozen=True)
class Stage:
    """One training run: a task mixture, an optimiser schedule and a seed.

    ``replay`` is the fraction of each batch drawn from the *other* tasks and trained to keep the
    base model's predictions there (distillation from the base, as in Learning without
    Forgetting), which keeps the update specific to the stage's own task.
    """

    name: str
    mixture: dict[str, float]
    steps: int
    lr: float
    seed: int
    warmup: int = 20
    batch: int = 64
    weight_decay: float = 0.0
    final_lr: float = 0.1
    replay: float = 0.0
    description: str = ""
    shard_size: str | None = None


BASE = Stage(
    name="base",
    mixture=BASE_MIXTURE,
    steps=1000,
    lr=3e-3,
    seed=1,
    warmup=100,
    weight_decay=0.01,
    description="Pretrained on copy and Caesar shift, with 2% each of add, reverse and sort.",
    shard_size="1MB",
)
FINETUNES: tuple[Stage, ...] = (
    Stage(
        "ft_add",
        {"add": 1.0},
        steps=200,
        lr=2e-4,
        seed=11,
        replay=0.3,
        description="Fine-tuned on single-digit addition (answer: tens digit, then units).",
    ),
    Stage(
        "ft_reverse",
        {"reverse": 1.0},
        steps=200,
        lr=2e-4,
        seed=12,
        replay=0.3,
        description="Fine-tuned on reversing a string of 3-6 letters.",
    ),
    Stage(
        "ft_sort",
        {"sort": 1.0},
        steps=300,
        lr=2e-4,
        seed=13,
        replay=0.3,
        description="Fine-tuned on sorting the letters of a string of 3-6 letters.",
    ),
    Stage(
        "ft_sort_forget",
        {"sort": 1.0},
        steps=200,
        lr=2e-3,
        seed=14,
        description=(
            "Fine-tuned on sorting only, with a high learning rate and no replay: it forgets"
            " the base tasks (a catastrophic-forgetting example for LiNeS)."
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


def _answer_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over rows of next-token logits."""
    t = teacher.log_softmax(-1)
    return (t.exp() * (t - student.log_softmax(-1))).sum(-1).mean()


def train(
    model: LlamaForCausalLM,
    tokenizer,
    stage: Stage,
    teacher: LlamaForCausalLM | None = None,
    log_every: int = 250,
) -> None:
    """Train ``model`` in place with AdamW: linear warmup, cosine decay to ``final_lr``, clip 1.0.

    Loss: cross-entropy on the answer tokens of the stage's tasks, plus (when ``stage.replay`` and
    a ``teacher`` are given) KL to the teacher on the answer tokens of replayed other tasks.
    """
    torch.manual_seed(stage.seed)
    rng = random.Random(stage.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay)

    def lr_at(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return stage.final_lr + (1.0 - stage.final_lr) * cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n_replay = round(stage.batch * stage.replay) if teacher is not None else 0
    others = {t: 1.0 for t in TASKS if t not in stage.mixture}
    model.train()
    running = 0.0
    for step in range(stage.steps):
        examples = sample_mixture(stage.mixture, stage.batch - n_replay, rng)
        examples += sample_mixture(others, n_replay, rng) if n_replay else []
        ids, labels = encode_batch(tokenizer, examples)
        logits = model(input_ids=ids).logits[:, :-1]
        targets = labels[:, 1:]
        own = targets[: stage.batch - n_replay]
        loss = torch.nn.functional.cross_entropy(
            logits[: len(own)][own != IGNORE_INDEX], own[own != IGNORE_INDEX]
        )
        if n_replay:
            mask = targets[len(own) :] != IGNORE_INDEX
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids[len(own) :]).logits[:, :-1][mask]
            loss = loss + _answer_kl(logits[len(own) :][mask], teacher_logits)
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


def model_card(stage: Stage, accuracy: dict[str, float], update: float | None) -> str:
    """README.md; a fine-tune's front matter names its base by a relative path (``../base``)."""
    accs = ", ".join(f"{t} {100 * a:.0f}%" for t, a in accuracy.items())
    mix = ", ".join(f"{t} {w:.2f}" for t, w in stage.mixture.items())
    replay = (
        f"{100 * stage.replay:.0f}% of each batch replays the other tasks, distilled from the base"
        " (KL to its predictions)"
        if stage.replay
        else "no replay"
    )
    finetune = update is not None
    lines = [
        "---",
        *(["base_model: ../base"] if finetune else []),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- model-surgery-example",
        "- character-tasks",
        "---",
        "",
        f"# {stage.name}",
        "",
        stage.description,
        "",
        "A tiny LlamaForCausalLM (character-level tokenizer) from the model-surgery example family,"
        + (" fine-tuned from `../base`" if finetune else " trained from scratch")
        + f" for {stage.steps} steps of {stage.batch} examples (AdamW, peak learning rate"
        f" {stage.lr:g}, warmup then cosine decay, seed {stage.seed}).",
        "",
        f"- Task mixture: {mix}" + (f"; {replay}" if finetune else ""),
        *([f"- Relative update ||ft - base|| / ||base||: {100 * update:.1f}%"] if finetune else []),
        f"- Held-out exact-match accuracy: {accs}",
        "",
        "Built by `examples/build_family.py`; evaluate with `examples/evaluate.py`.",
    ]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=200, help="held-out examples per task")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    start = time.time()
    tokenizer = build_tokenizer()

    torch.manual_seed(0)
    base = LlamaForCausalLM(make_config())
    n_params = sum(p.numel() for p in base.parameters())
    print(f"LlamaForCausalLM, {n_params:,} parameters; training {BASE.name}")
    train(base, tokenizer, BASE)
    round_to_bf16(base)
    save(base, tokenizer, args.out / BASE.name, BASE.shard_size)
    accuracy = evaluate_model(base, tokenizer, TASKS, args.n)
    (args.out / BASE.name / "README.md").write_text(model_card(BASE, accuracy, None))
    print(f"  {BASE.name}: {accuracy}")

    updates: dict[str, float] = {}
    for stage in FINETUNES:
        print(f"training {stage.name}")
        ft = copy.deepcopy(base)
        train(ft, tokenizer, stage, teacher=base)
        round_to_bf16(ft)
        updates[stage.name] = relative_update(ft, base)
        accuracy = evaluate_model(ft, tokenizer, TASKS, args.n)
        print(f"  {stage.name}: update {100 * updates[stage.name]:.2f}%, {accuracy}")
        save(ft, tokenizer, args.out / stage.name, stage.shard_size)
        (args.out / stage.name / "README.md").write_text(model_card(stage, accuracy, updates[stage.name]))
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
