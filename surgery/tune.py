"""Choosing a merge's parameters by measurement (``surgery tune``).

Every merging paper picks its scale (alpha, lambda) on held-out data; this does the same: merge each
point of a grid of parameters, evaluate it on an eval file, keep the best, and write it with its
score. Eval files are JSONL, one of two kinds (not mixed):

* ``{"prompt": ..., "answer": ...}``: exact match of the greedy continuation (stripped), higher is
  better;
* ``{"text": ...}``: mean token loss (negative log-likelihood per predicted token), lower is better.

Each grid point is a complete streamed merge (the engine's budget and guards apply), written to a work
folder beside the output, evaluated with transformers, and removed unless it is the best so far.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from surgery.errors import InputNotFoundError, OutputError, RecipeError
from surgery.jsonl import lines_of, parse_line

RESULTS = "surgery_tune.json"
PLOT = "surgery_tune.png"


@dataclass(frozen=True)
class EvalSet:
    kind: str  # "exact_match" or "loss"
    items: tuple  # ((prompt, answer), ...) or (text, ...)
    source: str

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "exact_match"


@dataclass(frozen=True)
class TunePoint:
    params: dict
    score: float
    merge_seconds: float
    eval_seconds: float


@dataclass(frozen=True)
class TuneResult:
    method: str
    metric: str
    higher_is_better: bool
    points: tuple[TunePoint, ...]
    best: TunePoint
    output: Path
    files: dict = field(default_factory=dict)  # "results", "plot" -> written paths

    def to_dict(self) -> dict:
        rows = [{"params": p.params, "score": p.score, "merge_seconds": round(p.merge_seconds, 3),
                 "eval_seconds": round(p.eval_seconds, 3)} for p in self.points]  # fmt: skip
        return {"method": self.method, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "best": {"params": self.best.params, "score": self.best.score}, "points": rows}  # fmt: skip


def _number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_grid(specs: list[str]) -> list[dict]:
    """``["scale=0.3,0.5", "density=0.1,0.2"]`` -> the 4 points of their product, in order."""
    axes: dict[str, list] = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not name or not values.strip():
            raise RecipeError(f"cannot read grid {spec!r}", hint='write --grid "scale=0.3,0.5,0.8"')
        if name in axes:
            raise RecipeError(f"grid parameter {name!r} given twice", hint="one --grid per parameter")
        try:
            axes[name] = [_number(v.strip()) for v in values.split(",") if v.strip()]
        except ValueError:
            raise RecipeError(f"grid {spec!r}: values must be numbers", hint="e.g. scale=0.5,1.0") from None
    if not axes:
        raise RecipeError("no grid given", hint='pass --grid "scale=0.3,0.5,0.8,1.0"')
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def read_eval(path: str | os.PathLike) -> EvalSet:
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"eval file {p} does not exist", hint="pass --eval FILE.jsonl", path=str(p))
    qa, texts = [], []
    for lineno, line in lines_of(p):
        rec = parse_line(p, lineno, line)
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("prompt"), str)
            and isinstance(rec.get("answer"), str)
        ):
            qa.append((rec["prompt"], rec["answer"]))
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        else:
            raise RecipeError(
                f"{p}:{lineno}: needs `prompt` and `answer`, or `text`", hint="see `surgery tune -h`"
            )
    if qa and texts:
        raise RecipeError(f"{p} mixes prompt/answer and text lines", hint="use one kind of eval per file")
    if not qa and not texts:
        raise RecipeError(f"{p} holds no examples", hint='one {"prompt": ..., "answer": ...} per line')
    return EvalSet("exact_match", tuple(qa), str(p)) if qa else EvalSet("loss", tuple(texts), str(p))


def score_model(model_dir: str | os.PathLike, evalset: EvalSet) -> float:
    """Exact-match accuracy, or mean token loss, of the checkpoint in ``model_dir`` (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        if evalset.kind == "loss":
            return _mean_loss(model, tok, evalset.items)
        return _exact_match(model, tok, evalset.items)


def _mean_loss(model, tok, texts) -> float:
    import torch

    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    if count == 0:
        raise RecipeError("the eval texts hold no token to predict", hint="use texts of two tokens or more")
    return total / count


def _exact_match(model, tok, pairs) -> float:
    """Greedy answers, prompts batched by token length (no padding), stopped at <eos>."""
    import torch

    encoded = [tok(p)["input_ids"] for p, _ in pairs]
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for _, a in pairs) + 2
    eos = tok.eos_token_id
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    correct = 0
    for idx in groups.values():
        ids = torch.tensor([encoded[i] for i in idx])
        start, done = ids.shape[1], torch.zeros(len(idx), dtype=torch.bool)
        for _ in range(longest):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = torch.where(done, eos, nxt)
                done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        for row, i in zip(ids[:, start:].tolist(), idx):
            row = row[: row.index(eos)] if eos is not None and eos in row else row
            correct += tok.decode(row, skip_special_tokens=True).strip() == pairs[i][1].strip()
    return correct / len(pairs)


