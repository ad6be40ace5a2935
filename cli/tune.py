"""`surgery tune`: choose a merge's parameters by measurement on an eval file."""

from __future__ import annotations

from pathlib import Path

import click
from surgery_cli.options import THREADS, check_device, check_max_memory


@click.command("tune")
@click.argument("models", nargs=-1, required=True)
@click.option("--base", default=None, help="Base model [default: base_model from the models' cards].")
@click.option(
    "--method",
    "method_name",
    default="task_arithmetic",
    show_default=True,
    help="Method by name (see `surgery methods`).",
)
@click.option(
    "--grid",
    "grids",
    multiple=True,
    required=True,
    help='Values of one parameter, e.g. "scale=0.3,0.5,0.8,1.0"; repeat for a product grid.',
)
@click.option(
    "--eval",
    "eval_file",
    required=True,
    type=click.Path(path_type=Path),
    help='JSONL: {"prompt", "answer"} (exact match, greedy) or {"text"} (mean token loss).',
)
@click.option(
    "--calibration",
    multiple=True,
    help="RegMean: calibration texts (JSONL `text` or lines), once per model, in model order.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Where the best merge goes."
)
@click.option(
    "--max-memory",
    default="2GiB",
    show_default=True,
    callback=check_max_memory,
    help="Budget for all working buffers, at least 4KiB (e.g. 512MiB, 8GiB).",
)
@click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores].")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=check_device,
    help="cpu (numba kernels), cuda or cuda:N (torch kernels).",
)
@click.option("--overwrite", is_flag=True, help="Replace a previous surgery output (never other files).")
def tune_command(models, base, method_name, grids, eval_file, calibration, output, max_memory, threads,
                 device, overwrite) -> None:  # fmt: skip
    """Merge MODELS at every grid point, score each on --eval, keep the best in -o.

    \b
    surgery tune FT_A FT_B --base B --method tsv_merge --grid "scale=0.5,1.0,1.5,2.0" \\
        --eval dev.jsonl -o best/
    Writes best/surgery_tune.json (every point), best/surgery_tune.png and a section in the card.
    """
    from surgery import tune
    from surgery.bases import base_from_cards
    from surgery.engine import EngineOptions, merge
    from surgery.methods import get_method
    from surgery.recipe import make_recipe, parse_size

    grid = tune.parse_grid(list(grids))
    evalset = tune.read_eval(eval_file)
    if base is None and get_method(method_name).needs_base:
        base = base_from_cards(list(models))
    params = {"calibration": list(calibration)} if calibration else {}
    recipe = make_recipe(method_name, list(models), base, {**params, **grid[0]})
    options = EngineOptions(parse_size(max_memory), threads, device, overwrite)

    def show(point: tune.TunePoint) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in point.params.items())
        click.echo(f"{shown}: {evalset.kind} {point.score:.4f} (merge {point.merge_seconds:.1f} s, "
                   f"eval {point.eval_seconds:.1f} s)", err=True)  # fmt: skip

    result = tune.tune(recipe, grid, evalset, output, lambda r, folder: merge(r, folder, options),
                       overwrite=overwrite, on_point=show)  # fmt: skip
    click.echo(tune.format_table(result))
    best = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
    click.echo(f"best: {best} ({evalset.kind} {result.best.score:.4f}); wrote {output}")
