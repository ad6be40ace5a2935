"""Evidence for composed patches, LIFT patches, half reset and EFT on the bundled family.

1. Composed patches (Ansell et al. 2022): the add, reverse and sort patches applied alone and together
   in one `surgery apply P1 P2 P3 --to base` pass; the pairwise overlap table.
2. LIFT (principal weights of the base) vs magnitude (top |tau|) patches of the same size, restricted
   to the block matrices: `surgery diff --lift-rank R --density D` vs `--density D --region ...`.
3. Half reset of the forgetting fine-tune (`ft_sort_forget`): `surgery reset base ft_sort_forget
   --fraction F` by matrix (random seeds, smallest / largest relative update) and by element.
4. EFT (Mitchell et al. 2024): with LB = SB the decoding must equal the small fine-tune's, token for
   token; and EFT onto `base_v2` (the family's second release, same size) against weight-space transfer.

Prints markdown tables (used in the README). Usage: python examples/seed_ops.py [--n 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import evaluate, greedy_answers  # noqa: E402
from tasks import eval_set  # noqa: E402

from surgery.analysis.eft import eft_generate  # noqa: E402

hf_logging.disable_progress_bar()
FAMILY = HERE / "family"
BASE = FAMILY / "base"
TASKS = ("add", "reverse", "sort", "copy", "shift")
BLOCK_MATRICES = r"layers\.\d+\.(self_attn|mlp)\."


def surgery(*args: object, capture: bool = False) -> str:
    """Run the `surgery` command (this checkout's, via the interpreter running the script)."""
    cmd = [sys.executable, "-m", "surgery_cli.main", *map(str, args), "-q"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout if capture else ""


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [c if isinstance(c, str) else f"{100 * c:.1f}" for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_row(name: str, folder: Path, tasks: tuple[str, ...], n: int) -> list[object]:
    acc = evaluate(folder, tasks, n)
    return [name, *(acc[t] for t in tasks)]


def composed(out: Path, n: int) -> None:
    print("### Composed patches (add + reverse + sort)\n")
    fts = ("ft_add", "ft_reverse", "ft_sort")
    for density in (None, 0.2):
        label = "dense diffs" if density is None else f"top-{density} patches"
        patches = []
        for ft in fts:
            p = out / f"{ft}_{density or 'dense'}"
            extra = () if density is None else ("--density", density)
            surgery("diff", BASE, FAMILY / ft, *extra, "-o", p, "--overwrite")
            patches.append(p)
        rows = [accuracy_row("base", BASE, TASKS, n)]
        for ft, p in zip(fts, patches):
            alone = out / f"{p.name}_alone"
            surgery("apply", p, "--to", BASE, "-o", alone, "--overwrite")
            rows.append(accuracy_row(f"{ft} {label} alone", alone, TASKS, n))
        both = out / f"composed_{density or 'dense'}"
        report = surgery("apply", *patches, "--to", BASE, "-o", both, "--overwrite", "--json", capture=True)
        rows.append(accuracy_row(f"all three {label}, one pass", both, TASKS, n))
        print(table(["model", *TASKS], rows))
        data = json.loads(report)
        shared = data["shared"]
        print(f"\n{label}: entries {', '.join(f'{e:,}' for e in data['entries'])}; shared add~reverse "
              f"{shared[0][1]:,}, add~sort {shared[0][2]:,}, reverse~sort {shared[1][2]:,}\n")  # fmt: skip


def lift(out: Path, n: int) -> None:
    print("### LIFT vs magnitude patches of equal size (block matrices only)\n")
    rows = []
    for ft, task in (("ft_sort", "sort"), ("ft_reverse", "reverse")):
        rows.append(
            [f"{ft} (full fine-tune)", "-", *(evaluate(FAMILY / ft, (task, "copy", "shift"), n).values())]
        )
        for density in (0.05, 0.2):
            mag = out / f"{ft}_mag_{density}"
            surgery("diff", BASE, FAMILY / ft, "--density", density, "--region", BLOCK_MATRICES, "-o", mag,
                    "--overwrite")  # fmt: skip
            kept = json.loads((mag / "surgery_diff.json").read_text())["kept"]
            rows.append([f"{ft} magnitude top-{density}", f"{kept:,}",
                         *accuracy_row("", apply(mag, out), (task, "copy", "shift"), n)[1:]])  # fmt: skip
            for rank in (4, 32):
                p = out / f"{ft}_lift_{density}_r{rank}"
                surgery(
                    "diff",
                    BASE,
                    FAMILY / ft,
                    "--lift-rank",
                    rank,
                    "--density",
                    density,
                    "-o",
                    p,
                    "--overwrite",
                )
                kept_l = json.loads((p / "surgery_diff.json").read_text())["kept"]
                assert kept_l == kept, (kept_l, kept)
                rows.append([f"{ft} LIFT rank {rank} top-{density}", f"{kept_l:,}",
                             *accuracy_row("", apply(p, out), (task, "copy", "shift"), n)[1:]])  # fmt: skip
    print(table(["patch", "entries", "own task", "copy", "shift"], rows))
    fts = (FAMILY / "ft_sort", FAMILY / "ft_reverse")
    flags = ("--no-rank", "--json", "--lift-rank", 4, "--lift-density", 0.05)
    stats = json.loads(surgery("stats", BASE, *fts, *flags, capture=True))
    overall = stats["lift_overlap"]["overall"]["overlap"]
    print(f"\n`surgery stats --lift-rank 4 --lift-density 0.05`: the top-5% |tau| of ft_sort / ft_reverse "
          f"overlap the LIFT positions in {100 * overall[0]:.1f}% / {100 * overall[1]:.1f}% "
          f"(independent positions: 5%)\n")  # fmt: skip


def apply(patch: Path, out: Path) -> Path:
    target = out / f"{patch.name}_applied"
    surgery("apply", patch, "--to", BASE, "-o", target, "--overwrite")
    return target


def half_reset(out: Path, n: int) -> None:
    print("### Half reset of the forgetting fine-tune (ft_sort_forget)\n")
    tasks = ("sort", "copy", "shift")
    ft = FAMILY / "ft_sort_forget"
    rows = [accuracy_row("base", BASE, tasks, n), accuracy_row("ft_sort_forget", ft, tasks, n)]
    runs = [("by matrix, seed 0", ("--seed", 0)), ("by matrix, seed 1", ("--seed", 1)),
            ("by matrix, seed 2", ("--seed", 2)),
            ("by matrix, smallest update", ("--select", "smallest-update")),
            ("by matrix, largest update", ("--select", "largest-update")),
            ("by element, seed 0", ("--by", "element", "--seed", 0)),
            ("by element, smallest update", ("--by", "element", "--select", "smallest-update")),
            ("by element, largest update", ("--by", "element", "--select", "largest-update"))]  # fmt: skip
    for fraction in (0.5, 0.25):
        for name, flags in runs:
            o = out / f"reset_{fraction}_{name.replace(' ', '_').replace(',', '')}"
            surgery("reset", BASE, ft, "--fraction", fraction, *flags, "-o", o, "--overwrite")
            rows.append(accuracy_row(f"reset {fraction} {name}", o, tasks, n))
    print(table(["model", *tasks], rows) + "\n")


def eft(out: Path, n: int) -> None:
    print("### EFT\n")
    tok = AutoTokenizer.from_pretrained(BASE, local_files_only=True)

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()

    base, v2, ft = load(BASE), load(FAMILY / "base_v2"), load(FAMILY / "ft_sort")
    prompts = [e.prompt for t in ("sort", "copy") for e in eval_set(t, n)]
    own = greedy_answers(ft, tok, prompts)  # ft_sort's own greedy decoding (batched, no cache)
    same = sum(
        eft_generate(base, ft, base, p, 1.0, 8, tokenizer=tok)["text"] == o for p, o in zip(prompts, own)
    )
    print(
        f"LB = SB = base, SF = ft_sort: {same} of {len(prompts)} sort and copy prompts decode exactly as "
        "ft_sort\n"
    )
    transfer = out / "ft_sort_on_v2"
    surgery("transfer", "--from", BASE, "--finetuned", FAMILY / "ft_sort", "--to", FAMILY / "base_v2",
            "-o", transfer, "--overwrite")  # fmt: skip
    rows = []
    for task in ("sort", "copy", "shift"):
        examples = eval_set(task, n)
        row = [task]
        for lb, alpha in ((v2, 0.0), (v2, 1.0), (base, 1.0)):
            hits = sum(eft_generate(base, ft, lb, e.prompt, alpha, 8, tokenizer=tok)["text"] == e.answer
                       for e in examples)  # fmt: skip
            row.append(hits / len(examples))
        row.append(evaluate(transfer, (task,), n)[task])
        rows.append(row)
    header = [
        "task",
        "base_v2 alone",
        "EFT onto base_v2",
        "ft_sort (EFT, LB = SB)",
        "weight transfer to base_v2",
    ]
    print(table(header, rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "seed_ops")
    ap.add_argument("--only", default="composed,lift,reset,eft")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    steps = {"composed": composed, "lift": lift, "reset": half_reset, "eft": eft}
    for name in args.only.split(","):
        steps[name](args.out, args.n)


if __name__ == "__main__":
    main()
