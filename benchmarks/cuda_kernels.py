"""Per-kernel wall time of the torch twins on a 16M-element chunk, transfers included (needs a GPU).

Usage: python benchmarks/cuda_kernels.py   (moved here from the test suite: timings are not tests)
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.kernels import torch_ops

U32 = np.uint32


def main() -> None:
    import time

    tw = torch_ops.for_device("cuda")
    rng = np.random.default_rng(0)
    n, t = 1 << 24, 3
    x = rng.standard_normal(n).astype(np.float32)
    tau = rng.standard_normal((t, n)).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    w = np.ones(t, np.float32)
    out = np.empty(n, np.float32)
    raw = np.empty(n, np.uint16)
    v = int(np.sort(x.view(U32) & U32(0x7FFFFFFF))[n // 2])
    cols = 4096
    runs = {
        "bf16_to_f32": lambda: tw.bf16_to_f32(raw, out),
        "f32_to_bf16": lambda: tw.f32_to_bf16(x.view(U32), raw),
        "subtract": lambda: tw.subtract(tau, base, np.empty_like(tau)),
        "abs_hist_high": lambda: tw.abs_hist_high(x, np.zeros(1 << 16, np.int64)),
        "abs_hist_low": lambda: tw.abs_hist_low(x, v >> 16, np.zeros(1 << 16, np.int64)),
        "band_mask": lambda: tw.band_mask(x.copy(), v + 1000, 0, v, 3, np.zeros(2, np.int64)),
        "row_band_mask": lambda: tw.row_band_mask(x.copy(), cols, 40, 2000, np.zeros(cols, np.uint64)),
        "dare_mask": lambda: tw.dare_mask(x.copy(), 0.3, np.uint64(5), 0),
        "combine_sum": lambda: tw.combine_sum(base, tau, w, np.float32(1.0), out),
        "combine_ties": lambda: tw.combine_ties(base, tau, w, np.float32(1.0), out),
        "combine_model_stock": lambda: tw.combine_model_stock(base, tau, np.float32(0.8), out),
        "gram_accumulate": lambda: tw.gram_accumulate(tau, np.zeros((t, t))),
        "l1_accumulate": lambda: tw.l1_accumulate(tau, np.zeros(t)),
        "numpy x.copy() (reference)": lambda: x.copy(),
    }
    for name, run in runs.items():
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        print(f"{name:28s} {(time.perf_counter() - t0) / 3 * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
