#!/usr/bin/env python3
"""Scale-out overheads on one machine: static split, Ray, and inputs streamed by HTTP range.

    python benchmarks/make_synthetic.py --shape 0.5b --out /work/bench-data/0.5b --shard-size 200MB
    python benchmarks/bench_scaleout.py --data /work/bench-data/0.5b --work /work/bench-data/scaleout

Runs `surgery merge` (the CLI, as a user would) on base + ft1 + ft2 in several ways and prints one JSON
line per run (wall seconds, and for streamed runs the request counts and bytes):

- ``single``: one process (default threads);
- ``split``: ``--shards 0/2`` and ``--shards 1/2`` at the same time, then ``surgery finalize``;
- ``ray``: ``--ray local`` (includes starting and stopping a private Ray cluster);
- ``stream``: inputs served by the loopback fake Hub of ``tests/hub`` and read with ``--stream``;
  ``download``: the same Hub ids downloaded whole first (the default path).

Every output is checked byte for byte against ``single``. On one machine the split and Ray runs share
the same cores and disk as the single process, so they measure overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "surgery_cli.main"]


def digest(folder: Path) -> dict[str, str]:
    """Hashes of the weights, index and config (the recipe and card name the inputs as given: Hub ids
    for the streamed runs, paths for the others)."""
    names = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


def run(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="make_synthetic output (base, ft1, ft2)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (outputs, HF_HOME)")
    ap.add_argument("--method", default="breadcrumbs", help="merge method flag [breadcrumbs]")
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--runs", default="single,split,ray,stream,download")
    args = ap.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    base, ft1, ft2 = (str(args.data / n) for n in ("base", "ft1", "ft2"))
    common = [f"--{args.method.replace('_', '-')}", "--max-shard-size", args.max_shard_size, "-q"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    results = {}
    reference = None

    def record(name: str, seconds: float, out: Path, **extra) -> None:
        nonlocal reference
        same = digest(out) == reference if reference is not None else True
        results[name] = {"run": name, "seconds": round(seconds, 2), "identical": same, **extra}
        print(json.dumps(results[name]), flush=True)

    runs = args.runs.split(",")
    out = args.work / "single"
    seconds, _ = run([*CLI, "merge", ft1, ft2, "--base", base, *common, "-o", str(out)], env)
    reference = digest(out)
    record("single", seconds, out)
    if "split" in runs:
        out = args.work / "split"
        start = time.perf_counter()
        share = [*CLI, "merge", ft1, ft2, "--base", base, *common, "-o", str(out), "--shards"]
        procs = [subprocess.Popen([*share, f"{i}/2"], env=env, stdout=subprocess.DEVNULL) for i in range(2)]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a share failed")
        run([*CLI, "finalize", str(out)], env)
        record("split", time.perf_counter() - start, out, shares=2)
    if "ray" in runs:
        out = args.work / "ray"
        seconds, _ = run(
            [*CLI, "merge", ft1, ft2, "--base", base, *common, "-o", str(out), "--ray", "local"], env
        )
        record("ray", seconds, out)
    if "stream" in runs or "download" in runs:
        stream_runs(args, common, env, record, runs)
    return 0


def stream_runs(args, common: list[str], env: dict, record, runs: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "hub"))
    from fake_hub import TEST_TOKEN, FakeHub

    hub = FakeHub(TEST_TOKEN).start()
    try:
        for name in ("base", "ft1", "ft2"):
            hub.add_repo(f"bench/{name}", args.data / name)
        hub_env = {k: v for k, v in env.items() if not k.startswith("HF_")}
        hub_env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                       HF_TOKEN=TEST_TOKEN, HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
        ids = ["bench/ft1", "bench/ft2", "--base", "bench/base"]
        for name in ("stream", "download"):
            if name not in runs:
                continue
            hub_env["HF_HOME"] = str(args.work / f"hf-{name}")
            out = args.work / name
            flags = ["--stream", "--range-cache", str(args.work / "ranges")] if name == "stream" else []
            hub.range_log.clear()
            seconds, output = run([*CLI, "merge", *ids, *common, "-o", str(out), *flags], hub_env)
            line = next((ln for ln in output.splitlines() if ln.startswith("streamed inputs:")), "")
            gets = [r for r in hub.range_log if r[1].endswith(".safetensors")]
            record(name, seconds, out, weight_gets=len(gets), report=line)
    finally:
        hub.stop()


if __name__ == "__main__":
    raise SystemExit(main())
