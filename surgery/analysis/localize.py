"""Optimised skill grafting: Panigrahi et al. (ICML 2023), "Task-Specific Skill Localization in
Fine-tuned Language Models", arXiv 2302.06600.

A graft keeps the base ``b`` except on a binary mask ``gamma`` over a region (default: the transformer
blocks), where it takes the fine-tuned weights: ``out = b + gamma * tau`` with ``tau = f - b``.

1. The data-free graft ``m0`` is the top ``density`` of |tau| over the whole region (the same patch
   ``surgery graft --patch`` / ``surgery diff --graft`` write; computed by the engine).
2. A relaxed mask ``gamma = m0 + (1 - 2 m0) * sigmoid(S - 10)``, ``S ~ U[0, 1)`` per parameter, so
   that ``round(gamma) == m0`` at the start, is trained by gradient descent on the task loss
   (cross-entropy on the answer tokens and end-of-sequence of labelled ``{"prompt", "answer"}``
   rows). Each step moves ``S`` by ``lr * grad / q`` (clipped to 4 lr), ``q`` the |m0|-th largest
   |grad|: the paper's very large SGD step size, made scale-free.
3. Every few steps the top-k of gamma with k = |m0| (so the patch holds the requested density; with
   ``fixed_density=False``, the paper's rounded mask, which may grow) is scored on the training
   examples: exact-match accuracy under teacher forcing (every answer token and the end token are
   the argmax, which is what greedy decoding produces), ties broken by loss. The best mask is kept,
   so the result is never worse on the training data than the data-free graft (step 0 is a
   candidate).
4. The reported scores are measured on held-out examples (a seeded ``holdout`` fraction of the
   data, never trained or selected on), so they say how the graft generalises.

The mask is written as a sparse patch (``W.indices`` int64 ascending, ``W.values`` float32 tau, a
``surgery_diff.json`` with ``kind: patch``) that ``surgery apply PATCH --to BASE`` applies.

Memory: base, fine-tune, tau, S and its gradient are held in float32 (about 6x the model size):
meant for small models.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery.errors import InputNotFoundError, RecipeError
from surgery.jsonl import lines_of, parse_line

__all__ = ["LocalizeReport", "compare_patches", "gamma", "localize", "read_examples", "region_names"]


@dataclass(frozen=True)
class LocalizeReport:
    base: str
    finetuned: str
    output: str
    density: float
    kept: int  # parameters in the optimised mask
    total: int  # parameters in the region
    data_free_kept: int
    scores: dict  # base / finetuned / data_free / optimised -> {"accuracy", "loss"} on held-out data
    best_step: int
    history: tuple  # (step, kept, accuracy, loss) of every scored candidate, on the training data
    held_out: tuple = ()  # indices of the examples scores are measured on (none: the training data)

    @property
    def fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def data_free_fraction(self) -> float:
        return self.data_free_kept / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fraction"], data["data_free_fraction"] = self.fraction, self.data_free_fraction
        return data


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from JSONL rows ``{"prompt": ..., "answer": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist", hint="pass a JSONL file", path=str(path))
    rows = []
    for i, line in lines_of(path):
        row = parse_line(path, i, line)
        if not (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("answer"), str)
        ):
            raise RecipeError(f"{path}:{i} needs string fields 'prompt' and 'answer'", path=str(path))
        rows.append((row["prompt"], row["answer"]))
    if not rows:
        raise RecipeError(f"{path} has no examples", path=str(path))
    return rows


def region_names(model: Any, region: str | None) -> list[str]:
    """Float parameters the graft may touch: ``region`` regex, or by default the transformer blocks."""
    from surgery.names import place

    pattern = re.compile(region) if region else None
    names = [
        n
        for n, p in model.named_parameters()
        if p.is_floating_point() and (pattern.search(n) if pattern else place(n).block is not None)
    ]
    if not names:
        raise RecipeError(
            f"the region {region or '(transformer blocks)'} matches no float parameter",
            hint="check the names with `surgery inspect --layers` and pass --region REGEX",
        )
    return names


def gamma(base_mask: Any, s: Any) -> Any:
    """gamma = m0 + (1 - 2 m0) * sigmoid(S - 10)."""
    import torch

    return base_mask + (1.0 - 2.0 * base_mask) * torch.sigmoid(s - 10.0)


def grafted_params(base: dict, tau: dict, masks: dict) -> dict:
    """b + mask * tau for the masked names, b elsewhere."""
    return {n: (b + masks[n] * tau[n]) if n in masks else b for n, b in base.items()}


# -- data -------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, examples: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
    """Right-padded ids and labels: loss on the answer tokens and the end-of-sequence token."""
    import torch

    eos = tokenizer.eos_token_id
    rows, starts = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        rows.append(p + a)
        starts.append(len(p))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, s) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, s : len(row)] = torch.tensor(row[s:])
    return ids, labels


def _loss_and_hits(model: Any, params: dict | None, ids: Any, labels: Any) -> tuple[Any, Any]:
    """Mean cross-entropy over answer tokens, and per-example exact match under teacher forcing."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    kwargs = {"input_ids": ids, "use_cache": False}
    logits = (functional_call(model, params, (), kwargs) if params is not None else model(**kwargs)).logits
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    with torch.no_grad():
        ok = (logits.argmax(-1) == target) | (target == -100)
        hits = ok.all(dim=1)
    return loss, hits


