"""Issue 10, item 2: a merge never writes inf / NaN that finite inputs did not hold, silently.

Zero-sum weights of a normalising method are a planning error; any other non-finite output (overflow in
float32, or in the cast to float16 / bfloat16) is an error naming the first such tensor in plan order,
unless ``--allow-nonfinite``. The counting kernel's twins agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_checks import assert_fails as assert_error
from cli_checks import snapshot as folder_bytes
from safetensors.torch import load_file

SHAPES = {"a.weight": (4, 8), "model.layers.0.w": (8, 8), "model.layers.1.w": (16, 8), "z.weight": (8,)}


@pytest.fixture
def overflowing(tmp_path, write_checkpoint):
    """Base zeros; two fine-tunes whose task vectors are 40000 in both blocks' tensors (their sum,
    80000, overflows float16) and small elsewhere."""
    base = write_checkpoint(tmp_path / "base", {n: torch.zeros(s) for n, s in SHAPES.items()})
    models = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        tensors = {n: 0.01 * torch.randn(s, generator=g) for n, s in SHAPES.items()}
        tensors["model.layers.0.w"][1, 2] = 40000.0
        tensors["model.layers.1.w"][3, 4] = 40000.0
        models.append(write_checkpoint(tmp_path / f"ft{i}", tensors))
    return base, models


@pytest.mark.parametrize("weights", ["0,0", "1,-1", "0.5,-0.5"])
def test_zero_sum_weights_are_refused(invoke, make_family, tmp_path, weights):
    base, (ft1, ft2) = make_family()
    before = folder_bytes(tmp_path)
    result = invoke("merge", ft1, ft2, "--linear", "--weights", weights, "-o", tmp_path / "out", "-q")
    assert_error(result, "the weights", "sum to 0", hint="give weights with a non-zero sum")
    assert folder_bytes(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_float16_overflow_names_first_tensor_in_plan_order(invoke, overflowing, tmp_path, threads):
    base, (ft1, ft2) = overflowing
    out = tmp_path / "out"
    args = [ft1, ft2, "--base", base, "--dtype", "float16", "-o", out, "-q", "--threads", threads]
    # the bigger tensor (layers.1) runs first; the error still names layers.0, first in plan order
    assert_error(
        invoke("merge", *args, "--max-memory", "64KiB"),
        "tensor 'model.layers.0.w' came out with 1 non-finite values (inf or NaN) although every input "
        "value was finite (and 1 more tensors)",
        hint="weights or scales that (nearly) cancel or blow up cause this",
    )
    assert not (out / "model.safetensors").exists()
    # not journaled: the same command fails again instead of finishing a broken checkpoint
    assert_error(invoke("merge", *args), "tensor 'model.layers.0.w' came out with")
    assert not (out / "model.safetensors").exists()
    # the escape hatch writes them (and resumes the partial run)
    result = invoke("merge", *args, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    merged = load_file(str(out / "model.safetensors"))
    assert torch.isinf(merged["model.layers.0.w"][1, 2]) and torch.isinf(merged["model.layers.1.w"][3, 4])
    assert int(torch.isinf(merged["model.layers.0.w"]).sum()) == 1


def test_float32_overflow_and_bfloat16(invoke, tmp_path, write_checkpoint):
    """3e38 + 3e38 overflows float32 itself; as bf16 output the same tensor is inf too."""
    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(6)})
    big = torch.tensor([0.0, 3e38, 0.0, 0.0, 0.0, 0.0])
    ft1 = write_checkpoint(tmp_path / "ft1", {"w": big})
    ft2 = write_checkpoint(tmp_path / "ft2", {"w": big})
    for dtype in ("float32", "bfloat16"):
        result = invoke("merge", ft1, ft2, "--base", base, "--dtype", dtype, "-o", tmp_path / dtype, "-q")
        assert_error(result, "tensor 'w' came out with 1 non-finite values")


def test_bfloat16_rounding_overflow(invoke, tmp_path, write_checkpoint):
    """float32 max is finite, but rounds up to inf in bfloat16: the cast is checked, not the f32 value."""
    f32_max = torch.tensor([torch.finfo(torch.float32).max, 1.0])
    base = write_checkpoint(tmp_path / "base", {"w": f32_max})
    ft = write_checkpoint(tmp_path / "ft", {"w": f32_max})
    assert_error(
        invoke("merge", ft, "--base", base, "--dtype", "bfloat16", "-o", tmp_path / "out", "-q"),
        "tensor 'w' came out with 1 non-finite values",
    )
    result = invoke("merge", ft, "--base", base, "-o", tmp_path / "f32", "-q")  # f32 output: finite
    assert result.exit_code == 0, result.output


def test_nonfinite_inputs_pass_through(invoke, tmp_path, write_checkpoint):
    """An input that already holds inf / NaN is not ours to refuse: the merge carries them."""
    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(4)})
    ft = write_checkpoint(tmp_path / "ft", {"w": torch.tensor([1.0, float("inf"), float("nan"), 2.0])})
    result = invoke("merge", ft, "--base", base, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    w = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert torch.isinf(w[1]) and torch.isnan(w[2]) and w[3] == 2.0


def test_dtype_cast_of_kept_base_tensor(invoke, tmp_path, write_checkpoint):
    """A tensor outside a graft's region is the base cast to the output dtype: checked too."""
    base = write_checkpoint(
        tmp_path / "base", {"model.layers.0.w": torch.zeros(8), "head": torch.full((4,), 1e5)}
    )
    ft = write_checkpoint(tmp_path / "ft", {"model.layers.0.w": torch.ones(8), "head": torch.full((4,), 1e5)})
    result = invoke("graft", base, ft, "--density", "0.5", "--dtype", "float16", "-o", tmp_path / "out", "-q")
    assert_error(result, "tensor 'head' came out with 4 non-finite values")


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_count_kernel_twins(dtype):
    from surgery.dtypes import DTYPES
    from surgery.kernels import get_backend

    rng = np.random.default_rng(0)
    width = np.dtype(f"u{DTYPES[dtype].itemsize}")
    bits = rng.integers(0, 2 ** (8 * width.itemsize), 5000, dtype=np.uint64).astype(width)
    float_view = {"BF16": None, "F16": np.float16, "F32": np.float32}[dtype]
    if float_view is None:  # bf16: the high half of a float32
        expect = int((~np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))).sum())
    else:
        expect = int((~np.isfinite(bits.view(float_view))).sum())
    assert expect > 0
    for device in ("cpu", "torch-cpu"):
        assert get_backend(device).nonfinite(bits, dtype) == expect


