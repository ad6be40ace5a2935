"""`surgery extract-lora`: a thin front end over `surgery.adapters.extract`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from surgery_cli.analysis import _Bar, _plot, _short, _table
from surgery_cli.options import check_device, check_max_memory, refuse_unused


@click.command("extract-lora")
@click.argument("base")
@click.argument("finetuned")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter folder to write."
)
@click.option("--rank", type=int, default=None, help="Rank of every module.")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this share of ||tau||_F^2 (e.g. 0.9).")  # fmt: skip
@click.option("--max-rank", type=int, default=None, help="Cap of the --energy ranks.")
@click.option("--include", default=None,
              help="Regex of tensors outside the blocks saved whole (modules_to_save).")  # fmt: skip
@click.option("--dtype", default="float32", show_default=True, help="dtype of the LoRA factors.")
@click.option("--svd", "method", type=click.Choice(["auto", "exact", "randomized"]), default="auto",
              show_default=True, help="auto: randomized when the rank is far below the size.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="Torch device for the SVDs (cpu, cuda).")  # fmt: skip
@click.option("--max-memory", default="2GiB", show_default=True, callback=check_max_memory,
              help="Budget for all working buffers, at least 4KiB (e.g. 512MiB, 8GiB).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace a previous surgery output (never other files).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG of ranks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_lora_command(base: str, finetuned: str, output: Path, rank, energy, max_rank, include, dtype,
                         method, device, max_memory, overwrite, as_json, plot, quiet) -> None:  # fmt: skip
    """Extract a PEFT LoRA adapter from a full fine-tune: the best rank-r approximation of each block
    matrix's task vector (lora_B = U S^1/2, lora_A = S^1/2 V^T).

    \b
    surgery extract-lora BASE FT --rank 16 -o ft-lora/
    surgery extract-lora BASE FT --energy 0.9 --max-rank 64 -o ft-lora/ --json
    """
    from surgery.adapters.extract import RankRule, extract_lora
    from surgery.recipe import parse_size

    with _Bar("extract-lora", "matrix", quiet) as bar:
        report = extract_lora(base, finetuned, output, RankRule(rank, energy, max_rank), include=include,
                              dtype=dtype, device=device, method=method, max_memory=parse_size(max_memory),
                              overwrite=overwrite, progress=bar.update)  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_extraction(report))
    _plot(plot, "plot_lora_extraction", report)


def render_extraction(report) -> str:
    rows = [[m.tensor, str(m.rank), f"{m.frobenius_kept:.2%}"] for m in report.modules]
    out = [
        f"LoRA of {_short(report.finetuned)} over {_short(report.base)} -> {report.output} "
        f"({report.adapter_bytes / 1e6:.2f} MB)",
        _table(["matrix", "rank", "||tau||_F kept"], rows),
        f"all matrices: {report.energy_kept:.2%} of ||tau||_F^2 kept",
    ]
    if report.full:
        out.append(f"saved whole (modules_to_save): {', '.join(report.full)}")
    if report.not_represented:
        more = " ..." if len(report.not_represented) > 8 else ""
        shown = ", ".join(report.not_represented[:8])
        out.append(f"changed by the fine-tune but not in the adapter (kept as the base): {shown}{more}")
    return "\n".join(out)


def as_lora_options(fn):
    """`merge --as-lora`: the merged task vector written as one LoRA adapter."""
    options = [
        click.option("--as-lora", is_flag=True, help="Write the merge as a LoRA adapter over --base."),
        click.option("--rank", type=int, default=None, help="--as-lora: rank of every module."),
        click.option("--energy", type=float, default=None, help="--as-lora: share of ||tau||_F^2 kept."),
        click.option("--max-rank", type=int, default=None, help="--as-lora: cap of the --energy ranks."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def lora_rule(ctx: click.Context, as_lora: bool, engine: dict):
    """Pop the rank options from ``engine``; they belong to --as-lora only."""
    from surgery.adapters.extract import RankRule

    rule = RankRule(engine.pop("rank"), engine.pop("energy"), engine.pop("max_rank"))
    if not as_lora:
        refuse_unused(ctx, ("rank", "energy", "max_rank"), "without --as-lora",
                      hint="add --as-lora to write the merge as a LoRA adapter")  # fmt: skip
    return rule


def write_as_lora(recipe, rule, dtype: str | None, output: Path, max_memory: str, threads: int | None,
                  device: str, dry_run: bool, overwrite: bool, quiet: bool, allow_nonfinite: bool = False,
                  push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
                  stream: bool = False, range_cache: Path | None = None, share: str | None = None,
                  ray_address: str | None = None) -> None:  # fmt: skip
    """Run the merge and write its adapter; print the extraction table."""
    from surgery_cli.hub import push_after_run

    from surgery.adapters.as_lora import merge_as_lora
    from surgery.engine import EngineOptions
    from surgery.errors import RecipeError
    from surgery.recipe import parse_size

    if stream or range_cache or share or ray_address:
        raise RecipeError("--as-lora runs the merge locally: --stream, --range-cache, --share and --ray "
                          "do not apply", hint="drop them, or merge first and run extract-lora")  # fmt: skip
    options = EngineOptions(
        parse_size(max_memory), threads, device, overwrite, allow_nonfinite=allow_nonfinite
    )
    with _Bar("extract-lora", "matrix", quiet) as bar:
        report = merge_as_lora(recipe, output, rule, options, dtype=dtype or "float32", progress=bar.update)
    click.echo(render_extraction(report))
    push_after_run(output, push_to_hub, private, revision)