def tune(
    recipe,
    grid: list[dict],
    evalset: EvalSet,
    out: str | os.PathLike,
    run_merge: Callable[[object, Path], None],
    *,
    overwrite: bool = False,
    on_point: Callable[[TunePoint], None] | None = None,
) -> TuneResult:
    """Merge and score every grid point; the best merge ends in ``out`` with its results and plot.

    ``run_merge(recipe, folder)`` writes one complete merge (the caller's engine options and card).
    Grid points are written to a work folder beside ``out``; surgery removes only what it wrote there.
    A non-empty ``out`` is refused before any work unless ``overwrite`` (then the best point is merged
    again into it through ``run_merge``, whose options must allow the overwrite).
    """
    from surgery.recipe import make_recipe

    out = Path(out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not overwrite:
        raise OutputError(
            f"output folder {out} is not empty", hint="choose a new folder, or pass --overwrite"
        )
    work = out.parent / f".{out.name}.surgery-tune"
    try:
        work.mkdir(parents=True)
    except FileExistsError:
        raise OutputError(
            f"{work} exists: another tune of {out} is running, or one was killed",
            hint=f"if no tune is running, delete {work}",
        ) from None
    points: list[TunePoint] = []
    best: tuple[TunePoint, Path] | None = None
    try:
        for k, params in enumerate(grid):
            merged = dict(recipe.parameters, **params)
            point_recipe = make_recipe(recipe.method, recipe.models, recipe.base, merged, recipe.dtype,
                                       recipe.max_shard_size, recipe.lines)  # fmt: skip
            folder = work / f"point-{k:03d}"
            t0 = time.perf_counter()
            run_merge(point_recipe, folder)
            t1 = time.perf_counter()
            score = score_model(folder, evalset)
            point = TunePoint(params, score, t1 - t0, time.perf_counter() - t1)
            points.append(point)
            if on_point:
                on_point(point)
            if best is None or _better(score, best[0].score, evalset.higher_is_better):
                if best is not None:
                    shutil.rmtree(best[1])
                best = (point, folder)
            else:
                shutil.rmtree(folder)
        assert best is not None
        if occupied:
            params = dict(recipe.parameters, **best[0].params)
            run_merge(make_recipe(recipe.method, recipe.models, recipe.base, params, recipe.dtype,
                                  recipe.max_shard_size, recipe.lines), out)  # fmt: skip
        else:
            if out.exists():
                out.rmdir()
            os.replace(best[1], out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = TuneResult(recipe.method, evalset.kind, evalset.higher_is_better, tuple(points), best[0], out)
    return _write_results(result, evalset)


def _better(score: float, than: float, higher: bool) -> bool:
    return score > than if higher else score < than


def _write_results(result: TuneResult, evalset: EvalSet) -> TuneResult:
    out = result.output
    (out / RESULTS).write_text(json.dumps(dict(result.to_dict(), eval=evalset.source), indent=2) + "\n")
    files = {"results": out / RESULTS}
    card = out / "README.md"
    section = "\n## Tuned by measurement\n\n" + format_table(result) + "\n"
    card.write_text((card.read_text() if card.is_file() else f"# {out.name}\n") + section)
    try:
        files["plot"] = plot_tuning(result, out / PLOT)
    except ImportError:  # matplotlib is optional (the `plot` extra)
        pass
    return replace(result, files=files)


def format_table(result: TuneResult) -> str:
    """A Markdown table of every grid point; the best is marked."""
    names = list(result.points[0].params)
    arrow = "higher is better" if result.higher_is_better else "lower is better"
    head = "| " + " | ".join(names) + f" | {result.metric} ({arrow}) | merge s | eval s |"
    rule = "|" + "---|" * (len(names) + 3)
    rows = []
    for p in result.points:
        mark = " **best**" if p is result.best else ""
        cells = " | ".join(str(p.params[n]) for n in names)
        rows.append(f"| {cells} | {p.score:.4f}{mark} | {p.merge_seconds:.1f} | {p.eval_seconds:.1f} |")
    return "\n".join([head, rule, *rows])


def plot_tuning(result: TuneResult, path: Path) -> Path:
    """Score against the first grid parameter, one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.points[0].params)
    x_name, others = names[0], names[1:]
    lines: dict[tuple, list[TunePoint]] = {}
    for p in result.points:
        lines.setdefault(tuple(p.params[n] for n in others), []).append(p)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for key, pts in lines.items():
        pts = sorted(pts, key=lambda p: p.params[x_name])
        label = ", ".join(f"{n}={v}" for n, v in zip(others, key)) or result.method
        ax.plot([p.params[x_name] for p in pts], [p.score for p in pts], marker="o", label=label)
    ax.scatter([result.best.params[x_name]], [result.best.score], s=120, facecolors="none", edgecolors="k")
    ax.set_xlabel(x_name)
    ax.set_ylabel(result.metric)
    ax.set_title(f"surgery tune: {result.method}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
