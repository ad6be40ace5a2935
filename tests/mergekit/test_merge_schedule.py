"""`surgery merge` per-layer values: gradients (--scale 0.2:1.0) and --filter overrides, evaluated with the
same rule as a mergekit config."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.mergekit.test_run_mergekit import check, family, gradient, position, states_of  # noqa: F401
from tests.test_e2e_transformers import load_state


def test_scale_gradient_and_filter(family, invoke, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = invoke("merge", family["ft1"], family["ft2"], "--base", family["base"], "--scale", "0.2:1.0",
                    "--filter", "self_attn:scale=0.5", "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def expect(n, _):
        scale = 0.5 if "self_attn" in n else gradient([0.2, 1.0], position(n))
        return b[n] + torch.tensor(scale, dtype=torch.float32) * ((f1[n] - b[n]) + (f2[n] - b[n]))

    check(out, expect)
    recipe = yaml.safe_load((out / "surgery_recipe.yaml").read_text())
    assert recipe["per_tensor"]["model.layers.3.mlp.up_proj.weight"] == {"scale": 1.0}
    assert recipe["per_tensor"]["model.layers.2.self_attn.q_proj.weight"] == {"scale": 0.5}


def test_density_gradient_lands_in_per_tensor(family, invoke, tmp_path):  # noqa: F811
    result = invoke("merge", family["ft1"], "--base", family["base"], "--ties", "--density", "0.2:0.6",
                    "-o", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["per_tensor"]["model.layers.0.mlp.up_proj.weight"]["density"] == pytest.approx(0.2)
    assert recipe["per_tensor"]["model.layers.3.mlp.up_proj.weight"]["density"] == pytest.approx(0.6)
    assert recipe["parameters"]["density"] == 0.2  # the method's default: tensors outside take t = 0 -> 0.2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--filter", "self_attn=0.5"], "is not NAME_PART:PARAM=VALUE"),
        (["--filter", "mlp:seed=3"], "is not NAME_PART:PARAM=VALUE"),
        (["--scale", "0.2:x"], "is not a number or a gradient"),
    ],
)
def test_bad_schedules(family, invoke, tmp_path, args, message):  # noqa: F811
    result = invoke("merge", family["ft1"], "--base", family["base"], *args, "-o", tmp_path / "out", "-q")
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_weights_gradient_per_model(family, invoke, tmp_path):  # noqa: F811
    """--weights 0.2:1.0,1.0:0.2: model 1's weight rises over the blocks, model 2's falls; a --filter
    gives its own per-model weights (first match wins)."""
    out = tmp_path / "out"
    result = invoke("merge", family["ft1"], family["ft2"], "--base", family["base"], "--weights",
                    "0.2:1.0,1.0:0.2", "--filter", "mlp:weights=0.5,0:1", "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def expect(n, _):
        t = position(n)
        w = [0.5, gradient([0, 1], t)] if "mlp" in n else [gradient([0.2, 1.0], t), gradient([1.0, 0.2], t)]
        w = [torch.tensor(x, dtype=torch.float32) for x in w]
        return b[n] + (w[0] * (f1[n] - b[n]) + w[1] * (f2[n] - b[n]))

    check(out, expect)
    recipe = yaml.safe_load((out / "surgery_recipe.yaml").read_text())
    assert recipe["per_tensor"]["model.layers.3.self_attn.q_proj.weight"]["weights"] == pytest.approx(
        [1.0, 0.2]
    )
    assert recipe["per_tensor"]["model.layers.2.mlp.up_proj.weight"]["weights"] == pytest.approx([0.5, 2 / 3])
    again = invoke("run", out / "surgery_recipe.yaml", "-o", tmp_path / "again", "-q")
    assert again.exit_code == 0, again.output
    small = invoke("run", out / "surgery_recipe.yaml", "-o", tmp_path / "small", "-q", "--max-memory", "4KiB")
    assert small.exit_code == 0, small.output
    a = load_state(out)
    for other in (load_state(tmp_path / "again"), load_state(tmp_path / "small")):
        assert all(torch.equal(a[n], other[n]) for n in a)


def test_uniform_weights_stay_a_recipe_parameter(family, invoke, tmp_path):  # noqa: F811
    result = invoke("merge", family["ft1"], family["ft2"], "--base", family["base"], "--weights", "0.3,0.7",
                    "--scale", "0.5:1", "-o", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["parameters"]["weights"] == [0.3, 0.7]
    assert all("weights" not in v for v in recipe["per_tensor"].values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "0.2:x,1"], "each weight is a number or a gradient"),
        (["--weights", "1,,2"], "has an empty entry"),
        (["--weights", "1:0"], "has 1 values for 2 models"),
        (["--weights", "1,1", "--filter", "mlp:weights=1"], "one weight per model"),
    ],
)
def test_bad_weights(family, invoke, tmp_path, args, message):  # noqa: F811
    result = invoke("merge", family["ft1"], family["ft2"], "--base", family["base"], *args, "-o",
                    tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and "hint:" in result.output
    assert not (tmp_path / "out").exists()
