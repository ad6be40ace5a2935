"""mergekit options that change results, run as mergekit computes them: ``linear`` with ``normalize:
false``, ``model_stock`` with ``filter_wise``, ``passthrough`` with ``scale``, mergekit's rank counts for
TIES / Breadcrumbs. Tiny Llama models, against mergekit's math re-derived in ``tests/mergekit_math.py``
(float32 inputs: 1e-5 relative); streamed in tiny chunks == one chunk; the recipe reproduces the bytes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from mergekit_math import magnitude_outliers_ref, magnitude_ref, model_stock_ref

from tests.mergekit.test_run_mergekit import family, gradient, position, states_of, write_config  # noqa: F401
from tests.mergekit.test_run_mergekit_spherical import check, np32
from tests.test_e2e_transformers import load_state


def run(invoke, tmp_path, data, out="out", *extra) -> dict[str, torch.Tensor]:
    result = invoke("run", write_config(tmp_path, data), "-o", tmp_path / out, "-q", *extra)
    assert result.exit_code == 0, result.output
    return load_state(tmp_path / out)


def recipe_of(tmp_path, out="out") -> dict:
    return yaml.safe_load((tmp_path / out / "surgery_recipe.yaml").read_text())


def same_streamed_and_reproduced(invoke, tmp_path, data, got) -> None:
    """Tiny chunks on 3 threads, and the recipe written beside the output: the same bytes."""
    small = run(invoke, tmp_path, data, "small", "--max-memory", "4KiB", "--threads", "3")
    again = invoke("run", tmp_path / "out" / "surgery_recipe.yaml", "-o", tmp_path / "again", "-q")
    assert again.exit_code == 0, again.output
    for other in (small, load_state(tmp_path / "again")):
        assert set(other) == set(got) and all(torch.equal(got[n], other[n]) for n in got)


def test_linear_without_normalize_sums_the_weighted_models(family, invoke, tmp_path):  # noqa: F811
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(family["ft2"]), "parameters": {"weight": [0.1, 0.6]}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    f1, f2 = (np32(s) for s in states_of(family, "ft1", "ft2"))
    check(got, lambda n: 0.7 * f1[n] + gradient([0.1, 0.6], position(n)) * f2[n])
    assert recipe_of(tmp_path)["parameters"]["normalize"] is False
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_linear_without_normalize_accepts_weights_summing_to_zero(family, invoke, tmp_path):  # noqa: F811
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0}},
            {"model": str(family["base"]), "parameters": {"weight": -1.0}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1 = (np32(s) for s in states_of(family, "base", "ft1"))
    check(got, lambda n: f1[n] - b[n])


@pytest.mark.parametrize("filter_wise", [True, False])
def test_model_stock_filter_wise_takes_one_ratio_per_row(family, invoke, tmp_path, filter_wise):  # noqa: F811
    data = {
        "merge_method": "model_stock",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k])} for k in ("ft1", "ft2", "ft3")],
        "parameters": {"filter_wise": filter_wise},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, *fs = (np32(s) for s in states_of(family, "base", "ft1", "ft2", "ft3"))
    check(got, lambda n: model_stock_ref(b[n], [f[n] for f in fs], filter_wise))
    if filter_wise:  # per row really differs from per tensor on a matrix
        q = "model.layers.1.self_attn.q_proj.weight"
        whole = model_stock_ref(b[q], [f[q] for f in fs], False)
        assert not np.allclose(got[q].numpy(), whole, rtol=1e-4)
        assert recipe_of(tmp_path)["parameters"]["filter_wise"] is True
        same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_passthrough_scale_with_filters_on_a_stack(family, invoke, tmp_path):  # noqa: F811
    """The usual 'scale o_proj / down_proj by 0' trick on duplicated layers, and a gradient elsewhere."""
    slices = [
        {"sources": [{"model": str(family["ft1"]), "layer_range": [0, 3]}]},
        {
            "sources": [{"model": str(family["ft2"]), "layer_range": [1, 4]}],
            "parameters": {
                "scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}]
            },
        },
    ]
    data = {
        "merge_method": "passthrough",
        "slices": slices,
        "parameters": {"scale": [{"filter": "up_proj", "value": [0.5, 1.5]}]},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    f1, f2 = (np32(s) for s in states_of(family, "ft1", "ft2"))

    def want(name):
        block = int(name.split(".")[2]) if ".layers." in name else None
        if block is None:
            src = f2 if name in ("model.norm.weight", "lm_head.weight") else f1
            return src[name]
        model, src_block, t = (f1, block, block / 2) if block < 3 else (f2, block - 2, (block - 3) / 2)
        value = model[name.replace(f"layers.{block}.", f"layers.{src_block}.")]
        if block >= 3 and ("o_proj" in name or "down_proj" in name):
            return 0.0 * value
        if "up_proj" in name:
            return np.float32(gradient([0.5, 1.5], t)) * value
        return value

    check(got, want)
    assert not got["model.layers.4.self_attn.o_proj.weight"].any()
    assert got["model.layers.1.self_attn.o_proj.weight"].any()
    recipe = recipe_of(tmp_path)
    assert recipe["per_tensor"]["model.layers.5.mlp.down_proj.weight"] == {"scale": 0.0}
    assert "model.layers.1.mlp.down_proj.weight" not in recipe["per_tensor"]
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_ties_keeps_at_least_one_entry_as_mergekit(family, invoke, tmp_path):  # noqa: F811
    """mergekit keeps max(1, int(density n)): a density below 1/n keeps one entry, ours none."""
    data = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
        "parameters": {"density": 0.01},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1, f2 = (np32(s) for s in states_of(family, "base", "ft1", "ft2"))

    def want(n):
        tau = np.stack([magnitude_ref(f[n] - b[n], 0.01).astype(np.float64) for f in (f1, f2)])
        sign = np.where(tau.sum(0) >= 0, 1, -1)
        keep = np.sign(tau) == sign
        den = keep.sum(0)
        return b[n] + (tau * keep).sum(0) / np.where(den == 0, 1, den)

    check(got, want)
    norm = got["model.layers.0.input_layernorm.weight"] - torch.from_numpy(
        b["model.layers.0.input_layernorm.weight"]
    )
    assert 1 <= int((norm != 0).sum()) <= 2  # 32 entries, density 0.01: one per model
    assert recipe_of(tmp_path)["parameters"]["rank_counts"] == "mergekit"
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_breadcrumbs_cuts_the_outliers_back_to_keep_the_density(family, invoke, tmp_path):  # noqa: F811
    """density 0.9 + gamma 0.2 > 1: mergekit keeps int(0.9 n) entries, dropping fewer outliers."""
    data = {
        "merge_method": "breadcrumbs",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 0.8}}],
        "parameters": {"density": 0.9, "gamma": 0.2},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1 = (np32(s) for s in states_of(family, "base", "ft1"))
    check(got, lambda n: b[n] + 0.8 * magnitude_outliers_ref((f1[n] - b[n]).astype(np.float64), 0.9, 0.2))
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_mergekit_counts_round_in_floats():
    from surgery.ranks import band_ranks, mergekit_band, rank_count

    assert rank_count(0.29, 100) == 29 and int(0.29 * 100) == 28
    assert mergekit_band(0.29, 0.0, 100, top_k=True) == (0, 28)
    assert band_ranks({"density": 0.29, "rank_counts": "mergekit"}, 100) == (0, 28)
    assert band_ranks({"density": 0.29}, 100) == (0, 29)
    assert mergekit_band(0.001, 0.0, 100, top_k=True) == (0, 1)
    assert mergekit_band(0.001, 0.0, 100, top_k=False) == (0, 0)  # magnitude_outliers: none kept
    assert mergekit_band(0.5, 0.1, 100, top_k=False) == (10, 60)
    assert mergekit_band(0.9, 0.2, 100, top_k=False) == (10, 100)
    assert mergekit_band(1.0, 0.2, 100, top_k=False) == (0, 100)


def test_slerp_of_slices_at_other_layer_indices(family, invoke, tmp_path):  # noqa: F811
    """slerp of base blocks 0-2 with ft1 blocks 1-3, then base block 1 with ft1 block 3: the output's
    blocks read other blocks of each input, t runs over each slice's own positions."""
    from tests.mergekit.test_run_mergekit import mk_slerp

    base, ft1 = str(family["base"]), str(family["ft1"])
    data = {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}, {"model": ft1, "layer_range": [1, 4]}]},
            {
                "sources": [{"model": ft1, "layer_range": [3, 4]}, {"model": base, "layer_range": [1, 2]}],
                "parameters": {"t": 0.9},
            },
        ],
        "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.7]}, {"value": 0.4}]},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1 = states_of(family, "base", "ft1")

    def want(name):
        if ".layers." not in name:  # embeddings: the first slice's values; norm, head: the last's
            return mk_slerp(0.4 if "embed" in name else 0.9, b[name], f1[name]).numpy()
        block = int(name.split(".")[2])
        if block < 3:
            src_b, src_f, t = block, block + 1, block / 2
            t = gradient([0.1, 0.7], t) if "mlp" in name else 0.4
        else:
            src_b, src_f, t = 1, 3, 0.9
        return mk_slerp(t, b[renamed(name, src_b)], f1[renamed(name, src_f)]).numpy()

    check(got, want)
    config = yaml.safe_load((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(got) == len(b)
    recipe = recipe_of(tmp_path)
    assert recipe["layer_slices"] == [{"ranges": [[0, 3], [1, 4]]}, {"ranges": [[1, 2], [3, 4]]}]
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_ties_of_a_shorter_slice_writes_fewer_layers(family, invoke, tmp_path):  # noqa: F811
    """A slice over blocks 2-3 of every model: a two-block model, block 0 merged from blocks 2."""
    from tests.mergekit.test_run_mergekit import gta, magnitude

    paths = [str(family[k]) for k in ("base", "ft1", "ft2")]
    data = {
        "merge_method": "ties",
        "base_model": paths[0],
        "slices": [{"sources": [{"model": p, "layer_range": [2, 4]} for p in paths]}],
        "parameters": {"weight": 0.6, "density": 0.5},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def want(name):
        src = renamed(name, int(name.split(".")[2]) + 2) if ".layers." in name else name
        trim = lambda d, _: magnitude(d, 0.5)  # noqa: E731
        return gta(b[src], [f1[src], f2[src]], [0.6, 0.6], sparsify=trim, consensus=True, normalize=True)

    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want(name), rtol=1e-5, atol=1e-7, msg=name)
    assert max(int(n.split(".")[2]) for n in got if ".layers." in n) == 1
    model = pytest.importorskip("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 2
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_slices_of_different_models(family, invoke, tmp_path):  # noqa: F811
    """slerp(base, ft1) for blocks 0-1, then slerp(base, ft2) of blocks 0-1 again as blocks 2-3: the
    second slice's models are opened as extra inputs; embeddings from the first slice's models, final
    norm and head from the last's (mergekit's rule)."""
    from tests.mergekit.test_run_mergekit import mk_slerp

    base = str(family["base"])
    data = {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": str(family[k]), "layer_range": [0, 2]},
                ]
            }
            for k in ("ft1", "ft2")
        ],
        "parameters": {"t": [0.2, 0.6]},
        "dtype": "float32",
    }
    got = run(invoke, tmp_path, data)
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def want(name):
        if ".layers." not in name:
            other = f1 if "embed" in name else f2
            return mk_slerp(0.2, b[name], other[name]).numpy()
        block = int(name.split(".")[2])
        other, src = (f1, block) if block < 2 else (f2, block - 2)
        src_name = renamed(name, src)
        return mk_slerp(gradient([0.2, 0.6], src), b[src_name], other[src_name]).numpy()

    check(got, want)
    recipe = recipe_of(tmp_path)
    assert recipe["models"] == [str(family["ft1"])]
    assert recipe["layer_slices"][1] == {"ranges": [[0, 2], [0, 2]], "inputs": [base, str(family["ft2"])]}
    same_streamed_and_reproduced(invoke, tmp_path, data, got)


