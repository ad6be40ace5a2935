"""A surgery recipe's ``layer_slices:`` written by hand (what mergekit's ``slices:`` of a merge become):
the same numbers as a merge of renamed tensors, and refusals with error + hint, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tests.mergekit.test_run_mergekit import family, states_of  # noqa: F401 (fixture)
from tests.test_e2e_transformers import load_state


def write_recipe(tmp_path, family, **extra):  # noqa: F811
    data = {
        "method": "task_arithmetic",
        "base": str(family["base"]),
        "models": [str(family["ft1"])],
        "parameters": {"scale": 0.5},
        **extra,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_task_arithmetic_of_shifted_blocks(family, invoke, tmp_path):  # noqa: F811
    """Output block j = base block j + 0.5 * (ft1 block j+2 - base block j), for two output blocks."""
    recipe = write_recipe(tmp_path, family, layer_slices=[{"ranges": [[0, 2], [2, 4]]}])
    result = invoke("run", recipe, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1 = states_of(family, "base", "ft1")
    got = load_state(tmp_path / "out")
    for name, tensor in got.items():
        m = re.search(r"layers\.(\d+)\.", name)
        src = name if m is None else name.replace(m.group(0), f"layers.{int(m.group(1)) + 2}.")
        want = b[name] + torch.tensor(0.5) * (f1[src] - b[name])
        assert torch.equal(tensor, want), name
    assert max(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in got if "layers." in n) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"layer_slices": [{"ranges": [[0, 2]]}]}, "has 1 ranges for 2 inputs"),
        ({"layer_slices": [{"ranges": [[0, 2], [1, 4]]}]}, "all of one length"),
        ({"layer_slices": [{"ranges": [[0, 2], [3, 5]]}]}, r"layers \[3, 5\) but .* has 4 blocks"),
        ({"layer_slices": [{"ranges": [[0, 2], [0, 2]], "inputs": ["x"]}]}, "has 1 inputs for 2 inputs"),
        ({"layer_slices": [{"layers": [0, 2]}]}, "must be {ranges:"),
        ({"layer_slices": [{"ranges": [[0, 2], [0, 2]]}], "lines": {"alpha": 0.5}}, "LiNeS depths and"),
    ],
)
def test_bad_layer_slices_are_refused(family, invoke, tmp_path, extra, message):  # noqa: F811
    result = invoke("run", write_recipe(tmp_path, family, **extra), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1, result.output
    assert re.search(message, result.stderr), result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_passthrough_takes_slices_not_layer_slices(family, invoke, tmp_path):  # noqa: F811
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({"method": "passthrough", "models": [str(family["ft1"])],
                                    "layer_slices": [{"ranges": [[0, 2]]}]}))  # fmt: skip
    result = invoke("run", path, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "does not merge layer slices" in result.stderr, result.output
