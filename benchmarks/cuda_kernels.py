"""Per-kernel wall time of the torch twins on a 16M-element chunk (needs a GPU), two ways: given
numpy arrays (the per-call path: copies in and out included) and given device tensors (the
device-resident pipeline: no copies).

Usage: python benchmarks/cuda_kernels.py   (moved here from the test suite: timings are not tests)
"""

from __future__ import annotations

import time

import numpy as np
import torch

from surgery.kernels import torch_ops

U32 = np.uint32


def cases(tw, a: dict, v: int, cols: int) -> dict:
    """name -> call, over the arrays in ``a`` (numpy or device tensors alike)."""
    t = a["tau"].shape[0]
    return {
        "bf16_to_f32": lambda: tw.bf16_to_f32(a["raw"], a["out"]),
        "f32_to_bf16": lambda: tw.f32_to_bf16(a["x"], a["raw"]),
        "subtract": lambda: tw.subtract(a["tau"], a["base"], a["tau2"]),
        "abs_hist_high": lambda: tw.abs_hist_high(a["x"], a["hist"]),
        "abs_hist_low": lambda: tw.abs_hist_low(a["x"], v >> 16, a["hist"]),
        "band_mask": lambda: tw.band_mask(a["x2"], v + 1000, 0, v, 3, np.zeros(2, np.int64)),
        "row_band_mask": lambda: tw.row_band_mask(a["x2"], cols, 40, 2000, np.zeros(cols, np.uint64)),
        "dare_mask": lambda: tw.dare_mask(a["x2"], 0.3, np.uint64(5), 0),
        "combine_sum": lambda: tw.combine_sum(a["base"], a["tau"], a["w"], np.float32(1.0), a["out"]),
        "combine_ties": lambda: tw.combine_ties(a["base"], a["tau"], a["w"], np.float32(1.0), a["out"]),
        "combine_model_stock": lambda: tw.combine_model_stock(a["base"], a["tau"], np.float32(0.8), a["out"]),
        "gram_accumulate": lambda: tw.gram_accumulate(a["tau"], np.zeros((t, t))),
        "l1_accumulate": lambda: tw.l1_accumulate(a["tau"], np.zeros(t)),
    }


def timed(run) -> float:
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / 3 * 1e3


def main() -> None:
    tw = torch_ops.for_device("cuda")
    rng = np.random.default_rng(0)
    n, t, cols = 1 << 24, 3, 4096
    x = rng.standard_normal(n).astype(np.float32)
    host = {
        "x": x, "x2": x.copy(), "raw": np.empty(n, np.uint16), "out": np.empty(n, np.float32),
        "tau": rng.standard_normal((t, n)).astype(np.float32), "tau2": np.empty((t, n), np.float32),
        "base": rng.standard_normal(n).astype(np.float32), "w": np.ones(t, np.float32),
        "hist": np.zeros(1 << 16, np.int64),
    }  # fmt: skip
    dev = {k: (v if k == "w" else tw._dev(v).clone()) for k, v in host.items()}
    v = int(np.sort(x.view(U32) & U32(0x7FFFFFFF))[n // 2])
    per_call, resident = cases(tw, host, v, cols), cases(tw, dev, v, cols)
    print(f"{'kernel':24s} {'numpy in/out':>14s} {'device tensors':>15s}")
    for name in per_call:
        print(f"{name:24s} {timed(per_call[name]):11.1f} ms {timed(resident[name]):12.1f} ms")
    print(f"{'numpy x.copy() (ref)':24s} {timed(lambda: x.copy()):11.1f} ms")


if __name__ == "__main__":
    main()
