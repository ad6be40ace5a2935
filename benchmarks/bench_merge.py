#!/usr/bin/env python3
"""Merge benchmark: surgery vs mergekit vs the machine's I/O ceiling, side by side, in one run.

    python benchmarks/bench_merge.py --shape 1b --json bench-1b.json

Inputs (a base and 2 fine-tunes) are generated with make_synthetic.py under --data if missing.
Every timed step first drops its input files from the page cache (fsync + posix_fadvise
DONTNEED on each file; no root needed), then runs as a subprocess. See benchmarks/README.md for
what each number means. Only the standard library is needed (psutil, if present, adds a sampled
anonymous-memory peak that also counts child processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_synthetic  # noqa: E402

GiB = 1024**3
GB = 1000**3
DEFAULT_METHODS = "task_arithmetic,breadcrumbs"
SURGERY_FLAG = {
    "task_arithmetic": "--task-arithmetic",
    "breadcrumbs": "--breadcrumbs",
    "ties": "--ties",
    "dare_ties": "--dare-ties",
}
SPARSE = ("breadcrumbs", "ties", "dare_ties")  # take --density (and breadcrumbs --gamma)


# ----------------------------------------------------------------------------- helpers
def model_files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def drop_cache(paths: list[str]) -> None:
    """Flush then evict each file from the page cache (works without root for files we can open)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fsync(fd)  # dirty pages are not evicted by DONTNEED
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(d: str) -> None:
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def tree_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def tail(text: str, n: int = 600) -> str:
    text = text.strip().replace("\n", " | ")
    return text[-n:]


def run_measured(
    cmd: list[str], log_prefix: str, env: dict | None = None, timeout: float | None = None
) -> dict:
    """Run cmd; wall time, peak RSS (wait4 rusage = what /usr/bin/time -v reports as 'Maximum
    resident set size'), sampled peak anonymous RSS over the process tree (psutil or /proc)."""
    out = open(log_prefix + ".stdout", "w+")
    err = open(log_prefix + ".stderr", "w+")
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "wall_s": None}
    peak_anon = 0
    rusage = None
    status = 0
    try:
        import psutil  # optional

        proc = psutil.Process(p.pid)
    except Exception:
        proc = None
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rusage = ru
            break
        peak_anon = max(peak_anon, _anon_rss(p.pid, proc))
        if timeout and time.perf_counter() - t0 > timeout:
            p.kill()
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    return {
        "ok": p.returncode == 0,
        "returncode": p.returncode,
        "wall_s": wall,
        "peak_rss_gib": rusage.ru_maxrss * 1024 / GiB,  # ru_maxrss is in KiB on Linux
        "peak_anon_gib_sampled": peak_anon / GiB,
        "user_s": rusage.ru_utime,
        "sys_s": rusage.ru_stime,
        # blocks the kernel fetched from storage (512-byte units): page-cache hits are not counted,
        # so this is what the run really read from disk (and wrote back)
        "disk_read_gb": rusage.ru_inblock * 512 / GB,
        "disk_write_gb": rusage.ru_oublock * 512 / GB,
        "stdout_tail": tail(stdout),
        "stderr_tail": tail(stderr),
    }


