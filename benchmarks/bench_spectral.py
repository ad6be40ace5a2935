#!/usr/bin/env python3
"""Spectral merges and the RegMean calibration pass at Llama-3.2-1B width, on a 2-block slice.

    python benchmarks/bench_spectral.py --json results/spectral-1b-slice.json

A full 1B merge with per-matrix SVDs takes hours on a small loaded CPU, so this times a slice:
the real widths (hidden 2048, intermediate 8192, 8 kv heads x 64, vocab 128256, tied embedding)
with only ``--blocks`` decoder blocks (make_synthetic.py ``--shape 1b --blocks N``, generated
under --data if missing). Each merge runs as a subprocess (`surgery merge ... --max-memory`),
timed and its peak RSS taken with bench_merge.py's helpers. Task arithmetic is the reference:
what a method costs beyond it is its per-matrix work, and

    full_s = ta_s * full_bytes / slice_bytes + (method_s - ta_s) * full_blocks / blocks

extrapolates to the 16-block model (streaming cost scales with bytes, per-matrix work with the
number of block matrices; the embedding follows the key policy, not the spectral path). WUDI
runs only ``--wudi-steps`` Adam steps; its per-step time is (wudi_s - ta_s) / steps (an upper
bound: it includes the per-matrix setup) and is extrapolated to the default 300 steps.

The calibration pass (`surgery.calibration.collect_grams`, a fresh cache each time) is timed on
the bundled family's fine-tune (examples/family) and on the slice's base given the family's
tokenizer (its ids all lie inside the 1B vocabulary), with --calib-texts texts of the family's
tasks: tokens/s and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_synthetic  # noqa: E402
from bench_merge import GB, drop_cache, machine_facts, model_files, run_measured  # noqa: E402

FLAG = {
    "task_arithmetic": "--task-arithmetic",
    "tsv_merge": "--tsv-merge",
    "iso_c": "--iso-c",
    "wudi": "--wudi",
}
WUDI_DEFAULT_STEPS = 300
FAMILY = os.path.join(REPO, "examples", "family")
CALIB_CODE = (
    "import json, sys\n"
    "from surgery.calibration import collect_grams\n"
    "g = collect_grams(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])\n"
)


def slice_inputs(data: str, blocks: int, seed: int) -> tuple[list[str], float | None]:
    gen_args = ["--shape", "1b", "--blocks", str(blocks), "--out", data, "--seed", str(seed)]
    params = make_synthetic.params_of(make_synthetic.build_parser().parse_args(gen_args))
    gen_s = None
    if not make_synthetic.is_complete(data, params):
        print(f"generating the slice under {data} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), *gen_args], check=True)
        gen_s = time.perf_counter() - t0
    return make_synthetic.model_dirs(data, 2), gen_s


def merge_row(surgery: list[str], method: str, dirs: list[str], args, work: str) -> dict:
    base, *fts = dirs
    out = os.path.join(work, f"out-{method}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*surgery, "merge", *fts, "--base", base, FLAG[method], "--max-memory", args.max_memory, "-q"]
    cmd += ["--wudi-steps", str(args.wudi_steps)] if method == "wudi" else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["-o", out]
    drop_cache([f for d in dirs for f in model_files(d)])
    print(f"  {method}: {' '.join(cmd)}", flush=True)
    r = run_measured(cmd, os.path.join(work, method), timeout=args.timeout)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"    {r.get('wall_s', 0):.1f} s, peak RSS {r.get('peak_rss_gib', 0):.2f} GiB, ok={r['ok']}",
        flush=True,
    )
    return {"method": method, "cmd": " ".join(cmd), **r}


def extrapolate(rows: list[dict], n_matrices: int, blocks: int, slice_bytes: int, args) -> None:
    """Adds per-matrix time and the 16-block estimate to each row (formula in the module doc)."""
    ta = next((r for r in rows if r["method"] == "task_arithmetic" and r["ok"]), None)
    if ta is None:
        return
    full_blocks = make_synthetic.SHAPES["1b"]["layers"]
    full_bytes = sum(s.nbytes for s in make_synthetic.tensor_specs(make_synthetic.SHAPES["1b"]))
    stream_full = ta["wall_s"] * full_bytes / slice_bytes
    for r in rows:
        if not r["ok"]:
            continue
        extra = max(r["wall_s"] - ta["wall_s"], 0.0)
        if r["method"] == "wudi":
            r["wudi_steps"] = args.wudi_steps
            r["per_step_s"] = extra / args.wudi_steps
            r["per_step_per_matrix_s"] = r["per_step_s"] / n_matrices
            extra = r["per_step_s"] * WUDI_DEFAULT_STEPS
            r["slice_s_at_300_steps_est"] = ta["wall_s"] + extra
        r["extra_per_matrix_s"] = extra / n_matrices
        r["full_1b_s_est"] = stream_full + extra * full_blocks / blocks


def calib_texts(path: str, n: int) -> str:
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from tasks import make_example

    rng = random.Random("bench-calibration")
    with open(path, "w") as f:
        for _ in range(n):
            e = make_example("sort", rng, "train")
            f.write(json.dumps({"text": e.prompt + e.answer}) + "\n")
    return path


def with_family_tokenizer(model: str, folder: str) -> str:
    """A view of ``model`` (symlinks) that carries the family's tokenizer files."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(model):
        if name.endswith((".safetensors", ".json")) and name != "synthetic.json":
            dst = os.path.join(folder, name)
            if not os.path.lexists(dst):
                os.symlink(os.path.join(model, name), dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FAMILY, "base", name), folder)
    return folder


