"""The `surgery` command: a thin click front end over the `surgery` library.

Each command turns flags into a recipe, calls the library and renders the result. Heavy imports
(numpy, numba) happen inside the commands so that `surgery --help` starts instantly.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
from surgery_cli.hub import push_after_run, push_command, push_options
from surgery_cli.lora import as_lora_options, extract_lora_command, lora_rule, write_as_lora
from surgery_cli.options import THREADS, check_device, check_max_memory, refuse_unused

from surgery.methods import METHODS  # numpy-free: the flags below come from the registry
from surgery.methods.lines import OUTSIDE_CHOICES
from surgery.methods.spec import GRANULARITIES

# `surgery merge --<method>`: every registry method that `merge` builds.
MERGE_METHODS = tuple(name for name, spec in METHODS.items() if spec.command == "merge")


class SurgeryGroup(click.Group):
    """Maps library errors to `error: ...` / `hint: ...` and exit code 1 (traceback with --debug);
    usage errors of a command (a bad flag value) to the same two lines and exit code 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug is accepted anywhere before a `--`, not only before the subcommand
        cut = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:cut]:
            args = ["--debug", *(a for a in args[:cut] if a != "--debug"), *args[cut:]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if ctx.meta.get("surgery.debug"):
                raise
            command = exc.ctx.command_path if exc.ctx is not None else "surgery"
            click.echo(f"error: {exc.format_message()}", err=True)
            click.echo(f"hint: see `{command} --help`", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            out = ctx.meta.get("surgery.output")
            click.echo("\nerror: interrupted", err=True)
            if out:
                click.echo(
                    f"hint: {out} holds a partial run (not a usable checkpoint); re-run the same "
                    "command to resume it",
                    err=True,
                )
            ctx.exit(130)
        except Exception as exc:
            from surgery.errors import SurgeryError

            if not isinstance(exc, SurgeryError) or ctx.meta.get("surgery.debug"):
                raise
            click.echo(f"error: {exc.message}", err=True)
            # the rule is error + hint: an error raised without one still says where to look
            hint = exc.hint or "see `surgery COMMAND --help`; `surgery --debug ...` shows where it failed"
            click.echo(f"hint: {hint}", err=True)
            ctx.exit(1)


@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="model-surgery")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Checkpoint surgery on safetensors files: merge fine-tunes without loading whole models."""
    ctx.meta["surgery.debug"] = debug


cli.add_command(push_command)


# -- shared options ---------------------------------------------------------------------------------
def engine_options(fn):
    """Options that change how a run executes, never what it computes (not part of recipes)."""
    options = [
        click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
                     help="Output folder (created; must not be or lie inside an input)."),
        click.option("--max-memory", default="2GiB", show_default=True, callback=check_max_memory,
                     help="Budget for all working buffers, at least 4KiB (e.g. 512MiB, 8GiB)."),
        click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores]."),
        click.option("--device", default="cpu", show_default=True, callback=check_device,
                     help="cpu (numba kernels), cuda or cuda:N (torch kernels)."),
        click.option("--stream", "--no-download", "stream", is_flag=True,
                     help="Read Hub inputs by HTTP range instead of downloading them."),
        click.option("--range-cache", type=click.Path(path_type=Path), default=None,
                     help="With --stream: where multi-pass methods keep fetched ranges "
                          "[default: HF_HOME/surgery-ranges]."),
        click.option("--shards", "share", default=None, metavar="I/N",
                     help="Run share I (0-based) of N of the work (static split, e.g. SLURM); then "
                          "`surgery finalize OUT`."),
        click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                     help="Run on a Ray cluster: local, auto or host:port (OUT on shared storage)."),
        click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan only."),
        click.option("--overwrite", is_flag=True,
                     help="Replace a previous surgery output (never other files)."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Write inf/NaN values that finite inputs produced (an error by default)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]  # fmt: skip
    fn = push_options(fn)  # --push-to-hub, --private, --revision: listed after these
    for option in reversed(options):
        fn = option(fn)
    return fn


def output_options(fn=None, *, dtype_default: str = "the base's"):
    """Options that are part of the recipe: they change the output bytes."""
    if fn is None:
        return lambda f: output_options(f, dtype_default=dtype_default)
    fn = click.option("--max-shard-size", default="5GB", show_default=True,
                      help="Largest output shard in bytes (e.g. 2GB, 500MB).")(fn)  # fmt: skip
    dtype_help = f"Output float dtype: bfloat16, float16, float32 [default: {dtype_default}]."
    fn = click.option("--dtype", default=None, help=dtype_help)(fn)
    return fn


def run_recipe(ctx: click.Context, recipe, output: Path, max_memory: str, threads: int | None,
               device: str, dry_run: bool, overwrite: bool, quiet: bool, allow_nonfinite: bool = False,
               push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
               stream: bool = False, range_cache: Path | None = None, share: str | None = None,
               ray_address: str | None = None, summary_to_stderr: bool = False) -> None:  # fmt: skip
    """Plan, then (unless --dry-run) execute with a progress bar; shared by merge and run.
    ``summary_to_stderr`` keeps stdout for a command's own --json report."""
    from surgery.engine import EngineOptions, execute
    from surgery.inputs import InputOptions
    from surgery.plan import build_plan
    from surgery.recipe import parse_size
    from surgery.remote import stream_stats

    options = EngineOptions(
        parse_size(max_memory), threads, device, overwrite, allow_nonfinite=allow_nonfinite
    )
    if range_cache is not None and not stream:
        from surgery.urls import is_url

        if not any(is_url(s) for s in (recipe.base, *recipe.models) if s):
            refuse_unused(ctx, ["range_cache"], "without --stream or URL inputs",
                          hint="add --stream to read Hub inputs by range")  # fmt: skip
    plan = build_plan(recipe, InputOptions(stream, range_cache))
    try:
        if dry_run:
            click.echo(json.dumps(plan.summary(options.max_memory, options.workers), indent=2))
            return
        ctx.meta["surgery.output"] = str(output)
        for note in plan.notes:
            click.echo(f"note: {note}", err=True)
        if share is not None or ray_address is not None:
            result = _run_elsewhere(
                plan, output, options, InputOptions(stream, range_cache), share, ray_address
            )
            if result is None:
                return
        else:
            total = plan.layout.total_bytes if plan.layout is not None else None
            bar = _LazyBar(total, len(plan.jobs), f"surgery {recipe.method}", quiet)
            try:
                result = execute(plan, output, options, bar.update)
            finally:
                bar.close()
        streamed = stream_stats(plan.inputs)
    finally:
        plan.close()
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    resumed = f", {result.resumed} resumed" if result.resumed else ""
    click.echo(
        f"wrote {output} ({result.tensors} tensors{resumed}, "
        f"{result.bytes_written / 1e9:.3f} GB) in {result.seconds:.1f} s",
        err=summary_to_stderr,
    )
    if streamed is not None:
        click.echo(
            f"streamed inputs: {streamed.header_requests} header + {streamed.data_requests} data requests, "
            f"{streamed.bytes_fetched / 1e6:.2f} MB fetched, {streamed.bytes_from_cache / 1e6:.2f} MB "
            "from the range cache"
        )
    if result.diff is not None:
        d = result.diff
        click.echo(
            f"{d.kind} diff: {d.kept:,} of {d.total:,} parameters "
            f"({100 * d.fraction:.4g}%), {d.size_bytes / 1e6:.2f} MB of safetensors"
        )
    push_after_run(output, push_to_hub, private, revision)


def _run_elsewhere(plan, output: Path, options, sources, share: str | None, ray_address: str | None):
    """--shards: this process's share (None: `surgery finalize` completes the run); --ray: the run."""
    from surgery.errors import RecipeError

    if share is not None and ray_address is not None:
        raise RecipeError("--shards and --ray are two ways to split a run: choose one")
    if ray_address is not None:
        from surgery.ray_backend import execute_on_ray

        return execute_on_ray(plan, output, options, sources, ray_address)
    from surgery.scaleout import Share, run_share

    part = Share.parse(share)
    done = run_share(plan, output, options, part, sources, lambda m: click.echo(f"note: {m}", err=True))
    click.echo(
        f"share {part.index}/{part.count}: wrote {done.shards_written} output shards "
        f"({done.shards_resumed} already done, {done.bytes_written / 1e9:.3f} GB) in {done.seconds:.1f} s; "
        f"run `surgery finalize {output}` once every share is done"
    )
    return None


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.pass_context
def finalize(ctx: click.Context, output: Path) -> None:
    """Complete OUTPUT after every `--shards I/N` share has run (index, config, card, recipe)."""
    from surgery.scaleout import finalize_split

    ctx.meta["surgery.output"] = str(output)
    result = finalize_split(output)
    click.echo(f"wrote {output} ({result.tensors} tensors, {result.bytes_written / 1e9:.3f} GB)")


class _LazyBar:
    """A tqdm bar on stderr (bytes, bytes/s, ETA, tensors done) that appears with the first written
    byte, so an early error is not preceded by an empty bar."""

    def __init__(self, total: int, tensors: int, desc: str, quiet: bool) -> None:
        self.total, self.tensors, self.desc, self.quiet = total, tensors, desc, quiet
        self.bar = None
        self.done = 0

    def update(self, n: int, tensor: str | None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=self.desc,
                            file=sys.stderr, leave=False)  # fmt: skip
        if tensor is not None:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def warn_contradicting_cards(base: str, models: list[str]) -> None:
    """An explicit base that no fine-tune's card names is allowed (a transfer, a renamed copy), but
    said: it is the classic way to merge against the wrong base."""
    from surgery.bases import contradicting_cards

    named = contradicting_cards(base, models)
    if named:
        listing = "; ".join(f"{m} -> {b}" for m, b in named.items())
        click.echo(f"warning: the base {base} is not the base_model of any fine-tune's model card "
                   f"({listing})", err=True)  # fmt: skip


def lines_outside_option(fn):
    return click.option(
        "--lines-outside",
        type=click.Choice(OUTSIDE_CHOICES),
        default="alpha",
        show_default=True,
        help="LiNeS scale of tensors outside the blocks (embeddings, final norm, head).",
    )(fn)


class _Schedule(click.ParamType):
    """A number, or a gradient over the blocks written a:b[:c...] (mergekit's [a, b, c])."""

    name = "number or a:b"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            knots = [float(x) for x in value.split(":")]
        except ValueError:
            self.fail(f"{value!r} is not a number or a gradient such as 0.2:1.0", param, ctx)
        return knots[0] if len(knots) == 1 else knots


SCHEDULE = _Schedule()


# -- commands ---------------------------------------------------------------------------------------
def _method_flags(fn):
    for name in reversed(MERGE_METHODS):
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, name, is_flag=True, help=f"Method: {METHODS[name].title}.")(fn)
    return fn


