#!/usr/bin/env python3
"""Host <-> device traffic of the torch backend, per merge: the device-resident pipeline against the
per-kernel-call path (same torch kernels on host arrays, each call copying its operands).

    python benchmarks/device_traffic.py [--device torch-cpu|cuda] [--json out.json]

Runs on any machine: with ``torch-cpu`` the "device" is torch's CPU, so the bytes counted are the
copies the code asks for (what would cross PCIe on a GPU), and the wall times compare the two code
paths on CPU tensors only. Counted: every numpy array a kernel copies to the device and every
result it copies back (per-call path); the workspace's uploads, downloads and ``.cpu()`` reads
(resident path). The family: base + 2 bf16 fine-tunes, 6 matrices of 1024 x 1024 (6.3M elements per
model); ``--max-memory 16MiB`` with 2 threads gives 4 chunks per matrix. Outputs are checked
byte for byte against numba's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from surgery import engine
from surgery.engine import EngineOptions, merge
from surgery.kernels import check_device, resident, torch_ops
from surgery.recipe import make_recipe

METHODS = {
    "task_arithmetic": {},
    "breadcrumbs": {"density": 0.1, "outliers": 0.01},
    "ties": {"density": 0.1},
    "dare_ties": {"density": 0.1, "seed": 1},
}


class Counter:
    """Bytes and calls host -> device and device -> host, by patching the few places copies happen."""

    def __init__(self) -> None:
        self.h2d = self.d2h = self.calls = 0
        self._undo: list = []

    def _wrap(self, owner, name, count) -> None:
        own = owner.__dict__.get(name)  # None: inherited (torch.Tensor.cpu lives on its C base)
        static = isinstance(own, staticmethod)
        original = own.__func__ if static else getattr(owner, name)

        def wrapper(*args, **kwargs):
            count(*args)
            return original(*args, **kwargs)

        setattr(owner, name, staticmethod(wrapper) if static else wrapper)
        self._undo.append((owner, name, own))

    def __enter__(self) -> Counter:
        def h2d(nbytes: int) -> None:
            self.h2d += nbytes
            self.calls += 1

        def d2h(nbytes: int) -> None:
            self.d2h += nbytes
            self.calls += 1

        K, W = torch_ops.TorchKernels, resident.DeviceWorkspace
        self._wrap(K, "_dev", lambda _, a: isinstance(a, np.ndarray) and h2d(a.nbytes))
        self._wrap(K, "_put", lambda out, t: isinstance(out, np.ndarray) and d2h(out.nbytes))
        self._wrap(W, "upload", lambda _, raw, dest=None: h2d(raw.nbytes))
        self._wrap(W, "download", lambda _, x, key: d2h(x.numel() * x.element_size()))
        self._wrap(W, "asarray", lambda _, a: h2d(a.nbytes))
        self._wrap(torch.Tensor, "cpu", lambda x: d2h(x.numel() * x.element_size()))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, own in reversed(self._undo):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def make_family(root: Path) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in range(3) for p in ("up_proj", "down_proj")]
    base = {n: torch.randn(1024, 1024, generator=g) * 0.02 for n in names}
    paths = []
    for k in range(3):
        tensors = {n: (v + (0.002 * torch.randn(v.shape, generator=g) if k else 0)).to(torch.bfloat16)
                   for n, v in base.items()}  # fmt: skip
        folder = root / ("base" if k == 0 else f"ft{k}")
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths.append(str(folder))
    return paths[0], paths[1:]


def run(recipe, out: Path, device: str, resident_path: bool, budget: int) -> tuple[dict, float]:
    real = engine.get_backend

    def backend(name):
        be = real(name)
        return be if resident_path else dataclasses.replace(be, workspace=None)

    engine.get_backend = backend
    try:
        with Counter() as c:
            t0 = time.perf_counter()
            merge(recipe, out, EngineOptions(device=device, threads=2, max_memory=budget))
            seconds = time.perf_counter() - t0
    finally:
        engine.get_backend = real
    return {"h2d_mb": c.h2d / 1e6, "d2h_mb": c.d2h / 1e6, "copies": c.calls}, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="torch-cpu")
    ap.add_argument("--max-memory", type=int, default=16 * 2**20)
    ap.add_argument("--json")
    args = ap.parse_args()
    check_device(args.device)  # before anything is generated
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, models = make_family(root)
        numel = 6 * 1024 * 1024
        for method, params in METHODS.items():
            recipe = make_recipe(method, models, base, params)
            ref = root / f"{method}-numba"
            t0 = time.perf_counter()
            merge(recipe, ref, EngineOptions(device="cpu", threads=2, max_memory=args.max_memory))
            numba_s = time.perf_counter() - t0
            for path in ("per-call", "resident"):
                out = root / f"{method}-{path}"
                traffic, seconds = run(recipe, out, args.device, path == "resident", args.max_memory)
                same = (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
                moved = (traffic["h2d_mb"] + traffic["d2h_mb"]) * 1e6 / numel
                rows.append(
                    {"method": method, "path": path, **traffic, "seconds": seconds, "numba_seconds": numba_s,
                     "bytes_per_element": moved, "same_bytes_as_numba": same}
                )  # fmt: skip
                print(
                    f"{method:16s} {path:9s} H2D {traffic['h2d_mb']:8.1f} MB  D2H {traffic['d2h_mb']:8.1f} MB"
                    f"  copies {traffic['copies']:6d}  {moved:6.1f} B/element  {seconds:6.2f} s"
                    f" (numba {numba_s:.2f} s)  same bytes: {same}",
                    flush=True,
                )
    if args.json:
        facts = {
            "machine": platform.node(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "max_memory": args.max_memory,
            "elements_per_model": numel,
        }
        Path(args.json).write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
