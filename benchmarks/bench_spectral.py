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


def extrapolate(rows: list[dict], n_matrices: int, blocks: int, slice_bytes: int) -> None:
    """Adds per-matrix time and the 16-block estimate to each row (formula in the module doc),
    from wall time and from CPU time (user + sys: on a machine shared with other jobs, the
    steadier of the two)."""
    ta = next((r for r in rows if r["method"] == "task_arithmetic" and r["ok"]), None)
    if ta is None:
        return
    full_blocks = make_synthetic.SHAPES["1b"]["layers"]
    full_bytes = sum(s.nbytes for s in make_synthetic.tensor_specs(make_synthetic.SHAPES["1b"]))
    for r in rows:
        if r["ok"]:
            r["cpu_s"] = r["user_s"] + r["sys_s"]
    for clock in ("wall", "cpu"):
        key, ref = f"{clock}_s", ta[f"{clock}_s"]
        for r in rows:
            if not r["ok"]:
                continue
            extra = max(r[key] - ref, 0.0)
            if r["method"] == "wudi":
                steps = int(r["cmd"].split("--wudi-steps ")[1].split()[0])
                r["wudi_steps"] = steps
                r[f"{clock}_per_step_s"] = extra / steps
                extra = extra / steps * WUDI_DEFAULT_STEPS
                r[f"{clock}_slice_s_at_300_steps_est"] = ref + extra
            r[f"{clock}_extra_per_matrix_s"] = extra / n_matrices
            r[f"{clock}_full_1b_s_est"] = ref * full_bytes / slice_bytes + extra * full_blocks / blocks


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
        "| merge | wall s | CPU s | peak RSS GiB | extra CPU s per block matrix | 16-block 1B est. CPU s "
        "| 16-block 1B est. wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["method"] + (f" ({r['wudi_steps']} steps)" if "wudi_steps" in r else "")
        if not r["ok"]:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        lines.append(
            f"| {name} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {fmt(r['peak_rss_gib'], 2)} | "
            f"{fmt(r.get('cpu_extra_per_matrix_s'), 2)} | {fmt(r.get('cpu_full_1b_s_est'), 0)} | "
            f"{fmt(r.get('wall_full_1b_s_est'), 0)} |"
        )
        if "wudi_steps" in r:
            lines.append(
                f"| wudi, 300 steps (extrapolated from {fmt(r['cpu_per_step_s'], 1)} CPU s / "
                f"{fmt(r['wall_per_step_s'], 1)} wall s per step) | "
                f"{fmt(r['wall_slice_s_at_300_steps_est'], 0)} | {fmt(r['cpu_slice_s_at_300_steps_est'], 0)} "
                f"| | {fmt(r['cpu_extra_per_matrix_s'], 1)} | {fmt(r['cpu_full_1b_s_est'], 0)} | "
                f"{fmt(r['wall_full_1b_s_est'], 0)} |"
            )
    return lines


def calib_table(rows: list[dict]) -> list[str]:
    lines = [
        "| calibration pass | texts | tokens | wall s | CPU s | tokens / CPU s | peak RSS GiB (anon) "
        "| Grams MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | failed | | | | | | |")
            continue
        cpu = r["user_s"] + r["sys_s"]
        lines.append(
            f"| {r['model']} | {r['texts']} | {r['tokens']} | {fmt(r['wall_s'])} | {fmt(cpu)} | "
            f"{fmt(r['tokens'] / cpu, 0)} | {fmt(r['peak_rss_gib'], 2)} "
            f"({fmt(r['peak_anon_gib_sampled'], 2)}) | "
            f"{fmt(r['gram_bytes'] / 1e6, 0)} |"
        )
    return lines


def markdown(results: list[dict]) -> str:
    """The README tables, from one or more results JSONs (each merge run with its own reference)."""
    merges, calib = [], []
    for res in results:
        sl = res["slice"]
        extrapolate(res["merges"], sl["block_matrices"], sl["blocks"], round(sl["model_gb"] * GB))
        merges += res["merges"]
        calib += res["calibration"]
    tables = [merge_table(merges)] if merges else []
    tables += [calib_table(calib)] if calib else []
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
    ap.add_argument("--report", metavar="JSON", nargs="+", help="only print the tables of results files")
    args = ap.parse_args(argv)
    if args.report:
        results = []
        for path in args.report:
            with open(path) as f:
                results.append(json.load(f))
        print(markdown(results))
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
            extrapolate(res["merges"], n_matrices, args.blocks, slice_bytes)
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