# Method parameters with their own flags below; every other one gets a flag from the registry.
_FIXED_FLAGS = {"density", "outliers", "scale", "weights", "granularity", "t", "seed", "rho", "eta",
                "wudi_steps", "wudi_lr", "wudi_weight_power", "calibration", "regmean_alpha",
                "max_length"}  # fmt: skip
_TYPES = {"float": float, "int": int, "regex": str}


def _registry_params() -> dict[str, list]:
    """Each merge method parameter without a hand-written flag: name -> (method, Param) of every use."""
    params: dict[str, list] = {}
    for name in MERGE_METHODS:
        for p in METHODS[name].params:
            if p.name not in _FIXED_FLAGS and (p.kind in _TYPES or p.kind == "choice"):
                params.setdefault(p.name, []).append((name, p))
    return params


def _param_flags(fn):
    for name, uses in reversed(_registry_params().items()):
        kind = uses[0][1].kind
        choices = sorted({c for _, p in uses for c in p.choices})
        kind_type = click.Choice(choices) if kind == "choice" else _TYPES[kind]
        help_text = f"{uses[0][1].help} ({', '.join(m for m, _ in uses)})."
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, name, type=kind_type, default=None, help=help_text)(fn)
    return fn


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--base", default=None, help="Base model [default: base_model from the models' cards].")
@click.option("--method", "method_name", default=None,
              help="Method by name (see `surgery methods`) [default: task_arithmetic].")  # fmt: skip
@_method_flags
@_param_flags
@click.option(
    "--density",
    type=SCHEDULE,
    default=None,
    help="Fraction of task-vector entries KEPT, or a gradient over the blocks such as 0.1:0.5 "
    "[default: the method's, see `surgery methods`].",
)
@click.option(
    "--outliers",
    type=SCHEDULE,
    default=None,
    help="Fraction of the largest |tau| removed [default: the method's: 0.01 breadcrumbs].",
)
@click.option(
    "--scale",
    type=SCHEDULE,
    default=None,
    help="Multiplier of the merged task vector, or a gradient 0.2:1.0 over the blocks [default: 1].",
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="NAME_PART:PARAM=VALUE",
    help="Per-tensor override, e.g. self_attn:density=0.5 or mlp:scale=0.2:1 (first match wins).",
)
@click.option(
    "--weights",
    default=None,
    help="Per-model weights w1,w2,...; each a number or a gradient over the blocks, e.g. "
    "0.2:1.0,1.0:0.2 [default: all 1].",
)
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITIES),
    default=None,
    help="Group over which ranks are taken [default: per_tensor].",
)
@click.option(
    "--t",
    "t",
    type=SCHEDULE,
    default=None,
    help="SLERP interpolation factor: 0 = first endpoint, 1 = second [default: 0.5].",
)
@click.option("--seed", type=int, default=None, help="Seed of DARE's random stream [default: 0].")
@click.option(
    "--rho",
    type=float,
    default=None,
    help="CART: rank kept of each residual, as a fraction of min(m, n) [default: 0.12].",
)
@click.option(
    "--eta", type=float, default=None, help="STAR: fraction of each nuclear norm kept [default: 0.4]."
)
@click.option("--wudi-steps", type=int, default=None, help="WUDI: Adam steps [default: 300].")
@click.option("--wudi-lr", type=float, default=None, help="WUDI: Adam learning rate [default: 1e-5].")
@click.option(
    "--wudi-weight-power",
    type=int,
    default=None,
    help="WUDI: task weights 1/||tau_t||^p, 1 the authors', 2 FusionBench's [default: 1].",
)
@click.option(
    "--calibration",
    multiple=True,
    help="RegMean: calibration texts (JSONL `text` or lines), once per model, in model order.",
)
@click.option(
    "--regmean-alpha",
    type=float,
    default=None,
    help="RegMean: scale of the Grams' off-diagonal [default: 0.9].",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="RegMean: tokens per calibration text, longer ones cut [default: 512].",
)
@click.option("--lines", "use_lines", is_flag=True, help="LiNeS: scale the merged update by block depth.")
@click.option(
    "--lines-alpha",
    default="auto",
    show_default=True,
    help="LiNeS alpha: a number, or auto = ||sum tau||_1 / (T ||tau_merged||_1).",
)
@click.option("--lines-beta", type=float, default=None, help="LiNeS beta [default: 1 - alpha].")
@lines_outside_option
@as_lora_options
@output_options
@engine_options
@click.pass_context
def merge(ctx: click.Context, models: tuple[str, ...], base: str | None, method_name: str | None,
          density, outliers, scale, filters, weights, granularity, t, seed, rho, eta, wudi_steps, wudi_lr,
          wudi_weight_power, calibration, regmean_alpha, max_length, use_lines, lines_alpha,
          lines_beta, lines_outside, dtype, max_shard_size, as_lora, **engine) -> None:  # fmt: skip
    """Merge fine-tunes MODELS of one base into a new checkpoint.

    \b
    surgery merge FT_A FT_B --base BASE --breadcrumbs -o merged/
    surgery merge FT_A FT_B --ties --density 0.2 -o merged/
    surgery merge FT_A FT_B --tsv-merge -o merged/        (also --iso-c, --iso-cts, --cart, --star, --wudi)
    surgery merge FT_A FT_B --regmean --calibration a.jsonl --calibration b.jsonl -o merged/
    surgery merge ADAPTER_A ADAPTER_B --base BASE --ties --as-lora --rank 16 -o merged-lora/
    """
    from surgery.bases import base_from_cards
    from surgery.errors import RecipeError
    from surgery.methods import get_method
    from surgery.recipe import make_recipe

    chosen = [name for name in MERGE_METHODS if engine.pop(name)]
    if method_name:
        spec = get_method(method_name)
        if spec.command != "merge":
            raise RecipeError(f"{spec.name} is not a merge method", hint=f"use `surgery {spec.command}`")
        chosen.append(spec.name)
    if len(set(chosen)) > 1:
        raise RecipeError(
            f"choose one method, not {' and '.join(sorted(set(chosen)))}",
            hint="give one method flag (or --method NAME); `surgery methods` lists them",
        )
    method = chosen[0] if chosen else "task_arithmetic"
    if base is None and get_method(method).needs_base:
        base = base_from_cards(list(models))
        click.echo(f"base: {base} (the base_model of every fine-tune's model card)", err=True)
    elif base is not None:
        warn_contradicting_cards(base, list(models))
    given = {"density": density, "outliers": outliers, "scale": scale, "t": t, "weights": weights}
    params, per_tensor = _schedules(given, filters, base or models[0])
    params |= {"granularity": granularity, "seed": seed, "rho": rho, "eta": eta,
               "wudi_steps": wudi_steps, "wudi_lr": wudi_lr, "wudi_weight_power": wudi_weight_power,
               "calibration": list(calibration) or None, "regmean_alpha": regmean_alpha,
               "max_length": max_length}  # fmt: skip
    params |= {name: engine.pop(name) for name in _registry_params()}
    lines = None
    if use_lines:
        lines = {"alpha": lines_alpha, "beta": lines_beta, "outside": lines_outside}
    else:
        refuse_unused(ctx, ("lines_alpha", "lines_beta", "lines_outside"), "without --lines",
                      hint="add --lines to scale the merged update by block depth")  # fmt: skip
    rule = lora_rule(ctx, as_lora, engine)  # with --as-lora, --dtype is the dtype of the LoRA factors
    merged_dtype = None if as_lora else dtype
    recipe = make_recipe(method, list(models), base, params, merged_dtype, max_shard_size, lines, per_tensor)
    if as_lora and not engine["dry_run"]:
        return write_as_lora(recipe, rule, dtype, **engine)
    run_recipe(ctx, recipe, **engine)