def test_slices_of_different_model_counts_are_refused_by_name(family, invoke, tmp_path):  # noqa: F811
    base = str(family["base"])
    data = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": str(family["ft1"]), "layer_range": [0, 2]},
                ]
            },
            {"sources": [{"model": base, "layer_range": [2, 4]}]},
        ],
        "parameters": {"weight": 1.0},
    }
    result = invoke("run", write_config(tmp_path, data), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "slices that merge different numbers of models" in result.stderr, (
        result.output
    )
    assert "hint:" in result.stderr and not (tmp_path / "out").exists()


def renamed(name: str, block: int) -> str:
    return re.sub(r"layers\.\d+\.", f"layers.{block}.", name)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("model_stock", {"filter_wise": True}), ("ties", {"weight": 0.5, "density": 0.3})],
)
def test_torch_backend_on_slices_and_per_row_stock(family, invoke, tmp_path, method, parameters):  # noqa: F811
    """The torch backend (CPU tensors here; the device-resident path where the stages allow it) on
    layer slices with a model per slice and on filter_wise (host numpy): the numba run's numbers."""
    base = str(family["base"])
    fts = ("ft1", "ft2", "ft3")
    per_slice = [("ft1", "ft2"), ("ft2", "ft3")] if method == "model_stock" else [("ft1",), ("ft3",)]
    data = {
        "merge_method": method,
        "base_model": base,
        "slices": [
            {
                "sources": [{"model": base, "layer_range": [2 * i, 2 * i + 2]}]
                + [{"model": str(family[k]), "layer_range": [2 - 2 * i, 4 - 2 * i]} for k in models]
            }
            for i, models in enumerate(per_slice)
        ],
        "parameters": parameters,
        "dtype": "float32",
    }
    assert set(fts) >= {k for models in per_slice for k in models}
    cpu = run(invoke, tmp_path, data)
    dev = run(invoke, tmp_path, data, "dev", "--device", "torch-cpu", "--max-memory", "4KiB")
    for name, tensor in cpu.items():
        torch.testing.assert_close(dev[name], tensor, rtol=1e-6, atol=1e-8, msg=name)
