"""Issue 10, item 15: help texts show one default per option, the defaults of the method parameters,
and `surgery methods` spells parameters as the real flags."""

from __future__ import annotations

import re

import click
import pytest
from surgery_cli.main import cli

COMMANDS = sorted(cli.commands)


def _help_records(command: click.Command) -> list[tuple[str, str]]:
    ctx = click.Context(command, info_name=command.name)
    options = [p for p in command.params if isinstance(p, click.Option)]
    return [rec for p in options if (rec := p.get_help_record(ctx)) is not None]


@pytest.mark.parametrize("name", COMMANDS)
def test_one_default_per_option(name):
    for flags, text in _help_records(cli.commands[name]):
        assert text.count("[default:") <= 1, (name, flags, text)
        assert text.strip(), (name, flags)  # every option says what it does


def test_method_parameters_show_their_defaults():
    records = dict(_help_records(cli.commands["merge"]))
    for flag in ("--density", "--outliers", "--scale", "--seed", "--weights", "--t", "--granularity"):
        text = next(t for f, t in records.items() if f.startswith(flag + " "))
        assert "[default:" in text, (flag, text)


def test_same_option_same_words_everywhere():
    seen: dict[str, set[str]] = {}
    for name in COMMANDS:
        for flags, text in _help_records(cli.commands[name]):
            flag = flags.split()[0].rstrip(",")
            seen.setdefault(flag, set()).add(text)
    for flag in ("--threads", "--json", "--overwrite", "-q", "--max-memory", "--max-shard-size"):
        assert len(seen[flag]) == 1, (flag, seen[flag])


def test_methods_listing_uses_real_flags(invoke):
    result = invoke("methods")
    assert result.exit_code == 0
    flags = set(re.findall(r"^\s+(--[a-z_-]+)\s", result.stdout, re.M))
    assert "--tokenizer-from" in flags and not any("_" in f for f in flags)
    real = {opt for c in cli.commands.values() for p in c.params for opt in p.opts}
    assert flags <= real, flags - real
    assert all(line.count("[default:") <= 1 for line in result.stdout.splitlines())