def _schedules(given: dict, filters: tuple[str, ...], reference: str) -> tuple[dict, dict]:
    """--scale 0.2:1.0, --weights 0.2:1,1:0.2 and --filter self_attn:density=0.5 as recipe parameters
    + per_tensor values (weights: one number or gradient per model, comma-separated)."""
    from surgery.errors import RecipeError
    from surgery.mergekit.load import merge_schedule

    conditions: dict[str, list] = {}
    for text in filters:
        where, _, assignment = text.partition(":")
        key, _, value = assignment.partition("=")
        if not where or key not in given or not value:
            hint = f"PARAM is one of {', '.join(given)}; e.g. --filter self_attn:density=0.5"
            raise RecipeError(f"--filter {text!r} is not NAME_PART:PARAM=VALUE", hint=hint)
        parsed = _weights(value) if key == "weights" else SCHEDULE.convert(value, None, None)
        conditions.setdefault(key, []).append({"filter": where, "value": parsed})
    settings = {}
    for key, value in given.items():
        value = _weights(value) if key == "weights" and value is not None else value
        if key in conditions:
            settings[key] = conditions[key] + ([{"value": value}] if value is not None else [])
        elif value is not None:
            settings[key] = value
    if all(isinstance(v, float | int) for k, v in settings.items() if k != "weights") and all(
        isinstance(w, float) for w in settings.get("weights", [])
    ):
        return {**given, "weights": settings.get("weights")}, {}
    params, per_tensor = merge_schedule(reference, settings)
    return {k: params.get(k) for k in given}, per_tensor


