"""benchmarks/: the --blocks slice of make_synthetic and bench_spectral's extrapolation."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import bench_spectral  # noqa: E402
import make_synthetic  # noqa: E402


def test_slice_is_the_first_blocks_of_the_full_model(tmp_path):
    for args, out in ((["--shape", "tiny"], "full"), (["--shape", "tiny", "--blocks", "1"], "slice")):
        make_synthetic.main([*args, "--out", str(tmp_path / out), "--finetunes", "1", "--no-fsync"])
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                out |= load_file(os.path.join(folder, f))
        return out

    for model in ("base", "ft1"):
        full, part = tensors(tmp_path / "full" / model), tensors(tmp_path / "slice" / model)
        assert not any(".layers.1." in k for k in part)
        assert set(part) == {k for k in full if ".layers.1." not in k}
        for k, v in part.items():
            assert v.dtype == torch.bfloat16 and torch.equal(
                v.view(torch.int16), full[k].view(torch.int16)
            ), k
    cfg = json.loads((tmp_path / "slice" / "base" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 64
    # the shapes without --blocks keep their parameters (so existing data stays "complete")
    params = json.loads((tmp_path / "full" / "synthetic.json").read_text())["params"]
    assert "blocks" not in params
    assert json.loads((tmp_path / "slice" / "synthetic.json").read_text())["params"]["blocks"] == 1


def test_extrapolation_formula():
    slice_bytes = 10**9
    cmd = "surgery merge a b --wudi --wudi-steps 4 -o x"
    rows = [
        {"method": "task_arithmetic", "ok": True, "wall_s": 10.0, "user_s": 6.0, "sys_s": 2.0, "cmd": ""},
        {"method": "iso_c", "ok": True, "wall_s": 38.0, "user_s": 20.0, "sys_s": 2.0, "cmd": ""},
        {"method": "wudi", "ok": True, "wall_s": 50.0, "user_s": 30.0, "sys_s": 2.0, "cmd": cmd},
        {"method": "tsv_merge", "ok": False},
    ]
    bench_spectral.extrapolate(rows, n_matrices=14, blocks=2, slice_bytes=slice_bytes)
    full_bytes = sum(s.nbytes for s in make_synthetic.tensor_specs(make_synthetic.SHAPES["1b"]))
    ratio = full_bytes / slice_bytes
    ta, iso, wudi, failed = rows
    assert iso["cpu_extra_per_matrix_s"] == pytest.approx((22 - 8) / 14)
    assert iso["cpu_full_1b_s_est"] == pytest.approx(8 * ratio + (22 - 8) * 16 / 2)
    assert iso["wall_full_1b_s_est"] == pytest.approx(10 * ratio + 28 * 8)
    assert wudi["wudi_steps"] == 4 and wudi["cpu_per_step_s"] == pytest.approx((32 - 8) / 4)
    assert wudi["cpu_full_1b_s_est"] == pytest.approx(8 * ratio + (32 - 8) / 4 * 300 * 8)
    assert ta["cpu_extra_per_matrix_s"] == 0 and "cpu_s" not in failed