def _anon_rss(pid: int, proc) -> int:
    """RssAnon (bytes) of pid and its descendants."""
    pids = [pid]
    if proc is not None:
        try:
            pids += [c.pid for c in proc.children(recursive=True)]
        except Exception:
            pass
    total = 0
    for q in pids:
        try:
            with open(f"/proc/{q}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def machine_facts(data: str) -> dict:
    facts = {"nproc": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["ram_gib"] = round(int(line.split()[1]) * 1024 / GiB, 1)
    except OSError:
        pass
    try:
        df = subprocess.run(["df", "-PT", data], capture_output=True, text=True).stdout.splitlines()
        dev, fstype, size_k, _, avail_k = df[1].split()[:5]
        facts["disk"] = {
            "device": dev,
            "fstype": fstype,
            "size_gb": round(int(size_k) * 1024 / GB),
            "free_gb": round(int(avail_k) * 1024 / GB),
        }
        name = os.path.basename(os.path.realpath(dev))
        rot = f"/sys/class/block/{name}/queue/rotational"
        if os.path.exists(rot):
            facts["disk"]["rotational"] = open(rot).read().strip() == "1"
    except Exception:
        pass
    return facts


# ----------------------------------------------------------------------------- raw reader
def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def output_index(d: str) -> dict[str, tuple[str, dict, int]]:
    """name -> (file, header entry, data start) for a merged output folder."""
    idx = {}
    for p in model_files(d):
        hdr, start = read_header(p)
        for k, v in hdr.items():
            if k != "__metadata__":
                idx[k] = (p, v, start)
    return idx


def read_bf16(entry: tuple[str, dict, int]) -> np.ndarray:
    path, v, start = entry
    a, b = v["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        raw = np.frombuffer(f.read(b - a), np.uint16)
    assert v["dtype"] == "BF16", v["dtype"]
    return (raw.astype(np.uint32) << 16).view(np.float32)


CHECK_TENSORS = (
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.norm.weight",
)


def check_output(method: str, out: str, inputs: list[str], base: str, density: float) -> dict:
    """Cheap sanity check on a few tensors: task arithmetic vs a float32 reference (max error in
    output ulps), breadcrumbs: fraction of elements that moved off the base."""
    try:
        oi = output_index(out)
        bi = output_index(base)
        fi = [output_index(d) for d in inputs]
        res = {}
        for name in CHECK_TENSORS:
            if name not in oi:
                res[name] = "missing"
                continue
            o, b = read_bf16(oi[name]), read_bf16(bi[name])
            if method == "task_arithmetic":
                ref = b + sum(read_bf16(f[name]) - b for f in fi)
                ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)  # bf16 ulp
                res[name] = {"max_err_ulp": round(float(np.max(np.abs(o - ref) / ulp)), 3)}
            else:
                res[name] = {
                    "changed_frac": round(float(np.mean(o != b)), 4),
                    "expected_about": f"<= {min(1.0, len(inputs) * density):.2f}",
                }
        missing = sorted(set(bi) - set(oi))
        if missing:
            res["missing_tensors"] = missing[:5] + (["..."] if len(missing) > 5 else [])
        return res
    except Exception as e:  # never let the check kill the bench
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- parts
def io_ceiling(inputs: list[str], out_bytes: int, work: str) -> dict:
    files = [f for d in inputs for f in model_files(d)]
    in_bytes = sum(os.path.getsize(f) for f in files)
    drop_cache(files)
    t0 = time.perf_counter()
    subprocess.run("cat " + " ".join(shlex.quote(f) for f in files) + " > /dev/null", shell=True, check=True)
    read_s = time.perf_counter() - t0
    drop_cache(files)
    target = os.path.join(work, "io-ceiling.bin")
    bs = 16 * 1024**2
    count = math.ceil(out_bytes / bs)
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", f"bs={bs}", f"count={count}", "conv=fsync", "status=none"],
        check=True,
    )
    write_s = time.perf_counter() - t0
    os.remove(target)
    return {
        "read_bytes": in_bytes,
        "read_s": read_s,
        "read_gbps": in_bytes / GB / read_s,
        "write_bytes": count * bs,
        "write_s": write_s,
        "write_gbps": count * bs / GB / write_s,
        "ceiling_s": read_s + write_s,
    }


def find_surgery(opt: str | None) -> list[str] | None:
    if opt:
        return shlex.split(opt)
    exe = shutil.which("surgery")
    if exe:
        return [exe]
    cand = os.path.join(os.path.dirname(sys.executable), "surgery")
    return [cand] if os.path.exists(cand) else None


def find_mergekit(opt: str | None) -> str | None:
    if opt:
        return opt if os.path.exists(opt) or shutil.which(opt) else None
    return shutil.which("mergekit-yaml")


def mergekit_yaml(
    method: str, base: str, inputs: list[str], dtype: str | None, density: float, gamma: float
) -> str:
    params = {"weight": 1.0}
    if method in SPARSE:
        params.update(density=density)
    if method == "breadcrumbs":
        params.update(gamma=gamma)
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for d in inputs:
        lines += [
            f"  - model: {d}",
            "    parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}",
        ]
    if dtype:
        lines.append(f"dtype: {dtype}")
    lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


def run_tool(
    tool: str,
    method: str,
    cmd: list[str],
    inputs: list[str],
    base: str,
    out: str,
    work: str,
    ceiling: float | None,
    check: bool,
    density: float,
    timeout: float | None,
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache([f for d in [base, *inputs] for f in model_files(d)])
    print(f"  running {tool} {method}: {shlex.join(cmd)}", flush=True)
    r = run_measured(cmd, os.path.join(work, f"{tool}-{method}"), timeout=timeout)
    row = {"method": method, "tool": tool, "cmd": shlex.join(cmd), **r}
    if r.get("ok"):
        t0 = time.perf_counter()
        if os.path.isdir(out):
            fsync_tree(out)  # what is still dirty in the page cache, so the times compare to dd
        row["sync_s"] = time.perf_counter() - t0
        row["out_bytes"] = tree_bytes(out) if os.path.isdir(out) else 0
        total = r["wall_s"] + row["sync_s"]
        row["total_s"] = total
        row["x_ceiling"] = total / ceiling if ceiling else None
        if check:
            row["check"] = check_output(method, out, inputs, base, density)
    else:
        row["status"] = f"{tool} failed: " + (
            r.get("error") or r.get("stderr_tail") or r.get("stdout_tail") or f"rc={r['returncode']}"
        )
    shutil.rmtree(out, ignore_errors=True)
    return row


def help_startup(cmd: list[str], n: int = 5) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(cmd + ["--help"], capture_output=True)
        times.append(time.perf_counter() - t0)
        if r.returncode:
            return {"ok": False, "status": "surgery --help failed: " + tail(r.stderr.decode())}
    return {"ok": True, "median_s": statistics.median(times), "runs_s": times}


# ----------------------------------------------------------------------------- report
def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"### Merge benchmark: {res['shape']} ({res['model_gb']:.2f} GB per model, "
        f"{res['n_inputs']} fine-tunes + base, --max-memory {res['max_memory']})",
        "",
    ]
    disk = m.get("disk", {})
    lines.append(
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu', '?')}), "
        f"{m.get('ram_gib')} GiB RAM, "
        f"disk {disk.get('device', '?')} {disk.get('fstype', '')} "
        f"{disk.get('size_gb', '?')} GB ({disk.get('free_gb', '?')} GB free"
        f"{', rotational flag set' if disk.get('rotational') else ''}), "
        f"Python {m.get('python')}"
    )
    lines.append("")
    lines.append(
        "| method | tool | wall s | +sync s | peak RSS GiB | peak anon GiB | disk read GB | x I/O ceiling |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    io = res.get("io_ceiling")
    if io:
        lines.append(
            f"| (I/O ceiling) | cat + dd | {fmt(io['ceiling_s'])} | - | - | - "
            f"| {fmt(io['read_bytes'] / GB)} | 1.00 |"
        )
    for r in res["rows"]:
        if "status" in r:
            lines.append(f"| {r['method']} | {r['tool']} | {r['status'][:300]} | | | | | |")
        else:
            lines.append(
                f"| {r['method']} | {r['tool']} | {fmt(r['wall_s'])} "
                f"| {fmt(r.get('sync_s'))}"
                f" | {fmt(r['peak_rss_gib'], 2)} | {fmt(r['peak_anon_gib_sampled'], 2)}"
                f" | {fmt(r.get('disk_read_gb'))} | {fmt(r.get('x_ceiling'), 2)} |"
            )
    lines.append("")
    if io:
        lines.append(
            f"I/O ceiling: read {io['read_bytes'] / GB:.2f} GB in {io['read_s']:.1f} s "
            f"({io['read_gbps']:.2f} GB/s, cold) + write "
            f"{io['write_bytes'] / GB:.2f} GB in "
            f"{io['write_s']:.1f} s ({io['write_gbps']:.2f} GB/s, fsync) = "
            f"{io['ceiling_s']:.1f} s"
        )
    h = res.get("surgery_help")
    if h:
        lines.append(
            "surgery --help start-up: "
            + (f"{h['median_s'] * 1000:.0f} ms (median of 5)" if h.get("ok") else h.get("status", "?"))
        )
    for r in res["rows"]:
        if r.get("check"):
            lines.append(f"check {r['tool']} {r['method']}: {json.dumps(r['check'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(make_synthetic.SHAPES))
    ap.add_argument(
        "--data",
        default="/work/bench-data",
        help="inputs go to DATA/SHAPE/{base,ft1,ft2}, outputs to DATA/SHAPE/out",
    )
    ap.add_argument("--max-memory", default="2GiB", help="passed to surgery (default 2GiB)")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument(
        "--parts",
        default="io,surgery,mergekit,help",
        help="comma list of io, surgery, mergekit, help (default: all)",
    )
    ap.add_argument("--surgery", help="surgery command (default: `surgery` on PATH or next to this Python)")
    ap.add_argument("--surgery-args", default="", help="extra args for every surgery merge")
    ap.add_argument(
        "--surgery-defaults",
        action="store_true",
        help="don't pass --density/--outliers (= --density/--gamma) to surgery "
        "--breadcrumbs; use its defaults",
    )
    ap.add_argument("--mergekit", help="path to mergekit-yaml (default: on PATH)")
    ap.add_argument(
        "--mergekit-dtype",
        default="float32",
        help="mergekit compute dtype (`dtype:`); 'none' = the inputs' (bf16). Output is bfloat16 either way",
    )
    ap.add_argument("--mergekit-args", default="", help="extra args for mergekit-yaml")
    ap.add_argument(
        "--density",
        type=float,
        default=0.1,
        help="breadcrumbs and ties density (mergekit density, surgery --density)",
    )
    ap.add_argument(
        "--gamma", type=float, default=0.01, help="breadcrumbs gamma (mergekit gamma, surgery --outliers)"
    )
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the output sanity check")
    ap.add_argument("--timeout", type=float, default=3600, help="per-merge timeout, seconds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in SURGERY_FLAG:
            ap.error(f"unknown method {m!r} (choose from {', '.join(SURGERY_FLAG)})")

    root = os.path.join(args.data, args.shape)
    gen_args = [
        "--shape",
        args.shape,
        "--out",
        root,
        "--seed",
        str(args.seed),
        "--finetunes",
        str(args.finetunes),
    ]
    gparams = make_synthetic.params_of(make_synthetic.build_parser().parse_args(gen_args))
    gen_s = None
    if not make_synthetic.is_complete(root, gparams):
        print(f"generating inputs under {root} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), *gen_args], check=True)
        gen_s = time.perf_counter() - t0
    dirs = make_synthetic.model_dirs(root, args.finetunes)
    base, inputs = dirs[0], dirs[1:]
    model_bytes = sum(os.path.getsize(f) for f in model_files(base))
    out = os.path.join(root, "out")
    work = tempfile.mkdtemp(prefix="bench-", dir=root)

    res = {
        "shape": args.shape,
        "model_gb": model_bytes / GB,
        "n_inputs": len(inputs),
        "max_memory": args.max_memory,
        "machine": machine_facts(root),
        "generate_s": gen_s,
        "inputs": dirs,
        "rows": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ceiling = None
    if "io" in parts:
        print("I/O ceiling ...", flush=True)
        res["io_ceiling"] = io_ceiling(dirs, model_bytes, work)
        ceiling = res["io_ceiling"]["ceiling_s"]
        print(f"  {json.dumps({k: round(v, 3) for k, v in res['io_ceiling'].items()})}", flush=True)

    surgery = find_surgery(args.surgery)
    mk = find_mergekit(args.mergekit)
    for method in methods:
        if "surgery" in parts:
            if surgery is None:
                res["rows"].append(
                    {
                        "method": method,
                        "tool": "surgery",
                        "status": "surgery not installed (no `surgery` on PATH)",
                    }
                )
            else:
                cmd = [
                    *surgery,
                    "merge",
                    *inputs,
                    "--base",
                    base,
                    SURGERY_FLAG[method],
                    "-o",
                    out,
                    "--max-memory",
                    args.max_memory,
                    "--overwrite",
                ]
                if method in SPARSE and not args.surgery_defaults:
                    # the same parameters as mergekit's density / gamma
                    cmd += ["--density", str(args.density)]
                    if method == "breadcrumbs":
                        cmd += ["--outliers", str(args.gamma)]
                cmd += shlex.split(args.surgery_args)
                res["rows"].append(
                    run_tool(
                        "surgery",
                        method,
                        cmd,
                        inputs,
                        base,
                        out,
                        work,
                        ceiling,
                        not args.no_check,
                        args.density,
                        args.timeout,
                    )
                )
        if "mergekit" in parts:
            if mk is None:
                res["rows"].append(
                    {
                        "method": method,
                        "tool": "mergekit",
                        "status": "mergekit not installed (no mergekit-yaml; see benchmarks/README.md)",
                    }
                )
            else:
                cfg = os.path.join(work, f"mergekit-{method}.yml")
                dtype = None if args.mergekit_dtype.lower() == "none" else args.mergekit_dtype
                with open(cfg, "w") as f:
                    f.write(mergekit_yaml(method, base, inputs, dtype, args.density, args.gamma))
                cmd = [mk, cfg, out, "--quiet", *shlex.split(args.mergekit_args)]
                row = run_tool(
                    "mergekit",
                    method,
                    cmd,
                    inputs,
                    base,
                    out,
                    work,
                    ceiling,
                    not args.no_check,
                    args.density,
                    args.timeout,
                )
                with open(cfg) as f:
                    row["yaml"] = f.read()
                res["rows"].append(row)
        print(f"  done {method}", flush=True)

    if "help" in parts:
        res["surgery_help"] = (
            help_startup(surgery) if surgery else {"ok": False, "status": "surgery not installed"}
        )
    shutil.rmtree(work, ignore_errors=True)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print()
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