def _weights(text: str) -> list:
    """``--weights 0.2:1.0,1`` -> [[0.2, 1.0], 1.0]: per model a number or a gradient over the blocks."""
    from surgery.errors import RecipeError

    items = [x.strip() for x in str(text).split(",")]
    if not all(items):
        raise RecipeError(f"--weights {text!r} has an empty entry", hint="write w1,w2,... e.g. 0.2:1.0,1")
    try:
        return [SCHEDULE.convert(x, None, None) for x in items]
    except click.BadParameter:
        raise RecipeError(
            f"--weights {text!r}: each weight is a number or a gradient such as 0.2:1.0",
            hint="e.g. --weights 0.2:1.0,1.0:0.2 (model 1 rises over the blocks, model 2 falls)",
        ) from None


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--alpha", type=float, required=True, help="Scale of the first block's update.")
@click.option("--beta", type=float, default=None, help="Added by the last block [default: 1 - alpha].")
@lines_outside_option
@output_options
@engine_options
@click.pass_context
def lines(ctx: click.Context, base: str, finetuned: str, alpha: float, beta: float | None,
          lines_outside: str, dtype, max_shard_size, **engine) -> None:  # fmt: skip
    """LiNeS single-task editing: BASE + lambda(l) * (FINETUNED - BASE).

    lambda(l) = alpha + beta * l / (L - 1) for block l: shallow blocks keep little of the update
    (less forgetting of what the base could do), the last block keeps alpha + beta.

    \b
    surgery lines BASE FT --alpha 0.3 -o edited/
    """
    from surgery.recipe import make_recipe

    schedule = {"alpha": alpha, "beta": beta, "outside": lines_outside}
    recipe = make_recipe("task_arithmetic", [finetuned], base, {}, dtype, max_shard_size, schedule)
    run_recipe(ctx, recipe, **engine)


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--density", type=float, default=None, help="Sparse patch: keep the top fraction per tensor.")
@click.option(
    "--breadcrumbs", is_flag=True, help="Sparse patch of the Breadcrumbs band (--density, --outliers)."
)
@click.option("--outliers", type=float, default=None, help="With --breadcrumbs: largest fraction dropped.")
@click.option(
    "--graft",
    "graft_density",
    type=float,
    default=None,
    help="Sparse patch of the top fraction over the whole region (data-free graft).",
)
@click.option(
    "--region", default=None, help="Regex of tensors a patch may touch [default: all; --graft: the blocks]."
)
@click.option("--lift-rank", type=int, default=None,
              help="LIFT patch: top --density of |rank-R approx.| of each base block matrix.")  # fmt: skip
