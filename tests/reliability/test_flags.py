"""Issue 10, items 6-9 and parts of 15: --device, --threads and --plot are checked before any work;
commands that run models need config.json; usage errors and --debug everywhere."""

from __future__ import annotations

import json

import pytest
from cli_checks import assert_fails, snapshot


@pytest.fixture
def fam(make_family):
    return make_family()


def _merge(fam, out, *extra):
    base, (ft1, ft2) = fam
    return ["merge", ft1, ft2, "--base", base, "-o", out, "-q", *extra]


# -- item 6: --device ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device, needle, hint",
    [
        ("cuda", "device 'cuda': CUDA is not available on this machine", "use --device cpu"),
        ("cuda:1", "device 'cuda:1': CUDA is not available on this machine", "use --device cpu"),
        ("gpu", "unknown device 'gpu'", "use cpu, cuda or cuda:N"),
        ("cuda:x", "unknown device 'cuda:x'", "use cpu, cuda or cuda:N"),
    ],
)
def test_device_checked_before_anything_is_written(invoke, fam, tmp_path, device, needle, hint, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = snapshot(tmp_path)
    for args in (_merge(fam, tmp_path / "out", "--device", device),
                 ["stats", fam[0], fam[1][0], "--device", device],
                 ["intruders", fam[0], fam[1][0], "--device", device]):  # fmt: skip
        assert_fails(invoke(*args), needle, hint=hint)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_device_index_beyond_the_gpus(invoke, fam, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert_fails(invoke(*_merge(fam, tmp_path / "out", "--device", "cuda:2")),
                 "device 'cuda:2': this machine has 2 CUDA device(s)", hint="use cuda:0 ... cuda:1")  # fmt: skip
    assert not (tmp_path / "out").exists()


# -- item 7: --threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", ["0", "-1"])
@pytest.mark.parametrize("command", ["merge", "stats", "intruders", "tuco", "generate", "localize"])
def test_threads_positive_everywhere(invoke, fam, tmp_path, threads, command):
    base, (ft, _) = fam
    args = {"merge": _merge(fam, tmp_path / "out"),
            "tuco": ["tuco", base, ft, "--prompts", tmp_path / "p.txt"],
            "generate": ["generate", base, ft, "--alpha", "1", "--prompt", "x"],
            }.get(command, [command, base, ft])  # fmt: skip
    result = invoke(*args, "--threads", threads)
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith(f"error: Invalid value for '--threads': {threads} is not in the range x>=1."), err
    assert "hint: see `" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- item 8: --plot ----------------------------------------------------------------------------------------
def test_plot_path_checked_before_computing(invoke, fam, tmp_path, monkeypatch):
    base, (ft, _) = fam
    (tmp_path / "afile").write_text("x")
    import surgery.analysis.stats as stats

    monkeypatch.setattr(stats, "diff_stats", lambda *a, **k: pytest.fail("computed before the check"))
    before = snapshot(tmp_path)
    assert_fails(invoke("stats", base, ft, "--plot", tmp_path / "afile" / "p.png"),
                 f"cannot write plot {tmp_path / 'afile' / 'p.png'}: {tmp_path / 'afile'} is not a folder")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_plot_parent_created_for_stats(invoke, fam, tmp_path):
    base, (ft, _) = fam
    plot = tmp_path / "plots" / "s.png"
    result = invoke("stats", base, ft, "--plot", plot, "-q", "--no-rank")
    assert result.exit_code == 0, result.output
    assert plot.is_file()


# -- item 9: models without config.json ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["tuco", "generate", "localize"])
def test_model_commands_need_config(invoke, tmp_path, write_checkpoint, command):
    import torch

    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(2)})
    ft = write_checkpoint(tmp_path / "ft", {"w": torch.ones(2)})
    (tmp_path / "p.txt").write_text("abc\n")
    (tmp_path / "d.jsonl").write_text((json.dumps({"prompt": "a", "answer": "b"}) + "\n") * 5)
    args = {"tuco": ["--prompts", tmp_path / "p.txt"], "generate": ["--alpha", "1", "--prompt", "x"],
            "localize": ["--data", tmp_path / "d.jsonl", "--density", "0.1", "-o", tmp_path / "out"]}  # fmt: skip
    before = snapshot(tmp_path)
    assert_fails(invoke(command, base, ft, *args[command]),
                 f"{base} has no config.json: this command runs the model with transformers",
                 hint="copy config.json")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_model_folder_with_broken_config(invoke, tmp_path, write_checkpoint):
    import torch

    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(2)}, config={"model_type": "no-such-arch"})
    ft = write_checkpoint(tmp_path / "ft", {"w": torch.ones(2)}, config={"model_type": "no-such-arch"})
    result = invoke("generate", base, ft, "--alpha", "1", "--prompt", "x")
    assert_fails(result, f"cannot load the model of {base} with transformers", hint="the folder needs")


