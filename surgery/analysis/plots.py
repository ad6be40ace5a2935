"""PNG plots of analysis reports (matplotlib, Agg backend, imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from surgery.analysis._common import layer_sort_key
from surgery.analysis.intruders import IntruderReport
from surgery.analysis.stats import StatsReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def short_name(source: str) -> str:
    """A checkpoint's label in legends: its folder (or file) name."""
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix == ".safetensors" else path.name or source


def _layer_axis(labels: Sequence[str]) -> list[str]:
    return sorted(set(labels), key=layer_sort_key)


def plot_intruders(
    reports: Sequence[IntruderReport], path: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """Left: intruder count per layer (at each report's eps), one bar per fine-tune. Right: total
    count as a function of eps."""
    plt = _pyplot()
    labels = list(labels) if labels is not None else [short_name(r.finetuned) for r in reports]
    layers = _layer_axis([layer for r in reports for layer in r.per_layer()])
    fig, (ax_layers, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    width = 0.8 / max(1, len(reports))
    for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
        counts = report.per_layer()
        xs = [x + (i - (len(reports) - 1) / 2) * width for x in range(len(layers))]
        ax_layers.bar(
            xs, [counts.get(layer, 0) for layer in layers], width, label=f"{label} ({report.total})"
        )
        curve = report.curve()
        ax_eps.plot(list(curve), list(curve.values()), marker="o", label=label)
    ax_layers.set_xticks(range(len(layers)), layers)
    ax_layers.set_xlabel("layer (block)")
    ax_layers.set_ylabel("intruder dimensions")
    first = reports[0]
    ax_layers.set_title(f"per layer (top-{first.k}, eps={first.eps:g})")
    ax_layers.legend(fontsize=8)
    ax_eps.axvline(first.eps, color="grey", linestyle=":", linewidth=1)
    ax_eps.set_xlabel("eps (|cosine| threshold)")
    ax_eps.set_ylabel("intruder dimensions (all matrices)")
    ax_eps.set_title("count vs eps")
    ax_eps.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_stats(report: StatsReport, path: str | Path) -> Path:
    """Per layer: relative norm, sparsity and effective rank per model; with 2+ models, cosine and
    sign-conflict rate per pair."""
    plt = _pyplot()
    layers = [s.label for s in report.layers]
    models = [short_name(m) for m in report.models]
    panels = [
        ("relative norm ||tau|| / ||W0||", models, lambda s: s.relative_norms),
        ("sparsity (fraction of tau == 0)", models, lambda s: s.sparsity),
        ("effective rank (mean of 2-D tensors)", models, lambda s: s.effective_ranks),
    ]
    if report.pairs:
        pair_names = [f"{models[i]} / {models[j]}" for i, j in report.pairs]
        panels.append(("cosine of task vectors", pair_names, lambda s: s.cosines(report.pairs)))
        panels.append(("sign-conflict rate", pair_names, lambda s: s.conflict_rates))
    cols = 2 if len(panels) <= 4 else 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.3 * rows), dpi=100, squeeze=False)
    xs = list(range(len(layers)))
    for ax, (title, names, values) in zip(axes.flat, panels):
        for idx, name in enumerate(names):
            ys = [values(s)[idx] for s in report.layers]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(xs, layers)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    from surgery.errors import OutputError

    path = Path(path)
    try:
        fig.savefig(path)
    except OSError as exc:
        raise OutputError(f"cannot write the plot {path}: {exc.strerror or exc}", path=str(path)) from None
    finally:
        plt.close(fig)
    return path


def plot_lora_extraction(report, path: str | Path) -> Path:
    """Per extracted matrix (in network order): the rank kept, and the fraction of ||tau||_F kept."""
    plt = _pyplot()
    mods = report.modules
    xs = list(range(len(mods)))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.12 * len(mods) + 3), 5.5), dpi=100, sharex=True)
    axes[0].bar(xs, [m.rank for m in mods])
    axes[0].set_title("rank kept per matrix", fontsize=10)
    axes[1].plot(xs, [m.frobenius_kept for m in mods], marker=".")
    axes[1].set_title("fraction of ||tau||_F kept", fontsize=10)
    axes[1].set_ylim(0, 1.02)
    axes[1].set_xlabel("matrix (network order)")
    fig.tight_layout()
    return _save(plt, fig, path)
