"""Checks of flag combinations that the library cannot see: an option the chosen method or mode does
not use is an error naming it (issue 10: never ignore what the user typed)."""

from __future__ import annotations

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
        raise RecipeError(f"{what} {'does' if len(given) == 1 else 'do'} nothing {why}", hint=hint)