# -- item 15: --debug after the subcommand ---------------------------------------------------------------
def test_debug_after_the_subcommand(invoke, tmp_path):
    missing = tmp_path / "missing"
    plain = invoke("inspect", missing)
    assert plain.exit_code == 1 and plain.stderr.startswith("error: ")
    for args in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        result = invoke(*args)
        assert result.exit_code == 1 and not isinstance(result.exception, SystemExit)  # raised: traceback


# -- the same kind of hole elsewhere ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["lines", "{base}", "{ft}", "--alpha", "nan", "-o", "{out}"], "lines: alpha must be finite"),
        (["merge", "{ft}", "--base", "{base}", "--lines", "--lines-beta", "inf", "-o", "{out}"],
         "lines: beta must be finite"),
        (["merge", "{ft}", "--base", "{base}", "--max-shard-size", "0", "-o", "{out}"],
         "max_shard_size must be at least 1 byte"),
        (["generate", "{base}", "{ft}", "--alpha", "nan", "--prompt", "x"], "alpha must be a finite number"),
        (["generate", "{base}", "{ft}", "--alpha", "1", "--prompt", "x", "--max-new-tokens", "0"],
         "Invalid value for '--max-new-tokens'"),
    ],
)  # fmt: skip
def test_non_finite_and_empty_values_refused(invoke, fam, tmp_path, args, needle):
    base, (ft, _) = fam
    out = tmp_path / "out"
    result = invoke(*[a.format(base=base, ft=ft, out=out) for a in args])
    assert result.exit_code in (1, 2) and needle in result.stderr, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists()


def test_localize_lr_must_be_positive(tmp_path):
    from surgery.analysis.localize import localize
    from surgery.errors import RecipeError

    with pytest.raises(RecipeError, match="lr must be a positive number"):
        localize(tmp_path / "b", tmp_path / "f", [("a", "b")] * 5, 0.1, tmp_path / "o", lr=-1.0)


@pytest.mark.parametrize(
    "args, needle, hint",
    [
        (["reset", "{base}", "{ft}", "--fraction", "2"], "half_reset: fraction = 2.0 is outside [0, 1]",
         "`surgery methods` lists half_reset's parameters"),
        (["merge", "{ft}", "--base", "{base}", "--ties", "--breadcrumbs"], "choose one method, not breadcrumbs and ties",
         "give one method flag"),
    ],
)  # fmt: skip
def test_parameter_and_method_errors_carry_a_hint(invoke, fam, tmp_path, args, needle, hint):
    base, (ft, _) = fam
    before = snapshot(tmp_path)
    result = invoke(*[a.format(base=base, ft=ft) for a in args], "-o", tmp_path / "out", "-q")
    assert_fails(result, needle, hint=hint)
    assert snapshot(tmp_path) == before


def test_an_error_raised_without_a_hint_still_gets_one(invoke, tmp_path, monkeypatch):
    """The CLI's fallback: the rule is error + hint, whichever library error escapes without one."""
    import surgery.inspect
    from surgery.errors import RecipeError

    def describe(path, stream):
        raise RecipeError("something specific went wrong")

    monkeypatch.setattr(surgery.inspect, "describe", describe)
    result = invoke("inspect", tmp_path)
    assert_fails(result, "something specific went wrong", hint="see `surgery COMMAND --help`")
