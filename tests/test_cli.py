"""The `surgery` command: exact error messages for bad input, inspect / methods / run / --dry-run.

Every user error must end as ``error: ...`` (naming the file or tensor) plus usually a ``hint: ...`` on
stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

METHOD_NAMES = [
    "task_arithmetic",
    "breadcrumbs",
    "breadcrumbs_ties",
    "ties",
    "dare",
    "dare_ties",
    "linear",
    "slerp",
    "model_stock",
]


def assert_error(result, *needles: str, hint: str | None = None) -> str:
    """Exit code 1, ``error: `` first on stderr, every needle in the message; returns stderr."""
    # facts printed before the failure (the base taken from the cards, plan notes) are not errors
    lines = result.stderr.splitlines(keepends=True)
    while lines and lines[0].startswith(("base: ", "note: ")):
        lines.pop(0)
    err = "".join(lines)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, no traceback
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "\nhint: " in err, f"no hint line (the rule: error + hint): {err}"
    if hint is not None:
        assert f"hint: {hint}" in err, err
    return err


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def family(make_family):
    return make_family()


@pytest.fixture
def merge_args(family, tmp_path):
    """Arguments of a valid task-arithmetic merge into tmp_path/out."""
    base, (ft1, ft2) = family
    return [ft1, ft2, "--base", base, "-o", tmp_path / "out", "-q"]


# -- inputs -----------------------------------------------------------------------------------------
def test_missing_input_path(invoke, family, tmp_path):
    base, (ft1, _) = family
    missing = tmp_path / "no_such_model"
    result = invoke("merge", ft1, missing, "--base", base, "-o", tmp_path / "out")
    assert_error(result, f"checkpoint not found: {missing}", hint="check the path")
    assert not (tmp_path / "out").exists()


def test_hub_like_id_not_local_nor_cached(invoke, family, tmp_path, monkeypatch):
    base, (ft1, _) = family
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("merge", ft1, "someorg/somemodel", "--base", base, "-o", tmp_path / "out")
    assert_error(result, "checkpoint not found: someorg/somemodel is not a local path", "HF_HUB_OFFLINE is set",
                 hint="check the path, or unset HF_HUB_OFFLINE")  # fmt: skip
    assert_error(invoke("inspect", "someorg/somemodel"), "someorg/somemodel is not a local path")


def test_all_plan_problems_reported_at_once(invoke, family, tmp_path, write_checkpoint):
    """Missing tensor, extra tensor, shape, vocabulary and dtype mismatches: one run, one message."""
    base, (ft1, _) = family
    from safetensors.torch import load_file

    tensors = load_file(str(ft1 / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 17)
    tensors["model.embed_tokens.weight"] = torch.zeros(50, 16)
    tensors["model.norm.weight"] = torch.zeros(16, dtype=torch.int64)
    tensors["model.extra.weight"] = torch.zeros(2)
    bad = write_checkpoint(tmp_path / "bad", tensors)
    err = assert_error(
        invoke("merge", ft1, bad, "--base", base, "-o", tmp_path / "out"),
        "the inputs cannot be merged (5 problem(s))",
        f"tensor 'model.layers.1.mlp.up_proj.weight' is missing from model {bad}",
        f"tensor 'model.extra.weight' is in model {bad} but not in base {base}",
        f"tensor 'model.layers.0.self_attn.q_proj.weight' has shape [16, 17] in model {bad} but [16, 16] "
        f"in base {base}",
        f"vocabulary sizes differ: tensor 'model.embed_tokens.weight' has shape [50, 16] in model {bad} "
        f"but [48, 16] in base {base}",
        f"tensor 'model.norm.weight' is I64 in model {bad} but F32 in base {base}",
        hint="every input must be a fine-tune of the same architecture",
    )
    assert err.count("vocabulary sizes differ") == 1  # q_proj's mismatch is not called a vocabulary problem
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, needles",
    [
        ("missing", ["tensor 'model.norm.weight' is missing from model"]),
        ("shape", ["tensor 'model.norm.weight' has shape [17] in model", "but [16] in base"]),
        (
            "vocab",
            ["vocabulary sizes differ: tensor 'lm_head.weight' has shape [49, 16]", "surgery transfer"],
        ),
        ("int", ["tensor 'model.norm.weight' is I32 in model", "but F32 in base"]),
    ],
)
def test_single_plan_problem(invoke, family, tmp_path, write_checkpoint, change, needles):
    base, (ft1, _) = family
    from safetensors.torch import load_file

    tensors = load_file(str(ft1 / "model.safetensors"))
    if change == "missing":
        del tensors["model.norm.weight"]
    elif change == "shape":
        tensors["model.norm.weight"] = torch.zeros(17)
    elif change == "vocab":
        tensors["lm_head.weight"] = torch.zeros(49, 16)
    else:
        tensors["model.norm.weight"] = torch.zeros(16, dtype=torch.int32)
    bad = write_checkpoint(tmp_path / "bad", tensors)
    err = assert_error(invoke("merge", bad, "--base", base, "-o", tmp_path / "out"), *needles)
    assert "(1 problem(s))" in err and str(bad) in err


def test_integer_tensors_must_be_equal(invoke, tmp_path, write_checkpoint):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g)
    base = write_checkpoint(tmp_path / "base", {"w": w, "ids": torch.arange(5)})
    ft = write_checkpoint(tmp_path / "ft", {"w": w + 1, "ids": torch.arange(5) * 2})
    assert_error(
        invoke("merge", ft, "--base", base, "-o", tmp_path / "out", "-q"),
        f"integer tensor 'ids' differs between {base} and {ft}",
        hint="integer tensors (ids, masks, buffers) cannot be merged",
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()


# -- output folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["equal", "inside", "parent"])
def test_output_overlapping_an_input(invoke, family, tmp_path, where):
    base, (ft1, ft2) = family
    out = {"equal": ft2, "inside": base / "merged", "parent": tmp_path}[where]
    before = folder_bytes(tmp_path)
    result = invoke("merge", ft1, ft2, "--base", base, "-o", out, "--overwrite")
    assert_error(result, f"output folder {out} overlaps input", hint="choose an output folder outside")
    assert folder_bytes(tmp_path) == before  # nothing written, nothing deleted


def test_output_folder_of_a_single_file_input(invoke, family, tmp_path):
    base, (ft1, _) = family
    result = invoke("merge", ft1 / "model.safetensors", "--base", base, "-o", ft1)
    assert_error(result, f"output folder {ft1} overlaps input {ft1 / 'model.safetensors'}")


def test_non_empty_output_needs_overwrite(invoke, merge_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_error(
        invoke("merge", *merge_args), f"output folder {out} is not empty", hint="choose a new folder"
    )
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces a previous surgery output only: anything else is refused, named, kept
    assert_error(
        invoke("merge", *merge_args, "--overwrite"),
        f"output folder {out} holds files surgery did not write (keep.txt)",
        hint="choose a new or empty folder (surgery never deletes files it did not write)",
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert invoke("merge", *merge_args).exit_code == 0
    before = folder_bytes(out)
    result = invoke("merge", *merge_args, "--scale", "0.5", "--overwrite")
    assert result.exit_code == 0, (result.output, result.exception)
    assert folder_bytes(out).keys() == before.keys() and folder_bytes(out) != before


def test_output_is_a_file(invoke, merge_args, tmp_path):
    (tmp_path / "out").write_text("x")
    assert_error(invoke("merge", *merge_args), f"output {tmp_path / 'out'} exists and is not a folder")


# -- base from the model cards ----------------------------------------------------------------------
def test_base_from_cards_absent(invoke, family, tmp_path):
    _, (ft1, ft2) = family
    result = invoke("merge", ft1, ft2, "--ties", "-o", tmp_path / "out")
    assert_error(result, f"{ft1} has no single base_model in its model card (README.md)", hint="pass --base")


def test_base_from_cards_disagree(invoke, family, tmp_path):
    base, (ft1, ft2) = family
    other = tmp_path / "other_base"
    other.mkdir()
    (ft1 / "README.md").write_text("---\nbase_model: ../base\n---\n")
    (ft2 / "README.md").write_text(f"---\nbase_model: {other}\n---\n")
    assert_error(
        invoke("merge", ft1, ft2, "-o", tmp_path / "out"),
        "the fine-tunes' model cards name different bases",
        f"{ft1} -> {base}",
        f"{ft2} -> {other}",
        hint="pass --base BASE to choose one",
    )


def test_base_from_cards_hub_id(invoke, family, tmp_path, monkeypatch):
    _, (ft1, ft2) = family
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ft in (ft1, ft2):
        (ft / "README.md").write_text("---\nbase_model: meta-llama/Llama-3.1-8B\nlicense: x\n---\n")
    assert_error(
        invoke("merge", ft1, ft2, "-o", tmp_path / "out"),
        "checkpoint not found: meta-llama/Llama-3.1-8B is not a local path",  # the cards' base is a Hub id
    )


def test_base_from_cards_agree(invoke, family, tmp_path):
    base, (ft1, ft2) = family
    (ft1 / "README.md").write_text("---\nbase_model: ../base\n---\n# ft1\n")
    (ft2 / "README.md").write_text(f"---\nbase_model:\n- {base}\n---\n# ft2\n")
    r1 = invoke("merge", ft1, ft2, "-o", tmp_path / "cards", "-q")
    assert r1.exit_code == 0, (r1.output, r1.exception)
    r2 = invoke("merge", ft1, ft2, "--base", base, "-o", tmp_path / "explicit", "-q")
    assert r2.exit_code == 0, (r2.output, r2.exception)
    assert folder_bytes(tmp_path / "cards") == folder_bytes(tmp_path / "explicit")
    recipe = yaml.safe_load((tmp_path / "cards" / "surgery_recipe.yaml").read_text())
    assert recipe["base"] == str(base) and recipe["method"] == "task_arithmetic"


# -- methods and parameters -------------------------------------------------------------------------
def test_unknown_method(invoke, merge_args):
    assert_error(invoke("merge", *merge_args, "--method", "frankenmerge"), "unknown method 'frankenmerge'")


@pytest.mark.parametrize("density", ["1.5", "0", "-0.1", "nan"])
def test_bad_density(invoke, merge_args, density):
    err = assert_error(invoke("merge", *merge_args, "--ties", "--density", density), "ties: density")
    assert "outside (0, 1]" in err or "must be finite" in err


def test_parameter_the_method_does_not_take(invoke, merge_args):
    assert_error(
        invoke("merge", *merge_args, "--density", "0.5"),
        "method task_arithmetic takes no parameter 'density'",
        hint="its parameters are: scale, weights",
    )


def test_weights_count_message(invoke, merge_args):
    assert_error(
        invoke("merge", *merge_args, "--weights", "1,2,3"),
        "task_arithmetic: weights has 3 values for 2 models",
        hint="give one weight per model",
    )


def test_granularity_choice_message(invoke, family, tmp_path):
    base, (ft1, ft2) = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"method": "ties", "base": str(base), "models": [str(ft1), str(ft2)],
             "parameters": {"granularity": "per_layer"}}
        )
    )  # fmt: skip
    assert_error(
        invoke("run", recipe, "-o", tmp_path / "out"),
        "ties: granularity must be one of per_tensor, per_row, global, not 'per_layer'",
    )


def test_two_method_flags(invoke, merge_args):
    assert_error(
        invoke("merge", *merge_args, "--ties", "--breadcrumbs"), "choose one method, not breadcrumbs and ties"
    )
    assert_error(
        invoke("merge", *merge_args, "--dare", "--method", "slerp"), "choose one method, not dare and slerp"
    )


def test_bad_dtype_and_size(invoke, merge_args):
    assert_error(invoke("merge", *merge_args, "--dtype", "int8"), "unsupported output dtype 'int8'")
    assert_error(invoke("merge", *merge_args, "--max-shard-size", "lots"), "cannot read size 'lots'")


# -- malformed safetensors --------------------------------------------------------------------------
def valid_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    save_file({"a": torch.randn(8, generator=g), "b": torch.randn(4, 4, generator=g)}, str(path))
    return path


def corrupt(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """Write a malformed checkpoint of ``kind`` in folder; return (path to pass, expected needles)."""
    f = folder / "model.safetensors"
    folder.mkdir(parents=True)
    if kind == "short":
        f.write_bytes(b"\x01\x02")
        return f, [f"{f} is too short to be a safetensors file (2 bytes)"]
    if kind == "header_past_end":
        f.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
        return f, [f"{f} declares a 1000-byte header but the file has only 16 bytes"]
    if kind == "header_over_100mb":
        f.write_bytes(struct.pack("<Q", 200_000_000))
        return f, [f"{f} declares a header of 200000000 bytes, over the format's 100 MB limit"]
    if kind == "bad_json":
        f.write_bytes(struct.pack("<Q", 9) + b"{not json")
        return f, [f"{f} has a header that is not valid JSON"]
    if kind == "overlap":
        entry = {"dtype": "F32", "shape": [2]}
        header = {"a": {**entry, "data_offsets": [0, 8]}, "b": {**entry, "data_offsets": [4, 12]}}
        raw_safetensors(f, header, bytes(12))
        return f, [f"{f}: tensors 'a' and 'b' overlap"]
    if kind == "offsets_out_of_range":
        raw_safetensors(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
        return f, [f"{f}: tensor 'a' ends at byte 16 of the data but the file holds only 8", "truncated"]
    if kind == "wrong_size":
        raw_safetensors(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12))
        return f, [f"{f}: tensor 'a' (F32, shape [4]) needs 16 bytes but its data_offsets [0, 12] give 12"]
    if kind == "unknown_dtype":
        raw_safetensors(f, {"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2))
        return f, [f"{f}: tensor 'a' has a malformed header entry (unknown dtype 'Q4')"]
    if kind == "truncated":
        valid_file(f)
        f.write_bytes(f.read_bytes()[:-5])
        return f, [f"{f}: tensor 'b' ends at byte 96 of the data but the file holds only 91", "truncated"]
    if kind == "hole":
        raw_safetensors(f, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
        return f, [f"{f}: bytes 0..4 of the data belong to no tensor"]
    index = folder / "model.safetensors.index.json"
    if kind == "shard_outside":
        valid_file(folder.parent / "x.safetensors")  # it exists: refused for where it is, not for absence
        index.write_text(json.dumps({"weight_map": {"a": "../x.safetensors", "b": "../x.safetensors"}}))
        return folder, [f"{index} names shard '../x.safetensors', which lies outside the checkpoint folder"]
    if kind == "shard_absolute":
        other = valid_file(folder.parent / "elsewhere" / "y.safetensors")
        index.write_text(json.dumps({"weight_map": {"a": str(other), "b": str(other)}}))
        return folder, [f"names shard '{other}', which lies outside the checkpoint folder"]
    if kind == "shard_missing":
        valid_file(folder / "model-00001-of-00002.safetensors")
        index.write_text(
            json.dumps(
                {
                    "weight_map": {
                        "a": "model-00001-of-00002.safetensors",
                        "c": "model-00002-of-00002.safetensors",
                    }
                }
            )
        )
        return folder, [f"shard model-00002-of-00002.safetensors named in {index} is missing"]
    if kind == "index_wrong_tensor":
        valid_file(folder / "model-00001-of-00001.safetensors")
        index.write_text(json.dumps({"weight_map": {"zz": "model-00001-of-00001.safetensors"}}))
        return folder, [f"{index} maps tensor 'zz' to model-00001-of-00001.safetensors, but that shard"]
    if kind == "index_bad_json":
        index.write_text("{")
        return folder, [f"{index} is not valid JSON"]
    if kind == "shards_without_index":
        valid_file(folder / "model-00001-of-00002.safetensors")
        valid_file(folder / "model-00002-of-00002.safetensors")
        return folder, [f"{folder} holds 2 .safetensors files but no model.safetensors.index.json"]
    raise AssertionError(kind)


MALFORMED = [
    "short",
    "header_past_end",
    "header_over_100mb",
    "bad_json",
    "overlap",
    "offsets_out_of_range",
    "wrong_size",
    "unknown_dtype",
    "truncated",
    "hole",
    "shard_outside",
    "shard_absolute",
    "shard_missing",
    "index_wrong_tensor",
    "index_bad_json",
    "shards_without_index",
]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_checkpoint(invoke, tmp_path, kind):
    base = valid_file(tmp_path / "base" / "model.safetensors").parent
    bad, needles = corrupt(kind, tmp_path / "bad")
    assert_error(invoke("merge", bad, "--base", base, "-o", tmp_path / "out"), *needles)
    assert_error(invoke("inspect", bad), *needles)
    assert not (tmp_path / "out").exists()


# -- inspect, methods -------------------------------------------------------------------------------
def test_inspect_json(invoke, family):
    base, _ = family
    result = invoke("inspect", base, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["source"] == str(base)
    assert report["files"] == ["model.safetensors"]
    assert report["tensors"] == 9
    assert report["parameters"] == 48 * 16 * 2 + 16 * 16 * 2 + 32 * 16 * 2 + 16 * 3
    assert report["bytes"] == 4 * report["parameters"]
    assert report["dtypes"] == {"F32": 9}
    layers = report["layers"]
    assert layers["num_blocks"] == 2 and layers["config_layers"] == 2 and layers["consistent_with_config"]
    assert layers["before"] == 1 and layers["after"] == 2 and layers["unknown"] == []
    assert layers["block_of"]["model.layers.1.mlp.up_proj.weight"] == 1
    assert "model.embed_tokens.weight" not in layers["block_of"]
    assert report["tied_embeddings"] is False


def test_inspect_text(invoke, family):
    base, _ = family
    result = invoke("inspect", base)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "tensors      9" in result.stdout and "F32 x9" in result.stdout and "blocks       2" in result.stdout
    )


def test_methods_lists_all(invoke):
    result = invoke("methods")
    assert result.exit_code == 0, (result.output, result.exception)
    listed = [line.split()[0] for line in result.stdout.splitlines() if line and not line[0].isspace()]
    from surgery.methods import METHODS

    assert listed == list(METHODS)


def test_every_registry_merge_method_has_a_merge_flag(invoke):
    from surgery.methods import METHODS

    result = invoke("merge", "--help")
    merge_methods = [name for name, spec in METHODS.items() if spec.command == "merge"]
    assert set(METHOD_NAMES) <= set(merge_methods)
    for name in merge_methods:
        assert "--" + name.replace("_", "-") in result.stdout, name


# -- run, dry run, help -----------------------------------------------------------------------------
def test_run_saved_recipe_reproduces_output(invoke, family, tmp_path):
    base, (ft1, ft2) = family
    out, out2 = tmp_path / "out", tmp_path / "out2"
    args = ["--breadcrumbs", "--density", "0.3", "--outliers", "0.05", "--weights", "1,0.5"]
    result = invoke("merge", ft1, ft2, "--base", base, *args, "--max-shard-size", "3KB", "-o", out, "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"wrote {out} (9 tensors" in result.stdout
    files = folder_bytes(out)
    assert "model.safetensors.index.json" in files and "config.json" in files and "README.md" in files
    recipe = yaml.safe_load(files["surgery_recipe.yaml"])
    assert recipe["parameters"]["density"] == 0.3 and recipe["parameters"]["weights"] == [1.0, 0.5]
    assert recipe["output"]["max_shard_size"] == 3000
    result = invoke(
        "run", out / "surgery_recipe.yaml", "-o", out2, "--threads", "1", "--max-memory", "4KiB", "-q"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert folder_bytes(out2) == files


def test_run_bad_recipe(invoke, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_error(invoke("run", missing, "-o", tmp_path / "out"), f"recipe not found: {missing}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\n")
    assert_error(invoke("run", bad, "-o", tmp_path / "out"), f"{bad} is not a surgery recipe")


def test_dry_run_writes_nothing(invoke, merge_args, tmp_path):
    before = folder_bytes(tmp_path)
    result = invoke("merge", *merge_args, "--ties", "--dry-run")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["method"] == "ties" and summary["tensors"] == 9 and summary["merged_tensors"] == 9
    assert summary["shards"] == ["model.safetensors"] and summary["output_bytes"] > 0
    assert not (tmp_path / "out").exists()
    assert folder_bytes(tmp_path) == before


def test_help_does_not_import_numba_or_torch():
    code = (
        "import sys\n"
        "from surgery_cli.main import cli\n"
        "try:\n"
        "    cli(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('numba', 'torch', 'numpy', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    heavy = proc.stdout.strip().splitlines()[-1].removeprefix("HEAVY").strip().split(",")
    assert "numba" not in heavy and "torch" not in heavy, heavy