def calib_row(label: str, model: str, texts: str, work: str, timeout: float) -> dict:
    cache = tempfile.mkdtemp(prefix=f"grams-{label}-", dir=work)
    cmd = [sys.executable, "-c", CALIB_CODE, model, texts, cache]
    drop_cache(model_files(model))
    print(f"  calibration pass on {label}: {model}", flush=True)
    r = run_measured(cmd, os.path.join(work, f"calib-{label}"), timeout=timeout)
    row = {"model": label, "path": model, **r}
    if r["ok"]:
        (folder,) = [d for d in os.listdir(cache) if not d.startswith(".")]
        with open(os.path.join(cache, folder, "grams.json")) as f:
            meta = json.load(f)
        row |= {
            "texts": meta["texts"],
            "tokens": meta["tokens"],
            "tokens_per_s": meta["tokens"] / r["wall_s"],
        }
        row["gram_bytes"] = sum(
            os.path.getsize(os.path.join(cache, folder, n)) for n in os.listdir(os.path.join(cache, folder))
        )
    shutil.rmtree(cache, ignore_errors=True)
    print(
        f"    {r.get('wall_s', 0):.1f} s, peak RSS {r.get('peak_rss_gib', 0):.2f} GiB, ok={r['ok']}",
        flush=True,
    )
    return row


def load_facts() -> dict:
    with open("/proc/loadavg") as f:
        return {
            "loadavg": f.read().split()[:3],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }


