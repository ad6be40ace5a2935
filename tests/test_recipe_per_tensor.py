"""Recipe fields added for per-layer parameters and layer stacking: per_tensor, per-model density, slices."""

from __future__ import annotations

import pytest
import torch

from surgery.errors import PlanError, RecipeError
from surgery.recipe import make_recipe


def test_per_tensor_values_are_validated(tmp_path):
    r = make_recipe("ties", ["a", "b"], "base", {}, per_tensor={"x.weight": {"density": 0.5, "scale": 2}})
    assert r.per_tensor == {"x.weight": {"density": 0.5, "scale": 2.0}}
    assert r.to_dict()["per_tensor"] == {"x.weight": {"density": 0.5, "scale": 2.0}}
    assert "per_tensor" not in make_recipe("ties", ["a"], "base").to_dict()  # other recipes unchanged
    with pytest.raises(RecipeError, match="sets granularity, which ties cannot vary by tensor"):
        make_recipe("ties", ["a"], "base", per_tensor={"x": {"granularity": "per_row"}})
    with pytest.raises(RecipeError, match=r"outside \(0, 1\]"):
        make_recipe("ties", ["a"], "base", per_tensor={"x": {"density": 1.5}})
    with pytest.raises(RecipeError, match="global ranks take one density"):
        make_recipe("ties", ["a"], "base", {"granularity": "global"}, per_tensor={"x": {"density": 0.5}})


def test_density_per_model():
    r = make_recipe("ties", ["a", "b"], "base", {"density": [0.5, 0.25]})
    assert r.parameters["density"] == [0.5, 0.25]
    with pytest.raises(RecipeError, match="has 1 values for 2 models"):
        make_recipe("ties", ["a", "b"], "base", {"density": [0.5]})
    with pytest.raises(RecipeError, match="global ranks take one density"):
        make_recipe("ties", ["a", "b"], "base", {"density": [0.5, 0.2], "granularity": "global"})


def test_slices_are_validated():
    r = make_recipe(
        "passthrough", ["a", "b"], slices=[{"model": 0, "layers": [0, 2]}, {"model": 1, "layers": [1, 3]}]
    )
    assert r.slices == ((0, 0, 2), (1, 1, 3))
    with pytest.raises(RecipeError, match="does not stack layers"):
        make_recipe("linear", ["a"], slices=[{"model": 0, "layers": [0, 2]}])
    with pytest.raises(RecipeError, match="is invalid"):
        make_recipe("passthrough", ["a"], slices=[{"model": 1, "layers": [0, 2]}])
    with pytest.raises(RecipeError, match="copies one model"):
        make_recipe("passthrough", ["a", "b"])


def test_per_tensor_names_must_exist(write_checkpoint, tmp_path):
    from surgery.plan import build_plan

    t = {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)}
    base, ft = write_checkpoint(tmp_path / "b", t), write_checkpoint(tmp_path / "f", t)
    recipe = make_recipe("task_arithmetic", [ft], base, per_tensor={"model.layers.9.nope": {"scale": 2}})
    with pytest.raises(PlanError, match="per_tensor names 'model.layers.9.nope'"):
        build_plan(recipe)