def _score(model: Any, params: dict | None, batches: list) -> dict:
    import torch

    with torch.no_grad():
        loss, hits, n = 0.0, 0, 0
        for ids, labels in batches:
            lo, h = _loss_and_hits(model, params, ids, labels)
            loss += float(lo) * len(ids)
            hits += int(h.sum())
            n += len(ids)
    return {"accuracy": hits / n, "loss": loss / n}


# -- the optimisation -------------------------------------------------------------------------------
def localize(
    base: str | Path,
    finetuned: str | Path,
    examples: Sequence[tuple[str, str]],
    density: float,
    output: str | Path,
    region: str | None = None,
    steps: int = 100,
    lr: float = 1.0,
    fixed_density: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    eval_every: int = 5,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    holdout: float = 0.2,
) -> LocalizeReport:
    """Learn a graft mask on ``examples`` starting from the data-free top-``density`` mask and write
    the best one as a sparse patch to ``output`` (locked, staged and renamed like every output).
    ``progress(steps_done, steps_total, message)``; the reported scores are on the held-out examples."""
    if not 0.0 < density <= 1.0:
        raise RecipeError(f"density must be in (0, 1], got {density}")
    if steps < 0 or eval_every < 1 or batch_size < 1:
        raise RecipeError("steps must be >= 0, eval_every and batch_size >= 1")
    if not lr > 0.0 or lr == float("inf"):
        raise RecipeError(
            f"lr must be a positive number, got {lr}", hint="the default --lr 1.0 suits most runs"
        )
    split = split_examples(len(examples), holdout, seed)
    from surgery.output import open_output
    from surgery.writer import fingerprint_of

    run = {
        "base": str(base),
        "finetuned": str(finetuned),
        "density": density,
        "region": region,
        "steps": steps,
        "lr": lr,
        "fixed_density": fixed_density,
        "seed": seed,
        "batch_size": batch_size,
        "examples": examples,
        "holdout": holdout,
    }
    fingerprint = fingerprint_of({"analysis": "localize/1", "run": run})
    with open_output(Path(output), [Path(base), Path(finetuned)], fingerprint, overwrite=overwrite) as staged:
        return _localize(staged, base, finetuned, examples, split, density, region, steps, lr, fixed_density,
                         seed, batch_size, eval_every, progress)  # fmt: skip


