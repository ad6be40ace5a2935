"""The guarded output folder (surgery/output.py), through the CLI: --overwrite replaces only what
surgery wrote, and one process at a time writes a folder (issue 10, items 1 and 16)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.output import open_output


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def args(make_family, tmp_path):
    base, (ft1, ft2) = make_family()
    return ["merge", ft1, ft2, "--base", base, "-q"]


def test_overwrite_in_a_folder_with_other_files_deletes_nothing(invoke, args, tmp_path, monkeypatch):
    """`cd somewhere && surgery merge A B -o . --overwrite` once wiped unrelated files and subfolders."""
    here = tmp_path / "somewhere"
    (here / "notes").mkdir(parents=True)
    (here / "notes" / "todo.md").write_text("mine")
    (here / "thesis.tex").write_text("also mine")
    (here / "config.json").write_text("{}")
    before = folder_bytes(here)
    monkeypatch.chdir(here)
    result = invoke(*args, "-o", ".", "--overwrite")
    assert result.exit_code == 1
    assert "error: output folder . holds files surgery did not write (notes, thesis.tex): --overwrite only " \
           "replaces a previous surgery output" in result.stderr  # fmt: skip
    assert "hint: choose a new or empty folder" in result.stderr
    assert folder_bytes(here) == before and sorted(p.name for p in here.iterdir()) == ["config.json", "notes",
                                                                                        "thesis.tex"]  # fmt: skip


def test_overwrite_refuses_a_model_folder_surgery_did_not_write(invoke, args, tmp_path):
    model = tmp_path / "downloaded"
    model.mkdir()
    save_file({"w": torch.zeros(2)}, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    before = folder_bytes(model)
    result = invoke(*args, "-o", model, "--overwrite")
    assert result.exit_code == 1
    assert f"output folder {model} is not a surgery output: --overwrite only replaces" in result.stderr
    assert folder_bytes(model) == before


def test_overwrite_replaces_a_previous_output_but_not_a_folder_put_inside_it(invoke, args, tmp_path):
    out = tmp_path / "out"
    assert invoke(*args, "--max-shard-size", "3KB", "-o", out).exit_code == 0
    (out / "extra").mkdir()
    assert invoke(*args, "--scale", "0.5", "-o", out, "--overwrite").exit_code == 1
    assert (out / "extra").is_dir() and (out / "surgery_recipe.yaml").is_file()
    (out / "extra").rmdir()
    result = invoke(*args, "--scale", "0.5", "-o", out, "--overwrite")  # one shard where there were several
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "surgery_recipe.yaml"]  # fmt: skip


def surgery_process(args: list, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "surgery_cli.main", *map(str, args), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_a_second_process_is_refused_while_one_writes(args, tmp_path):
    out = tmp_path / "out"
    with open_output(out, [], "a run in this process", overwrite=False):
        proc = surgery_process(args, out)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        assert f"error: another surgery process (pid {os.getpid()}) is writing {out}" in err
        assert sorted(p.name for p in (out / ".surgery-partial").iterdir()) == [
            "journal.txt",
            "lock",
            "state.json",
        ]
    # a refused first run leaves no trace in a folder it did not create
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    proc = surgery_process(args, tmp_path / "busy")
    assert proc.wait(timeout=120) == 1 and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x"]


def test_three_identical_merges_at_once(make_family, tmp_path):
    """One writes; the others say who is writing (or, started late, that the folder is finished)."""
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (256, 256) for i in range(6)}
    base, (ft1, ft2) = make_family(shapes=shapes)
    args = [
        "merge",
        ft1,
        ft2,
        "--base",
        base,
        "--breadcrumbs",
        "-q",
        "--threads",
        "1",
        "--max-memory",
        "64KiB",
    ]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert surgery_process(args, ref).wait(timeout=300) == 0
    procs = [surgery_process(args, out) for _ in range(3)]
    results = [(p.wait(timeout=300), p.communicate()[1], p.pid) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    pids = "|".join(str(p.pid) for p in procs)  # usually the winner; a late loser may briefly hold it
    for code, err, _ in results:
        assert "No such file" not in err and "Traceback" not in err, err
        if code:
            assert code == 1
            busy = re.search(
                rf"error: another surgery process( \(pid ({pids})\))? is writing {re.escape(str(out))}", err
            )
            finished = f"error: output folder {out} is not empty" in err
            assert busy or finished, err
    assert folder_bytes(out) == folder_bytes(ref)


def test_an_error_before_anything_is_written_leaves_no_folder(tmp_path, make_family):
    from surgery.engine import EngineOptions, merge
    from surgery.errors import RecipeError
    from surgery.methods import METHODS
    from surgery.recipe import make_recipe

    base, fts = make_family()
    out = tmp_path / "out"
    recipe = make_recipe("task_arithmetic", fts, base)
    with pytest.raises(RecipeError, match="needs its whole matrix"):  # raised by the reduce/plan stage
        from dataclasses import replace

        spec = METHODS["task_arithmetic"]
        METHODS["task_arithmetic"] = replace(spec, combine=replace(spec.combine, whole_matrix=True))
        try:
            merge(recipe, out, EngineOptions(threads=1, max_memory=100))
        finally:
            METHODS["task_arithmetic"] = spec
    assert not out.exists()
