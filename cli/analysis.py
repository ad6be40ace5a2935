"""`surgery intruders` and `surgery stats`: thin front ends over `surgery.analysis`.

Commands turn flags into a library call and render the frozen report as a table, JSON or a PNG plot.
Nothing heavy is imported at module level (torch, numpy, matplotlib load inside the commands).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from surgery_cli.options import PLOT, THREADS, check_device, check_plot_path, make_parent, refuse_unused

_COMMON_OPTIONS = [
    click.option("--include", default=None,
                 help="Regex of tensor names to analyse [default: stats every float tensor, intruders "
                      "the 2-D weights of the blocks]."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    click.option("--plot", type=PLOT, default=None, callback=check_plot_path,
                 help="Write a PNG plot of the report (its folder is created)."),
    click.option("--device", default="cpu", show_default=True, callback=check_device,
                 help="Torch device for the SVDs: cpu, cuda or cuda:N."),
    click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores]."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
]  # fmt: skip


_INTRUDER_OPTIONS = [
    click.option("-k", "--top-k", "k", type=int, default=10, show_default=True,
                 help="Top left singular vectors of each fine-tuned matrix checked."),
    click.option("--eps", type=float, default=0.5, show_default=True,
                 help="Intruder when its largest |cosine| with every base singular vector is below this."),
    click.option("--mitigate", "lam", type=float, default=None, metavar="LAMBDA",
                 help="Write W + (LAMBDA - 1) * sum_intruders s u v^T to -o (0 removes the intruders)."),
    click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                 help="Output folder of --mitigate."),
    click.option("--overwrite", is_flag=True, help="Replace a previous surgery output (never other files)."),
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="Cache of base SVDs [default: $XDG_CACHE_HOME/model-surgery/svd]."),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the SVD cache."),
]  # fmt: skip


def _apply(options: list):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@click.command()
@click.argument("base")
@click.argument("finetuned", nargs=-1, required=True)
@_apply(_INTRUDER_OPTIONS)
@_apply(_COMMON_OPTIONS)
@click.pass_context
def intruders(ctx: click.Context, base: str, finetuned: tuple[str, ...], k: int, eps: float,
              include: str | None, as_json: bool, plot: Path | None, device: str, threads: int | None,
              quiet: bool, lam: float | None, output: Path | None, overwrite: bool,
              cache_dir: Path | None, no_cache: bool) -> None:  # fmt: skip
    """Intruder dimensions of fine-tunes FINETUNED... of BASE (Shuttleworth et al. 2024).

    For every 2-D weight in the blocks (embeddings and heads excluded unless --include names them),
    counts the top-k left singular vectors of the fine-tuned matrix that are nearly orthogonal to all
    of the base's. LoRA fine-tunes show many, full fine-tunes hardly any.

    \b
    surgery intruders BASE FT_LORA FT_FULL --plot intruders.png
    surgery intruders BASE FT_LORA --mitigate 0.5 -o mitigated/
    """
    from surgery.analysis import intruders as lib
    from surgery.errors import RecipeError

    if (lam is None) != (output is None):
        raise RecipeError("--mitigate LAMBDA and -o OUT go together", hint="pass both, or neither")
    if lam is not None and len(finetuned) != 1:
        raise RecipeError(f"--mitigate rewrites one fine-tune, got {len(finetuned)}")
    if lam is None:
        refuse_unused(ctx, ("overwrite",), "without --mitigate", hint="--overwrite goes with -o OUT")
    if no_cache:
        refuse_unused(ctx, ("cache_dir",), "with --no-cache")
    _threads(threads)
    opts = {"k": k, "eps": eps, "include": include, "device": device,
            "cache_dir": None if no_cache else cache_dir or lib.default_cache_dir()}  # fmt: skip
    reports = []
    for ft in finetuned:
        with _Bar(f"intruders {_short(ft)}", "matrix", quiet) as bar:
            if lam is None:
                reports.append(lib.find_intruders(base, ft, progress=bar.update, **opts))
            else:
                ctx.meta["surgery.output"] = str(output)
                reports.append(lib.mitigate_intruders(base, ft, output, lam, overwrite=overwrite,
                                                      progress=bar.update, **opts))  # fmt: skip
        _notes(reports[-1].skipped, ft)
    if as_json:
        data = [r.to_dict() for r in reports]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        click.echo(render_intruders(reports))
    _plot(plot, "plot_intruders", reports)
    if lam is not None:
        click.echo(f"wrote {output}: {len(reports[0].modified)} matrices with intruders scaled by "
                   f"lambda={lam:g}", err=as_json)  # fmt: skip


@click.command()
@click.argument("base")
@click.argument("finetuned", nargs=-1, required=True)
@_apply(_COMMON_OPTIONS)
@click.option("--no-rank", is_flag=True, help="Skip effective ranks (one SVD per 2-D tensor and model).")
@click.option("--tensors", "per_tensor", is_flag=True, help="Tables per tensor, not only per layer.")
@click.option(
    "--lift-rank",
    type=int,
    default=None,
    help="Also: overlap of the top --lift-density |tau| with LIFT's top |rank-R approx. of W0|.",
)
@click.option("--lift-density", type=float, default=0.05, show_default=True,
              help="Fraction of each block matrix compared (with --lift-rank).")  # fmt: skip
@click.pass_context
def stats(ctx: click.Context, base: str, finetuned: tuple[str, ...], include: str | None, as_json: bool,
          plot: Path | None, device: str, threads: int | None, quiet: bool, no_rank: bool,
          per_tensor: bool, lift_rank: int | None, lift_density: float) -> None:  # fmt: skip
    """Task-vector statistics of fine-tunes FINETUNED... of BASE, per tensor and per layer.

    Relative norm ||tau|| / ||W0||, sparsity (exact zeros), effective rank of 2-D updates; with 2+
    fine-tunes, cosine similarity of the task vectors and their sign-conflict rate (what TIES resolves).

    \b
    surgery stats BASE FT_A FT_B --plot stats.png
    """
    from surgery.analysis.stats import diff_stats

    if as_json:
        refuse_unused(ctx, ("per_tensor",), "with --json", hint="the JSON report holds every tensor")
    if lift_rank is None:
        refuse_unused(ctx, ("lift_density",), "without --lift-rank", hint="add --lift-rank R")
    _threads(threads)
    with _Bar("stats", "tensor", quiet) as bar:
        report = diff_stats(base, list(finetuned), include=include, effective_ranks=not no_rank,
                            device=device, progress=bar.update, lift_rank=lift_rank,
                            lift_density=lift_density)  # fmt: skip
    _notes(report.skipped, base)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_stats(report, per_tensor))
    _plot(plot, "plot_stats", report)


# -- rendering -------------------------------------------------------------------------------------
def render_intruders(reports: list) -> str:
    """Per-layer intruder counts, one column per fine-tune, the total, and the count vs eps."""
    first = reports[0]
    names = [_short(r.finetuned) for r in reports]
    rows = [[layer, str(n)] + [str(r.per_layer().get(layer, 0)) for r in reports]
            for layer, n in first.matrices_per_layer().items()]  # fmt: skip
    rows.append(["total", str(len(first.matrices))] + [str(r.total) for r in reports])
    lines = [
        f"intruder dimensions: top-{first.k} left singular vectors with |cos| < {first.eps:g} "
        f"against every base singular vector",
        _table(["layer", "matrices", *names], rows),
        "",
        "count vs eps",
        _table(["eps", *names], [[f"{e:g}"] + [str(r.count(e)) for r in reports] for e in first.eps_grid]),
    ]
    hits = sum(r.cache_hits for r in reports)
    lines.append(f"base SVDs from the cache: {hits} of {sum(len(r.matrices) for r in reports)}")
    return "\n".join(lines)


def render_stats(report, per_tensor: bool = False) -> str:
    """One small table per statistic: rows are layers (or tensors) plus "all", columns models/pairs."""
    models = [_short(m) for m in report.models]
    pairs = [f"{models[i]}~{models[j]}" for i, j in report.pairs]
    rows = [*(report.tensors if per_tensor else report.layers), report.overall]
    sections = [
        ("relative norm ||tau|| / ||W0||", models, lambda s: s.relative_norms, "{:.4g}"),
        ("norm ||tau||", models, lambda s: s.norms, "{:.4g}"),
        ("sparsity (tau == 0)", models, lambda s: s.sparsity, "{:.2%}"),
        ("effective rank (2-D updates; layers: mean)", models, lambda s: s.effective_ranks, "{:.1f}"),
    ]
    if pairs:
        sections += [
            ("cosine of task vectors", pairs, lambda s: s.cosines(report.pairs), "{:+.4f}"),
            ("sign-conflict rate (of all entries)", pairs, lambda s: s.conflict_rates, "{:.2%}"),
        ]
    out = [f"{len(report.models)} fine-tune(s) of {report.base}: {report.overall.tensors} tensors"]
    for model, ranks in zip(models, report.adapter_ranks):
        if ranks:
            values = sorted(set(ranks.values()))
            shown = str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
            out.append(f"{model}: LoRA adapter, rank {shown} on {len(ranks)} tensors")
    for title, columns, values, fmt in sections:
        body = [[s.label] + ["-" if v is None else fmt.format(v) for v in values(s)] for s in rows]
        out += ["", title, _table(["tensor" if per_tensor else "layer", *columns], body)]
    if report.lift is not None:
        lift = report.lift
        counts = {**(lift.per_tensor if per_tensor else lift.layers), "all": lift.overall}
        body = [
            [k] + ["-" if v is None else f"{v:.2%}" for v in lift.fractions(c)] for k, c in counts.items()
        ]
        title = (f"overlap of the top {lift.density:g} |tau| with LIFT positions (rank {lift.rank}); "
                 f"independent positions: {lift.density:.2%}")  # fmt: skip
        out += ["", title, _table(["tensor" if per_tensor else "layer", *models], body)]
    return "\n".join(out)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(fmt(r) for r in [header, *rows])


# -- helpers ---------------------------------------------------------------------------------------
def _short(source: str) -> str:
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix == ".safetensors" else path.name or source


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _notes(skipped, source: str) -> None:
    if skipped:
        shown = ", ".join(f"{n} ({r})" for n, r in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        click.echo(f"note: {len(skipped)} tensor(s) skipped for {source}: {shown}{more}", err=True)


def _plot(path: Path | None, function: str, report) -> None:
    if path is None:
        return
    from surgery.analysis import plots

    make_parent(path)
    getattr(plots, function)(report, path)
    click.echo(f"wrote plot {path}", err=True)


class _Bar:
    """A tqdm bar on stderr fed by the library's ``progress(done, total, name, ...)`` callback."""

    def __init__(self, desc: str, unit: str, quiet: bool) -> None:
        self.desc, self.unit, self.quiet, self.bar = desc, unit, quiet, None

    def update(self, done: int, total: int, name: str, *_: object) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False)
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