def _localize(staged, base, finetuned, examples, split, density, region, steps, lr, fixed_density, seed,
              batch_size, eval_every, progress) -> LocalizeReport:  # fmt: skip
    import torch

    from surgery.analysis.tuco import load_pair

    output = staged.out
    train, held_out = split
    pt, ft, tok = load_pair(base, finetuned)
    names = region_names(pt, region)
    b = {n: p.detach() for n, p in pt.named_parameters()}
    f = dict(ft.named_parameters())
    tau = {n: (f[n].detach() - b[n]) for n in names}
    total = sum(tau[n].numel() for n in names)

    with tempfile.TemporaryDirectory(prefix="surgery-localize-") as tmp:
        manifest, m0 = _data_free_patch(base, finetuned, density, region, Path(tmp) / "patch", b, names)
    batches = _batches(tok, [examples[i] for i in train], batch_size)
    test_batches = _batches(tok, [examples[i] for i in held_out], batch_size) if held_out else batches

    gen = torch.Generator().manual_seed(seed)
    s = {n: torch.rand(tau[n].shape, generator=gen).requires_grad_(True) for n in names}
    k0 = sum(int(m0[n].sum()) for n in names)

    def candidate() -> dict:
        with torch.no_grad():
            g = {n: gamma(m0[n], s[n]) for n in names}
            if not fixed_density:
                return {n: (g[n] > 0.5).float() for n in names}
            flat = torch.cat([g[n].flatten() for n in names])
            keep = torch.zeros_like(flat)
            keep[torch.topk(flat, k0).indices] = 1.0
            out, pos = {}, 0
            for n in names:
                out[n] = keep[pos : pos + g[n].numel()].view_as(g[n])
                pos += g[n].numel()
            return out

    history = []
    best: tuple | None = None
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            mask = candidate()
            sc = _score(pt, grafted_params(b, tau, mask), batches)
            kept = sum(int(mask[n].sum()) for n in names)
            history.append((step, kept, sc["accuracy"], sc["loss"]))
            if best is None or (sc["accuracy"], -sc["loss"]) > (best[1]["accuracy"], -best[1]["loss"]):
                best = (mask, sc, step, kept)
        if progress is not None:
            last = history[-1]
            progress(step + 1, steps + 1, f"step {last[0]}: train accuracy {last[2]:.3f}, loss {last[3]:.4f}")
        if step == steps:
            break
        bi, bl = batches[step % len(batches)]
        params = grafted_params(b, tau, {n: gamma(m0[n], s[n]) for n in names})
        loss, _ = _loss_and_hits(pt, params, bi, bl)
        grads = torch.autograd.grad(loss, [s[n] for n in names])
        # Scale-free step: the k0-th largest |grad| moves by lr (the top few by at most 4 lr), so
        # about the data-free count of entries can change sides in ~10 / lr steps.
        scale = torch.topk(torch.cat([g.abs().flatten() for g in grads]), max(1, k0)).values[-1]
        if float(scale) == 0.0:
            continue
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                s[n] -= (lr * g / scale).clamp(-4 * lr, 4 * lr)

    mask, _, best_step, kept = best
    scores = {
        "base": _score(pt, None, test_batches),
        "finetuned": _score(ft, None, test_batches),
        "data_free": _score(pt, grafted_params(b, tau, m0), test_batches),
        "optimised": _score(pt, grafted_params(b, tau, mask), test_batches),
    }
    _write_patch(staged, manifest, tau, mask, names, density, steps, lr, fixed_density, total)
    return LocalizeReport(str(base), str(finetuned), str(output), density, kept, total, k0, scores,
                          best_step, tuple(history), tuple(held_out))  # fmt: skip


def split_examples(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) example indices: a seeded shuffle, ``round(holdout * n)`` (at least one
    when ``holdout > 0``) held out; both sorted."""
    import random

    if not 0.0 <= holdout < 1.0:
        raise RecipeError(f"holdout must be in [0, 1), got {holdout}")
    k = max(1, round(holdout * n)) if holdout > 0 else 0
    if n - k < 1:
        raise RecipeError(
            f"{n} example(s) cannot be split into training data and {k} held-out example(s)",
            hint="give more examples, or --holdout 0 to report accuracy on the training data",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])


def _batches(tokenizer: Any, examples: Sequence[tuple[str, str]], batch_size: int) -> list:
    ids, labels = _encode(tokenizer, examples)
    return [(ids[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


def _data_free_patch(base, finetuned, density, region, folder: Path, b: dict, names: list[str]):
    """The engine's data-free graft (global top-density over the region): manifest and masks."""
    import numpy as np
    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.engine import EngineOptions, merge
    from surgery.patch import INDICES, patched_names, read_manifest
    from surgery.recipe import make_recipe

    params = {"density": density, "granularity": "global", "region": region}
    merge(make_recipe("patch", [str(finetuned)], str(base), params), folder, EngineOptions(threads=1))
    manifest = read_manifest(folder)
    masks = {n: torch.zeros_like(b[n]) for n in names}
    with open_checkpoint(folder) as ckpt:
        for name in patched_names(ckpt):
            if name not in masks:
                raise RecipeError(
                    f"the data-free patch touches {name}, outside the model's region parameters"
                )
            idx = ckpt.read(name + INDICES).astype(np.int64)
            masks[name].view(-1)[torch.from_numpy(idx)] = 1.0
    return manifest, masks