@output_options(dtype_default="float32, exact for bf16/f16 inputs")
@engine_options
@click.pass_context
def diff(ctx: click.Context, base: str, finetuned: str, density, breadcrumbs, outliers, graft_density,
         region, lift_rank, dtype, max_shard_size, **engine) -> None:  # fmt: skip
    """Write the task vector FINETUNED - BASE as a checkpoint of its own.

    Dense by default (float32, so bf16/f16 inputs are exact); --density, --breadcrumbs or --graft write
    a compact sparse patch (flat indices + values). Either carries surgery_diff.json naming the base
    (tensor names, shapes, content hashes) for `surgery apply`.
    """
    from surgery.errors import RecipeError
    from surgery.recipe import make_recipe

    flags = {
        "density": density is not None and not breadcrumbs and lift_rank is None,
        "breadcrumbs": breadcrumbs,
        "graft": graft_density is not None,
        "lift-rank": lift_rank is not None,
    }
    modes = [m for m, on in flags.items() if on]
    if len(modes) > 1:
        raise RecipeError(
            f"choose one of --density, --breadcrumbs, --graft, --lift-rank (got {', '.join(modes)})"
        )
    if modes == ["graft"]:
        refuse_unused(ctx, ("outliers",), "with --graft", hint="--outliers goes with --breadcrumbs")
    if modes:
        refuse_unused(ctx, ("dtype",), "for a sparse patch", hint="patch values are always float32")
    if not modes:
        if outliers is not None or region is not None:
            raise RecipeError("--outliers and --region apply to sparse patches only")
        recipe = make_recipe("diff", [finetuned], base, {}, dtype or "float32", max_shard_size)
        return run_recipe(ctx, recipe, **engine)
    if modes == ["lift-rank"]:
        if outliers is not None:
            raise RecipeError("--outliers does not apply to a LIFT patch")
        params = {"density": density, "lift_rank": lift_rank, "region": region}
        return run_recipe(
            ctx, make_recipe("lift_patch", [finetuned], base, params, None, max_shard_size), **engine
        )
    if modes == ["graft"]:
        params = {"density": graft_density, "granularity": "global", "region": region}
    elif modes == ["breadcrumbs"]:
        params = {"density": 0.1 if density is None else density,
                  "outliers": 0.01 if outliers is None else outliers, "region": region or "."}  # fmt: skip
    else:
        params = {"density": density, "outliers": outliers, "region": region or "."}
    run_recipe(ctx, make_recipe("patch", [finetuned], base, params, None, max_shard_size), **engine)