def fmt(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def merge_table(rows: list[dict]) -> list[str]:
    lines = [
        "| merge | slice wall s | peak RSS GiB | extra s per block matrix | 16-block 1B estimate s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["method"] + (f" ({r['wudi_steps']} steps)" if "wudi_steps" in r else "")
        if not r["ok"]:
            lines.append(f"| {name} | failed | | | |")
            continue
        lines.append(
            f"| {name} | {fmt(r['wall_s'])} | {fmt(r['peak_rss_gib'], 2)} | "
            f"{fmt(r.get('extra_per_matrix_s'), 2)} | {fmt(r.get('full_1b_s_est'), 0)} |"
        )
        if "per_step_s" in r:
            lines.append(
                f"| wudi, 300 steps (extrapolated: {fmt(r['per_step_s'], 2)} s/step on the slice) | "
                f"{fmt(r['slice_s_at_300_steps_est'], 0)} | | | |"
            )
    return lines


def calib_table(rows: list[dict]) -> list[str]:
    lines = [
        "| calibration pass | texts | tokens | wall s | tokens/s | peak RSS GiB | Grams MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['texts']} | {r['tokens']} | {fmt(r['wall_s'])} | "
            f"{fmt(r['tokens_per_s'])} | {fmt(r['peak_rss_gib'], 2)} | {fmt(r['gram_bytes'] / 1e6, 0)} |"
        )
    return lines


def markdown(res: dict) -> str:
    """The README tables, from a results JSON."""
    tables = [merge_table(res["merges"])] if res["merges"] else []
    tables += [calib_table(res["calibration"])] if res["calibration"] else []
    return "\n\n".join("\n".join(t) for t in tables)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/bench-data/1b-slice", help="slice inputs: DATA/{base,ft1,ft2}")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(FLAG))
    ap.add_argument("--max-memory", default="2GiB")
    ap.add_argument("--threads", type=int, help="passed to surgery (default: its own, all cores)")
    ap.add_argument("--wudi-steps", type=int, default=5, help="WUDI Adam steps timed (default 5)")
    ap.add_argument("--calib-texts", type=int, default=256)
    ap.add_argument("--parts", default="merge,calib-family,calib-1b", help="comma list (default: all)")
    ap.add_argument("--surgery", help="surgery command (default: this Python -m surgery_cli.main)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-run timeout, seconds")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--report", metavar="JSON", help="only print the markdown tables of a results file")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)))
        return 0
    parts = set(args.parts.split(","))
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in FLAG:
            ap.error(f"unknown method {m!r} (choose from {', '.join(FLAG)})")
    surgery = args.surgery.split() if args.surgery else [sys.executable, "-m", "surgery_cli.main"]

    dirs, gen_s = slice_inputs(args.data, args.blocks, args.seed)
    slice_bytes = sum(os.path.getsize(f) for f in model_files(dirs[0]))
    n_matrices = 7 * args.blocks  # q, k, v, o, gate, up, down per block
    work = tempfile.mkdtemp(prefix="bench-spectral-", dir=args.data)
    res = {
        "slice": {
            "shape": "1b",
            "blocks": args.blocks,
            "model_gb": slice_bytes / GB,
            "block_matrices": n_matrices,
        },
        "max_memory": args.max_memory,
        "machine": machine_facts(args.data),
        "load_before": load_facts(),
        "generate_s": gen_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "merges": [],
        "calibration": [],
    }
    try:
        if "merge" in parts:
            res["merges"] = [merge_row(surgery, m, dirs, args, work) for m in methods]
            extrapolate(res["merges"], n_matrices, args.blocks, slice_bytes, args)
        if parts & {"calib-family", "calib-1b"}:
            texts = calib_texts(os.path.join(work, "calibration.jsonl"), args.calib_texts)
            # the interpreter's start and imports, part of every calibration row's wall time
            startup = [sys.executable, "-c", "import torch, transformers, surgery.blockwise"]
            res["calibration_startup"] = run_measured(startup, os.path.join(work, "startup"))
        if "calib-family" in parts:
            res["calibration"].append(
                calib_row("family", os.path.join(FAMILY, "ft_sort"), texts, work, args.timeout)
            )
        if "calib-1b" in parts:
            view = with_family_tokenizer(dirs[0], os.path.join(work, "base-with-tokenizer"))
            res["calibration"].append(calib_row(f"1b-{args.blocks}-blocks", view, texts, work, args.timeout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_after"] = load_facts()
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps(res, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if all(r["ok"] for r in res["merges"] + res["calibration"]) else 1


if __name__ == "__main__":
    sys.exit(main())
