"""benchmarks/: the mk-* methods of bench_merge.py (one mergekit YAML through `surgery run` and
`mergekit-yaml`). mergekit is no test dependency: the suite runs the surgery side only."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import bench_merge  # noqa: E402
import make_synthetic  # noqa: E402
import mergekit_configs  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "tiny"
    make_synthetic.main(["--shape", "tiny", "--out", str(root), "--finetunes", "2", "--no-fsync"])
    return root


@pytest.mark.parametrize("method", mergekit_configs.METHODS)
def test_each_config_runs_through_surgery(tiny, invoke, tmp_path, method):
    text = mergekit_configs.mergekit_config(method, str(tiny / "base"), [str(tiny / "ft1"), str(tiny / "ft2")],
                                            "float32")  # fmt: skip
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(text)
    assert yaml.safe_load(text)["out_dtype"] == "bfloat16"
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == (3 if method == "mk-passthrough" else 2)  # tiny: 2 blocks


def test_stack_ranges_of_the_1b_shape():
    assert mergekit_configs.stack_ranges(16) == ((0, 12), (4, 16))
    assert mergekit_configs.stack_ranges(2) == ((0, 1), (0, 2))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown mergekit benchmark method"):
        mergekit_configs.mergekit_config("mk-nope", "b", ["a", "c"], None)


@pytest.mark.slow
def test_bench_rows_end_to_end(tiny, tmp_path):
    """The bench itself at --shape tiny, surgery side (the integrator adds mergekit on the 1B shape)."""
    data = tiny.parent
    out = tmp_path / "res.json"
    bench_merge.main(["--shape", "tiny", "--data", str(data), "--parts", "surgery", "--methods",
                      "mk-ties,mk-slerp-filters,mk-passthrough", "--surgery", f"{sys.executable} -m surgery_cli.main",
                      "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["mk-ties", "mk-slerp-filters", "mk-passthrough"]
    assert all(r["ok"] and r["tool"] == "surgery" and r["peak_rss_gib"] > 0 for r in rows), rows