@cli.command()
@click.argument("patches", nargs=-1, required=True)
@click.option("--to", "target", required=True, help="The base to apply them to (any compatible version).")
@click.option("--scale", type=float, default=None, help="Multiplier of the (summed) diff [default: 1].")
@click.option("--scales", default=None, help="Per-patch multipliers s1,s2,... [default: all 1].")
@click.option("--force-base", is_flag=True, help="Compose patches taken from different bases anyway.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--raw-diff", is_flag=True,
              help="The inputs are hand-made dense diffs (no surgery_diff.json).")  # fmt: skip
@output_options(dtype_default="the target's")
@engine_options
@click.pass_context
def apply(ctx: click.Context, patches: tuple[str, ...], target: str, scale, scales, force_base: bool,
          as_json: bool, raw_diff: bool, dtype, max_shard_size, **engine) -> None:  # fmt: skip
    """Apply diffs or sparse patches to a base: OUT = BASE + scale * sum_i s_i PATCH_i.

    Each input is what `surgery diff` wrote (it carries surgery_diff.json). Several compose in one
    pass (Ansell et al., ACL 2022): overlapping entries add, and a table says how many entries each
    pair shares. Patches taken from different bases are refused (--force-base); a target that is
    not their base gets a warning.

    \b
    surgery apply lang.patch task.patch --to BASE --scales 1,0.5 -o OUT
    """
    from surgery.checkpoint import open_checkpoint
    from surgery.compose import overlaps
    from surgery.recipe import make_recipe

    kinds = [check_diff_input(p, None, raw_diff) for p in patches]  # refuses a full model
    composed = len(patches) > 1 or scales is not None
    table = None
    if len(patches) > 1 or as_json:
        with contextlib.ExitStack() as stack:
            table = overlaps([stack.enter_context(open_checkpoint(p)) for p in patches])
    params = {"scale": scale}
    if composed:
        params |= {"scales": scales, "force_base": force_base or None}
    recipe = make_recipe("compose" if composed else kinds[0], list(patches), target, params, dtype,
                         max_shard_size)  # fmt: skip
    run_recipe(ctx, recipe, summary_to_stderr=as_json, **engine)
    if table is not None and not engine["dry_run"]:  # a dry run prints the plan (JSON) only
        click.echo(json.dumps(table.to_dict(), indent=2) if as_json else render_overlaps(table))


def render_overlaps(table) -> str:
    names = [f"P{i + 1}" for i in range(len(table.sources))]
    lines = [f"{name}  {src}  ({n:,} entries)" for name, src, n in zip(names, table.sources, table.entries)]
    lines.append("shared entries " + "".join(f"{n:>12}" for n in names))
    for name, row in zip(names, table.shared):
        lines.append(f"{name:>14} " + "".join(f"{v:>12,}" for v in row))
    return "\n".join(lines)


@cli.command()
@click.option("--from", "old_base", required=True, help="The base the fine-tune was trained from.")
@click.option("--finetuned", "old_ft", required=True, help="The fine-tune to transfer.")
@click.option("--to", "new_base", required=True, help="The new base release.")
@click.option("--scale", type=float, default=None, help="Multiplier of the diff [default: 1].")
@click.option("--tokenizer-from", type=click.Choice(["finetuned", "new-base"]), default="finetuned",
              show_default=True, help="Vocabulary, tokenizer and chat template of the output.")  # fmt: skip
@output_options(dtype_default="the new base's")
@engine_options
@click.pass_context
def transfer(ctx: click.Context, old_base: str, old_ft: str, new_base: str, scale, tokenizer_from, dtype,
             max_shard_size, **engine) -> None:  # fmt: skip
    """Fine-tuning transfer: NEW_BASE + scale * (OLD_FT - OLD_BASE), in one streaming pass.

    config.json comes from the new base; tokenizer, chat template and generation config from the old
    fine-tune. Differences between the two bases' configs are printed.
    """
    from surgery.checkpoint import open_checkpoint
    from surgery.recipe import make_recipe

    with open_checkpoint(new_base) as new, open_checkpoint(old_base) as old:
        for line in config_differences(old.config() or {}, new.config() or {}):
            click.echo(f"config: {line}", err=True)
    params = {"scale": scale, "tokenizer_from": tokenizer_from}
    recipe = make_recipe("transfer", [old_base, old_ft], new_base, params, dtype, max_shard_size)
    run_recipe(ctx, recipe, **engine)


def config_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--density", type=float, required=True, help="Fraction of the region's parameters grafted.")
@click.option("--region", default=None, help="Regex of tensors to graft [default: the transformer blocks].")
@click.option("--patch", "as_patch", is_flag=True, help="Write a sparse patch instead of a full checkpoint.")
@click.option("--lift-rank", type=int, default=None,
              help="Graft at LIFT positions: top DENSITY of |rank-R approx.| per block matrix.")  # fmt: skip
