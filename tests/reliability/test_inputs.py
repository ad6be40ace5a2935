"""Issue 10, items 11, 12 and 14: input paths checked first, bases from model cards resolved against
the fine-tune's folder and printed, contradicting --base warned about, recipes with relative paths and
without a base, hints of `surgery run` in recipe terms."""

from __future__ import annotations

import yaml
from cli_checks import assert_fails, snapshot


def test_typo_in_an_input_without_base(invoke, make_family, tmp_path):
    _, (ft1, _) = make_family()
    typo = tmp_path / "ft_reveres"
    result = invoke("merge", ft1, typo, "-o", tmp_path / "out")
    assert_fails(result, f"{typo}: no such folder or file", hint="check the path")
    assert "model card" not in result.stderr and not (tmp_path / "out").exists()


def test_relative_card_base_resolves_against_the_finetune(invoke, make_family, tmp_path, monkeypatch):
    base, (ft1, ft2) = make_family()
    for ft in (ft1, ft2):
        (ft / "README.md").write_text("---\nbase_model: ../base\n---\n")
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # ../base from here is tmp/a/base: does not exist, and is not looked at
    result = invoke("merge", ft1, ft2, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert f"base: {base} (the base_model of every fine-tune's model card)" in result.stderr
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["base"] == str(base)


def test_card_base_never_taken_from_the_current_folder(invoke, make_family, tmp_path, monkeypatch):
    """A card's ../base that is missing beside the fine-tune must not pick up ../base of the cwd."""
    _, (ft1, ft2) = make_family(root=tmp_path / "family" / "x")
    for ft in (ft1, ft2):
        (ft / "README.md").write_text("---\nbase_model: ../../decoy\n---\n")
    (tmp_path / "decoy").mkdir()  # = cwd/../decoy for the cwd below
    monkeypatch.chdir(tmp_path / "family")
    result = invoke("merge", ft1, ft2, "-o", tmp_path / "out")
    assert_fails(result, f"the model card of {ft1} names base '../../decoy', which is not a folder beside it")
    assert not (tmp_path / "out").exists()


def test_explicit_base_contradicting_every_card_is_warned(invoke, make_family, tmp_path):
    base, (ft1, ft2) = make_family()
    other, _ = make_family(root=tmp_path / "other", n_models=0)
    for ft in (ft1, ft2):
        (ft / "README.md").write_text("---\nbase_model: ../base\n---\n")
    result = invoke("merge", ft1, ft2, "--base", other, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert f"warning: the base {other} is not the base_model of any fine-tune's model card" in result.stderr
    assert f"{ft1} -> {base}" in result.stderr
    same = invoke("merge", ft1, ft2, "--base", base, "-o", tmp_path / "out2", "-q")
    assert same.exit_code == 0 and "warning" not in same.stderr


def _recipe(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **fields}))
    return path


def test_recipe_paths_relative_to_the_recipe_file(invoke, make_family, tmp_path, monkeypatch):
    base, (ft1, ft2) = make_family(root=tmp_path / "models")
    recipe = _recipe(tmp_path / "models", method="task_arithmetic", base="base", models=["ft1", "ft2"])
    monkeypatch.chdir(tmp_path / "models" / "ft1")  # base and ft1 would not resolve from here
    result = invoke("run", recipe, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert saved["base"] == str(base) and saved["models"] == [str(ft1), str(ft2)]


def test_recipe_without_base_uses_the_cards(invoke, make_family, tmp_path):
    base, (ft1, ft2) = make_family()
    recipe = _recipe(tmp_path / "r", method="ties", models=[str(ft1), str(ft2)])
    assert_fails(invoke("run", recipe, "-o", tmp_path / "out"),
                 f"{ft1} has no single base_model in its model card",
                 hint=f"add `base: PATH` to {recipe}")  # fmt: skip
    for ft in (ft1, ft2):
        (ft / "README.md").write_text("---\nbase_model: ../base\n---\n")
    result = invoke("run", recipe, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert f"base: {base} (the base_model of every model's card)" in result.stderr


def test_run_hints_name_recipe_keys_not_missing_flags(invoke, make_family, tmp_path):
    base, (ft1, _) = make_family()
    recipe = _recipe(tmp_path / "r", method="patch", base=str(base), models=[str(ft1)],
                     parameters={"density": 0.1, "region": "no_such_tensor"})  # fmt: skip
    before = snapshot(tmp_path)
    message = assert_fails(invoke("run", recipe, "-o", tmp_path / "out"), "matches no float tensor")
    assert "--region" not in message
    assert "`parameters: region: REGEX` in the recipe" in message
    assert snapshot(tmp_path) == before


def test_unfinished_run_is_not_a_checkpoint(invoke, tmp_path):
    (tmp_path / "half" / ".surgery-partial").mkdir(parents=True)
    assert_fails(invoke("inspect", tmp_path / "half"),
                 f"{tmp_path / 'half'} holds an unfinished surgery run (.surgery-partial), not a checkpoint",
                 hint="re-run the command that wrote it")  # fmt: skip
