"""Checks shared by the CLI reliability tests (issue 10's rule)."""

from __future__ import annotations

from pathlib import Path

# lines a command may print on stderr before it fails (facts about the plan, not errors)
_PREAMBLE = ("note: ", "config: ", "warning: ", "base: ")


def assert_fails(result, *needles: str, hint: str | None = None) -> str:
    """Exit code 1, no traceback, an ``error: `` line (after notes only), every needle in it."""
    err = result.stderr
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, no traceback
    assert "Traceback" not in err, err
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if not line.startswith(_PREAMBLE))
    assert lines[first].startswith("error: "), err
    message = "\n".join(lines[first:])
    for needle in needles:
        assert needle in message, (needle, err)
    assert "\nhint: " in message, f"no hint line (the rule: error + hint): {err}"
    if hint is not None:
        assert f"hint: {hint}" in message, err
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to assert that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