@output_options
@engine_options
@click.pass_context
def graft(ctx: click.Context, base: str, finetuned: str, density: float, region, as_patch: bool,
          lift_rank: int | None, dtype, max_shard_size, **engine) -> None:  # fmt: skip
    """Data-free skill graft: BASE + the top-DENSITY entries of (FINETUNED - BASE) over the region.

    Panigrahi et al. (ICML 2023): a tiny fraction of the parameters carries a fine-tune's skill.
    With --lift-rank R the positions are LIFT's principal weights instead (per block matrix).
    """
    from surgery.recipe import make_recipe

    params = {"density": density, "region": region}
    if lift_rank is not None:
        params["lift_rank"] = lift_rank
        method = "lift_patch" if as_patch else "lift_graft"
        recipe = make_recipe(method, [finetuned], base, params, None if as_patch else dtype, max_shard_size)
        return run_recipe(ctx, recipe, **engine)
    if as_patch:
        refuse_unused(ctx, ("dtype",), "with --patch", hint="patch values are always float32")
        params["granularity"] = "global"
        recipe = make_recipe("patch", [finetuned], base, params, None, max_shard_size)
    else:
        recipe = make_recipe("graft", [finetuned], base, params, dtype, max_shard_size)
    run_recipe(ctx, recipe, **engine)


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--fraction", type=float, default=0.5, show_default=True,
              help="Fraction of each block's matrices (or elements) reset to BASE.")  # fmt: skip
@click.option("--by", type=click.Choice(["matrix", "element"]), default="matrix", show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the permutation that picks them [default: 0].")
@click.option("--select", type=click.Choice(["smallest-update", "largest-update"]), default=None,
              help="Pick by relative update ||f - b|| / ||b|| instead of at random.")  # fmt: skip
@output_options
@engine_options
@click.pass_context
def reset(ctx: click.Context, base: str, finetuned: str, fraction: float, by: str, seed: int | None,
          select: str | None, dtype, max_shard_size, **engine) -> None:  # fmt: skip
    """Half reset: part of each block of FINETUNED back to BASE (Half Fine-Tuning's operation).

    Per block, floor(fraction * n) of its n matrices (or elements) := BASE, the rest := FINETUNED,
    bit for bit (Hui et al. 2024, arXiv 2404.18466). Vectors and non-block tensors keep FINETUNED.

    \b
    surgery reset BASE FT --fraction 0.5 --seed 1 -o reset/
    surgery reset BASE FT --select smallest-update -o reset/
    """
    from surgery.errors import RecipeError
    from surgery.recipe import make_recipe

    if seed is not None and select is not None:
        raise RecipeError("choose --seed (a random permutation) or --select, not both")
    params = {"fraction": fraction, "by": by, "select": select or "random", "seed": seed}
    recipe = make_recipe("half_reset", [finetuned], base, params, dtype, max_shard_size)
    run_recipe(ctx, recipe, **engine)


@cli.command()
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--raw-diff", is_flag=True,
              help="An apply recipe's diff is a hand-made dense diff (no surgery_diff.json).")  # fmt: skip
@engine_options
@click.pass_context
def run(ctx: click.Context, recipe_file: Path, raw_diff: bool, **engine) -> None:
    """Run a recipe YAML file (e.g. an output's surgery_recipe.yaml) or a mergekit config.

    \b
    Schema:
      version: 1
      method: breadcrumbs          # see `surgery methods`
      base: path/to/base           # optional for linear and slerp
      models: [path/a, path/b]
      parameters: {density: 0.1, outliers: 0.01, granularity: per_tensor, scale: 1.0}
      output: {dtype: null, max_shard_size: 5GB}

    Relative paths are resolved against the recipe file's folder; without base:, the models' cards
    name it (as in `surgery merge`). A file with `merge_method:` is read as a mergekit config (see
    `surgery convert`).
    """
    from surgery.errors import SurgeryError
    from surgery.mergekit.load import load_any

    def from_cards(base: str) -> None:
        click.echo(f"base: {base} (the base_model of every model's card)", err=True)

    try:
        recipe, notes = load_any(recipe_file, from_cards)
        for note in notes:
            click.echo(f"note: {note}", err=True)
        if recipe.method in ("apply", "apply_patch"):
            check_diff_input(recipe.models[0], recipe.method, raw_diff)
        else:
            refuse_unused(ctx, ("raw_diff",), f"for a {recipe.method} recipe")
        run_recipe(ctx, recipe, **engine)
    except SurgeryError as exc:
        exc.hint = recipe_terms(exc.hint, ctx.command)
        raise


@cli.command()
@click.argument("config_file", type=click.Path(path_type=Path))
def convert(config_file: Path) -> None:
    """Print the surgery recipe equivalent to a mergekit config (or why there is none yet)."""
    from surgery.mergekit.load import convert_file

    converted = convert_file(config_file)
    for note in converted.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(converted.recipe.to_yaml(), nl=False)