def test_torch_twin_backend_refuses_the_same(invoke, overflowing, tmp_path):
    """The check runs on the torch kernels too (what --device cuda uses; here on CPU tensors)."""
    base, (ft1, ft2) = overflowing
    result = invoke("merge", ft1, ft2, "--base", base, "--dtype", "float16", "--device", "torch-cpu",
                    "-o", tmp_path / "out", "-q")  # fmt: skip
    assert_error(result, "tensor 'model.layers.0.w' came out with 1 non-finite values")


def test_patch_values_count_as_inputs(invoke, tmp_path, write_checkpoint):
    """Applying a patch that itself holds inf: the inf is carried, not refused; a finite patch whose
    scaled values overflow float16 is refused."""
    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(4)})
    for name, value in (("inf", float("inf")), ("big", 60000.0)):
        write_checkpoint(tmp_path / name, {"w.indices": torch.tensor([2]), "w.values": torch.tensor([value])})
    ok = invoke("apply", tmp_path / "inf", "--to", base, "-o", tmp_path / "a", "-q")
    assert ok.exit_code == 0, ok.output
    assert torch.isinf(load_file(str(tmp_path / "a" / "model.safetensors"))["w"][2])
    bad = invoke(
        "apply",
        tmp_path / "big",
        "--to",
        base,
        "--scale",
        "2",
        "--dtype",
        "float16",
        "-o",
        tmp_path / "b",
        "-q",
    )
    assert_error(bad, "tensor 'w' came out with 1 non-finite values")
