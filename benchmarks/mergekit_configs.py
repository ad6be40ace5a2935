"""The "same YAML through mergekit and through `surgery run`" configs of bench_merge.py (methods mk-*).

Each method writes ONE mergekit YAML for the synthetic inputs (base, ft1, ft2 of make_synthetic's
shapes); bench_merge runs it through `mergekit-yaml CFG OUT` and `surgery run CFG -o OUT`:

    mk-ties           ties, density 0.5 / weight 0.5 per fine-tune, normalize (mergekit's ties.yml)
    mk-della          della, density 0.5 / epsilon 0.1 / weight 0.5, lambda 1 (randomised: distribution)
    mk-slerp-filters  slerp ft1 -> ft2 with the classic self_attn / mlp t gradients and 0.5 elsewhere
    mk-passthrough    a slice stack: blocks [0, 3L/4) of ft1 then [L/4, L) of ft2 (1b: 12 + 12 blocks)

Standard library only (bench_merge's rule): the YAML is written by hand.
"""

from __future__ import annotations

import json
import os

METHODS = ("mk-ties", "mk-della", "mk-slerp-filters", "mk-passthrough")
SLERP_T = (
    "  t:\n"
    "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
    "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
    "    - value: 0.5\n"
)


def num_layers(model: str) -> int:
    with open(os.path.join(model, "config.json")) as f:
        return int(json.load(f)["num_hidden_layers"])


def stack_ranges(layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """[0, 3L/4) of ft1 and [L/4, L) of ft2: 1b (16 blocks) gives 12 + 12 = 24 blocks."""
    return (0, max(1, layers * 3 // 4)), (layers // 4, layers)


def mergekit_config(method: str, base: str, finetunes: list[str], dtype: str | None) -> str:
    """The YAML text of one mk-* method; the output is bfloat16 (the inputs' dtype) in every case."""
    ft1, ft2 = finetunes[:2]
    if method in ("mk-ties", "mk-della"):
        params = "{density: 0.5, weight: 0.5" + (", epsilon: 0.1}" if method == "mk-della" else "}")
        lines = [f"merge_method: {method[3:]}", f"base_model: {base}", "models:"]
        lines += [f"  - model: {m}\n    parameters: {params}" for m in finetunes]
        lines.append("parameters: {normalize: true" + (", lambda: 1.0}" if method == "mk-della" else "}"))
    elif method == "mk-slerp-filters":
        n = num_layers(ft1)
        lines = ["merge_method: slerp", f"base_model: {ft1}", "slices:", "  - sources:"]
        lines += [f"      - model: {m}\n        layer_range: [0, {n}]" for m in (ft1, ft2)]
        lines += ["parameters:", SLERP_T.rstrip("\n")]
    elif method == "mk-passthrough":
        (a, b), (c, d) = stack_ranges(num_layers(ft1))
        lines = ["merge_method: passthrough", "slices:"]
        lines += [f"  - sources:\n      - model: {m}\n        layer_range: [{x}, {y}]" for m, x, y in
                  ((ft1, a, b), (ft2, c, d))]  # fmt: skip
    else:
        raise ValueError(f"unknown mergekit benchmark method {method!r} (choose from {', '.join(METHODS)})")
    if dtype and method != "mk-passthrough":  # a copy computes nothing
        lines.append(f"dtype: {dtype}")
    lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"