def check_diff_input(source: str, method: str | None, raw_diff: bool) -> str:
    """The apply method ``source`` calls for ("apply": a dense diff, "apply_patch": a sparse patch);
    a full model, or a recipe whose method does not match its diff, is refused."""
    from surgery.checkpoint import open_checkpoint
    from surgery.errors import RecipeError
    from surgery.patch import diff_kind

    with open_checkpoint(source) as ckpt:
        found = "apply_patch" if diff_kind(ckpt, raw_diff) == "patch" else "apply"
    if method is not None and method != found:
        raise RecipeError(
            f"the recipe's method is {method}, but {source} is a "
            f"{'sparse patch' if found == 'apply_patch' else 'dense diff'}",
            hint=f"write method: {found}",
        )
    return found


def recipe_terms(hint: str | None, command: click.Command) -> str | None:
    """Hints name the flags of the commands that build recipes; `surgery run` has none of them, so
    such a flag becomes the recipe key that says the same (a hint never names a missing option)."""
    import re

    if hint is None:
        return None
    own = {opt for p in command.params for opt in p.opts}

    def key(m: re.Match) -> str:
        flag, value = m.group(1), m.group(2) or ""
        if flag in own:
            return m.group(0)
        name = flag[2:].replace("-", "_")
        where = "" if name == "base" else "parameters: "
        return f"`{where}{name}:{value}` in the recipe"

    return re.sub(r"(--[a-z][a-z-]*)( [A-Z_]+(?![a-z]))?", key, hint)


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--layers", "show_layers", is_flag=True, help="List every tensor's block (LiNeS mapping).")
@click.option("--stream", is_flag=True, help="Hub repos: read the headers by range, download no weights.")
@click.pass_context
def inspect(ctx: click.Context, path: str, as_json: bool, show_layers: bool, stream: bool) -> None:
    """Describe a checkpoint: shards, tensors, parameters, dtypes, layers, tied embeddings."""
    from surgery.inspect import describe

    if as_json:
        refuse_unused(ctx, ("show_layers",), "with --json", hint="the JSON report holds every tensor's block")
    report = describe(path, stream)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if show_layers:
        for name, where in report["layers"]["placement"].items():
            click.echo(f"{where:>8}  {name}")
        return
    click.echo(f"checkpoint   {report['source']}")
    click.echo(f"files        {len(report['files'])}: {', '.join(report['files'])}")
    click.echo(f"tensors      {report['tensors']}")
    click.echo(f"parameters   {report['parameters']:,}")
    click.echo(f"bytes        {report['bytes']:,} ({report['bytes'] / 1e9:.3f} GB)")
    click.echo("dtypes       " + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items()))
    layers = report["layers"]
    cfg = f" (config.json: {layers['config_layers']})" if layers["config_layers"] is not None else ""
    click.echo(f"blocks       {layers['num_blocks']}{cfg}")
    click.echo(f"before/after {layers['before']} / {layers['after']} tensors outside the blocks")
    if layers["unknown"]:
        click.echo(f"unplaced     {len(layers['unknown'])}: {', '.join(layers['unknown'][:8])}")
    click.echo(f"tied embeddings  {report['tied_embeddings']}")


@cli.command()
def methods() -> None:
    """List the merge methods with their parameters, defaults and papers."""
    from surgery.methods import METHODS

    real = {opt for c in cli.commands.values() for p in c.params for opt in p.opts}
    for spec in METHODS.values():
        click.echo(f"{spec.name:<17} {spec.title}  <{spec.paper}>")
        click.echo(f"{'':<17} {spec.formula}")
        base = "base required" if spec.needs_base else "base optional"
        models = f"{spec.min_models}+" if spec.max_models is None else f"{spec.min_models}-{spec.max_models}"
        click.echo(f"{'':<17} {base}; models: {models}; command: surgery {spec.command}")
        click.echo(f"{'':<17} roles: {spec.roles}")
        for p in spec.params:
            if p.kind == "fixed":  # not settable: recorded in every recipe as it is
                click.echo(f"{'':<19}{p.name}: {p.default}")
                continue
            flag = "--" + p.name.replace("_", "-")  # as the commands spell it
            if flag not in real:  # a recipe parameter only (mergekit semantics and the like)
                flag = f"{p.name} (recipe)"
            default = (
                "" if "default" in p.help else f" [default: {'all 1' if p.kind == 'weights' else p.default}]"
            )
            click.echo(f"{'':<19}{flag:<14} {p.help}{default}")
        click.echo()


from surgery_cli.analysis import intruders, stats  # noqa: E402

cli.add_command(intruders)
cli.add_command(stats)

from surgery_cli.forward import generate_command, localize_command, tuco_command  # noqa: E402

cli.add_command(tuco_command)
cli.add_command(generate_command)
cli.add_command(localize_command)
cli.add_command(extract_lora_command)

from surgery_cli.tune import tune_command  # noqa: E402

cli.add_command(tune_command)


if __name__ == "__main__":
    cli()
