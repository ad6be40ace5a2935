"""Analyses of what fine-tuning changed, computed from the checkpoint files tensor by tensor.

Each analysis returns a frozen report dataclass; the CLI renders it as a table, JSON or a PNG plot.

    from surgery.analysis import diff_stats, find_intruders
    stats = diff_stats("base/", ["ft_a/", "ft_b/"])     # norms, sparsity, effective rank, cosines
    report = find_intruders("base/", "ft_lora/")        # intruder dimensions (Shuttleworth et al.)

Imports are lazy so that importing the package does not pull torch in.
"""

from __future__ import annotations

__all__ = [
    "DiffStats",
    "IntruderReport",
    "MatrixIntruders",
    "StatsReport",
    "default_cache_dir",
    "diff_stats",
    "find_intruders",
    "mitigate_intruders",
]

_WHERE = {
    "DiffStats": "stats",
    "StatsReport": "stats",
    "diff_stats": "stats",
    "IntruderReport": "intruders",
    "MatrixIntruders": "intruders",
    "default_cache_dir": "intruders",
    "find_intruders": "intruders",
    "mitigate_intruders": "intruders",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f"surgery.analysis.{module}"), name)
