"""Issue 10, items 4 and 5: an option the chosen method or mode does not use is an error naming it;
density + outliers > 1 is an error."""

from __future__ import annotations

import pytest
from cli_checks import assert_fails, snapshot


@pytest.fixture
def fam(make_family):
    return make_family()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lines-alpha", "0.5"], "--lines-alpha does nothing without --lines"),
        (["--lines-beta", "0.5"], "--lines-beta does nothing without --lines"),
        (["--lines-outside", "one"], "--lines-outside does nothing without --lines"),
        (["--lines-alpha", "auto", "--lines-beta", "0"], "--lines-alpha and --lines-beta do nothing"),
        (["--density", "0.5"], "method task_arithmetic takes no parameter 'density'"),
        (["--ties", "--seed", "3"], "method ties takes no parameter 'seed'"),
        (["--dare", "--t", "0.3"], "method dare takes no parameter 't'"),
        (["--range-cache", "rc"], "--range-cache does nothing without --stream or URL inputs"),
        (["--ties", "--rho", "0.1"], "method ties takes no parameter 'rho'"),
        (["--rank", "4"], "--rank does nothing without --as-lora"),
    ],
)
def test_merge_refuses_unused_options(invoke, fam, tmp_path, extra, needle):
    base, (ft1, ft2) = fam
    before = snapshot(tmp_path)
    result = invoke("merge", ft1, ft2, "--base", base, *extra, "-o", tmp_path / "out", "-q")
    assert_fails(result, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "command, needle",
    [
        (["diff", "{base}", "{ft}", "--graft", "0.1", "--outliers", "0.1"], "--outliers does nothing with --graft"),
        (["diff", "{base}", "{ft}", "--density", "0.1", "--dtype", "bfloat16"], "--dtype does nothing for a sparse patch"),
        (["graft", "{base}", "{ft}", "--density", "0.1", "--patch", "--dtype", "float16"], "--dtype does nothing with --patch"),
        (["intruders", "{base}", "{ft}", "--overwrite"], "--overwrite does nothing without --mitigate"),
        (["intruders", "{base}", "{ft}", "--no-cache", "--cache-dir", "{tmp}/c"], "--cache-dir does nothing with --no-cache"),
        (["stats", "{base}", "{ft}", "--json", "--tensors"], "--tensors does nothing with --json"),
        (["inspect", "{ft}", "--json", "--layers"], "--layers does nothing with --json"),
        (["localize", "{base}", "{ft}", "--compare", "{ft}", "--density", "0.1"], "--density does nothing with --compare"),
    ],
)  # fmt: skip
def test_other_commands_refuse_unused_options(invoke, fam, tmp_path, command, needle):
    base, (ft, _) = fam
    args = [a.format(base=base, ft=ft, tmp=tmp_path) for a in command]
    if "-o" not in args and command[0] in ("diff", "graft"):
        args += ["-o", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    assert_fails(invoke(*args), needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "command",
    [
        [
            "merge",
            "{ft1}",
            "{ft2}",
            "--base",
            "{base}",
            "--breadcrumbs",
            "--density",
            "0.6",
            "--outliers",
            "0.5",
        ],
        ["diff", "{base}", "{ft1}", "--breadcrumbs", "--density", "0.6", "--outliers", "0.5"],
    ],
)
def test_density_plus_outliers_above_one(invoke, fam, tmp_path, command):
    base, (ft1, ft2) = fam
    args = [a.format(base=base, ft1=ft1, ft2=ft2) for a in command]
    assert_fails(
        invoke(*args, "-o", tmp_path / "out"),
        "density 0.6 + outliers 0.5 > 1: only 0.5 of the entries lie below the outliers",
        hint="density is the fraction KEPT",
    )
    assert not (tmp_path / "out").exists()
    ok = invoke(*args[:-1], "0.4", "-o", tmp_path / "ok", "-q")  # 0.6 + 0.4 = 1 is fine
    assert ok.exit_code == 0, ok.output
