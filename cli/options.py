"""Flag checks shared by the commands, all run before any work is done: an option the chosen method or
mode does not use is an error naming it (never ignore what the user typed); --threads, --device,
--max-memory and --plot are validated when the flags are read."""

from __future__ import annotations

import os
from pathlib import Path

import click


def typed(ctx: click.Context, *names: str) -> list[str]:
    """The flags among ``names`` (parameter names) that the user gave, as they are spelled."""
    from click.core import ParameterSource

    flags = []
    for name in names:
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            param = next(p for p in ctx.command.params if p.name == name)
            flags.append(max(param.opts, key=len))
    return flags


def refuse_unused(
    ctx: click.Context, names: tuple[str, ...] | list[str], why: str, hint: str | None = None
) -> None:
    """Raise when any of ``names`` was given: they do nothing ``why`` (e.g. "without --lines")."""
    given = typed(ctx, *names)
    if given:
        from surgery.errors import RecipeError

        what = " and ".join(given)
        hint = hint or f"leave it out, or see `surgery {ctx.info_name} --help` for what it goes with"
        raise RecipeError(f"{what} {'does' if len(given) == 1 else 'do'} nothing {why}", hint=hint)


# -- option types shared by every command ---------------------------------------------------------
# one rule for every command: a positive integer, or omitted = all cores
THREADS = click.IntRange(min=1)


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device is checked when the flags are read, before any input is opened or output written."""
    from surgery.kernels import check_device as check

    check(value)
    return value


MIN_MEMORY = 4 * 2**10


def check_max_memory(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A budget so small that chunks hold a few dozen values makes a run crawl: a floor, with why."""
    from surgery.errors import RecipeError
    from surgery.recipe import parse_size

    if parse_size(value) < MIN_MEMORY:
        raise RecipeError(
            f"--max-memory {value} is below the floor of 4KiB: chunks would hold a few values each and "
            "fixed per-chunk costs would dominate (a 2 MB merge at 0 takes 20x longer than at 64KiB)",
            hint="give the working buffers at least 4KiB; 512MiB or more suits real models",
        )
    return value


def check_plot_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--plot: refuse before computing a path whose folder cannot be made; the folder itself is made
    only when the plot is written (``make_parent``)."""
    if value is None:
        return None
    from surgery.errors import OutputError

    ancestor = value.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write plot {value}: {ancestor} is not a folder", path=str(value),
                          hint="choose a --plot path inside a folder")  # fmt: skip
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write plot {value}: {ancestor} is not writable", path=str(value),
                          hint="choose a --plot path in a folder you can write to")  # fmt: skip
    return value


PLOT = click.Path(dir_okay=False, path_type=Path)


def make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