def _write_patch(staged, manifest: dict, tau: dict, mask: dict, names: list[str], density: float,
                 steps: int, lr: float, fixed_density: bool, total: int) -> None:  # fmt: skip
    """The mask as a sparse patch, in the format of surgery.patch (what `surgery apply` reads),
    written like every other output: staged, journaled, renamed when complete."""
    import torch

    from surgery.files import MANIFEST
    from surgery.names import natural_key
    from surgery.patch import INDICES, VALUES, patch_layout

    tensors, counts = {}, {}
    for n in sorted(names, key=natural_key):
        idx = torch.nonzero(mask[n].flatten() > 0.5).flatten().to(torch.int64)  # ascending
        counts[n] = int(idx.numel())
        if idx.numel():
            tensors[n + INDICES] = idx.contiguous().numpy()
            tensors[n + VALUES] = tau[n].flatten()[idx].to(torch.float32).contiguous().detach().numpy()
    writer = staged.writer(patch_layout(counts, 5 * 10**9))
    for name, values in tensors.items():
        if name not in writer.done:
            writer.write(name, 0, values)
            writer.mark_done(name)
    kept = sum(counts.values())
    data = dict(manifest)
    data.update(
        method="localize",
        parameters={"density": density, "steps": steps, "lr": lr, "fixed_density": fixed_density,
                    "granularity": "global", "region": manifest.get("parameters", {}).get("region")},
        tensors={n: {"shape": list(tau[n].shape), "kept": counts[n]} for n in counts},
        kept=kept,
        total=total,
        fraction=kept / total if total else 0.0,
    )  # fmt: skip
    writer.finalize({MANIFEST: (json.dumps(data, indent=2) + "\n").encode()})


# -- overlap ----------------------------------------------------------------------------------------
def compare_patches(a: str | Path, b: str | Path) -> dict:
    """Jaccard overlap |A & B| / |A | B| of two patches' index sets, per tensor and overall."""
    import numpy as np

    from surgery.checkpoint import open_checkpoint
    from surgery.errors import RecipeError as _RE
    from surgery.patch import INDICES, is_patch, patched_names

    sets = []
    for path in (a, b):
        with open_checkpoint(path) as ckpt:
            if not is_patch(ckpt):
                raise _RE(
                    f"{path} is not a sparse patch", hint="write one with `surgery localize` or --graft"
                )
            sets.append({n: ckpt.read(n + INDICES).astype(np.int64) for n in patched_names(ckpt)})
    tensors, tot = {}, {"a": 0, "b": 0, "both": 0, "union": 0}
    for name in sorted(set(sets[0]) | set(sets[1])):
        ia, ib = sets[0].get(name, np.empty(0, np.int64)), sets[1].get(name, np.empty(0, np.int64))
        both = int(np.intersect1d(ia, ib, assume_unique=True).size)
        union = int(ia.size + ib.size - both)
        tensors[name] = {"a": int(ia.size), "b": int(ib.size), "both": both,
                         "jaccard": both / union if union else 0.0}  # fmt: skip
        for key, v in (("a", ia.size), ("b", ib.size), ("both", both), ("union", union)):
            tot[key] += int(v)
    overall = {"a": tot["a"], "b": tot["b"], "both": tot["both"],
               "jaccard": tot["both"] / tot["union"] if tot["union"] else 0.0}  # fmt: skip
    return {"a": str(a), "b": str(b), "tensors": tensors, "overall": overall}
