"""The per-matrix methods and RegMean run by the engine: streamed output == the whole-tensor reference,
the key policy and parameters recorded in the recipe, the memory-budget error, CLI flags, and outputs
that load in transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
import yaml
from ckpt_factory import load_f32, make_family, round_to

from surgery.engine import EngineOptions, merge
from surgery.errors import RecipeError
from surgery.methods.cart import cart_merge
from surgery.methods.iso import iso_c, iso_cts
from surgery.methods.per_matrix import KEY_POLICY, merge_tensor
from surgery.methods.regmean import regmean_solve
from surgery.methods.star import star_merge
from surgery.methods.tsv import tsv_merge
from surgery.methods.wudi import wudi_merge
from surgery.recipe import make_recipe

# method -> (pure function, recipe parameters, keyword arguments of the function)
CASES = {
    "tsv_merge": (tsv_merge, {"scale": 0.8}, {"scale": 0.8}),
    "iso_c": (iso_c, {"scale": 1.5}, {"scale": 1.5}),
    "iso_cts": (iso_cts, {}, {"scale": 1.0}),
    "cart": (cart_merge, {"scale": 1.5, "rho": 0.25}, {"scale": 1.5, "rho": 0.25, "mean_scale": 1.0}),
    "star": (star_merge, {"eta": 0.6}, {"scale": 1.0, "eta": 0.6}),
    "wudi": (wudi_merge, {"wudi_steps": 40, "wudi_lr": 1e-4}, {"scale": 1.0, "steps": 40, "lr": 1e-4}),
}
# A small budget: embeddings and the head (mean policy) stream in several chunks, block matrices whole.
SMALL = EngineOptions(max_memory=48_000, threads=2)
ROOMY = EngineOptions(max_memory=2**20, threads=2)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("method", list(CASES))
def test_streamed_equals_the_whole_tensor_reference(tmp_path, method, dtype):
    fn, params, kwargs = CASES[method]
    base, fts = make_family(tmp_path / "in", n_models=3, dtype=dtype, update=0.1)
    merge(make_recipe(method, [str(f) for f in fts], str(base), params), tmp_path / "out", SMALL)
    got = load_f32(tmp_path / "out")
    b = load_f32(base)
    models = [load_f32(f) for f in fts]
    for name, value in b.items():
        if value.dtype.kind != "f":
            np.testing.assert_array_equal(got[name], value)
            continue
        taus = np.stack([m[name] - value for m in models])
        want = merge_tensor(fn, name, value, taus, **kwargs)
        np.testing.assert_array_equal(got[name], round_to(want, dtype).float().numpy(), err_msg=name)
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == method
    assert "per matrix" in recipe["parameters"]["key_policy"]


def test_block_matrices_are_factored_and_the_rest_averaged(tmp_path):
    base, fts = make_family(tmp_path / "in", n_models=2, update=0.1)
    merge(make_recipe("iso_c", [str(f) for f in fts], str(base)), tmp_path / "out", SMALL)
    got, b = load_f32(tmp_path / "out"), load_f32(base)
    models = [load_f32(f) for f in fts]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        mean = b[name] + (models[0][name] - b[name] + models[1][name] - b[name]) / 2
        np.testing.assert_allclose(got[name], mean, atol=1e-6)
    q = "model.layers.1.self_attn.q_proj.weight"
    s = np.linalg.svd((got[q] - b[q]).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s.mean(), rtol=1e-4)  # Iso-C: a flat spectrum


def test_a_matrix_over_the_budget_is_an_error_naming_the_need(tmp_path):
    base, fts = make_family(tmp_path / "in", n_models=2)
    recipe = make_recipe("tsv_merge", [str(f) for f in fts], str(base))
    with pytest.raises(RecipeError, match="needs its whole matrix") as err:
        merge(recipe, tmp_path / "out", EngineOptions(max_memory=4000, threads=1))
    assert "--max-memory" in err.value.hint
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_parameters_are_checked():
    for method, params in [("cart", {"rho": 0.0}), ("star", {"eta": 1.5}), ("wudi", {"wudi_lr": 0}),
                           ("tsv_merge", {"key_policy": "all"}), ("tsv_merge", {"density": 0.5})]:  # fmt: skip
        with pytest.raises(RecipeError):
            make_recipe(method, ["a", "b"], "base", params)
    assert make_recipe("tsv_merge", ["a"], "base").parameters["key_policy"] == KEY_POLICY


def test_cli_flags_reach_the_recipe(invoke, make_family, tmp_path):
    base, (ft1, ft2) = make_family()
    out = tmp_path / "out"
    r = invoke("merge", ft1, ft2, "--base", base, "--cart", "--rho", "0.5", "--scale", "1.5", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    params = yaml.safe_load((out / "surgery_recipe.yaml").read_text())["parameters"]
    assert params["rho"] == 0.5 and params["scale"] == 1.5
    r = invoke("merge", ft1, ft2, "--base", base, "--wudi", "--wudi-steps", "5", "-o", tmp_path / "w", "-q")
    assert (
        r.exit_code == 0
        and yaml.safe_load((tmp_path / "w" / "surgery_recipe.yaml").read_text())["parameters"]["wudi_steps"]
        == 5
    )
    r = invoke("merge", ft1, ft2, "--regmean", "-o", tmp_path / "r", "-q")
    assert r.exit_code == 1 and "error: " in r.stderr and "--calibration FILE once per model" in r.stderr
    calib = tmp_path / "c.txt"
    calib.write_text("w1 w2\n")
    r = invoke("merge", ft1, ft2, "--regmean", "--calibration", calib, "-o", tmp_path / "r", "-q")
    assert r.exit_code == 1 and "1 files for 2 models" in r.stderr
    assert not (tmp_path / "r").exists()


# -- transformers models -------------------------------------------------------------------------


def _tiny_family(root, n=2):
    from test_regmean import TEXTS, config, save_tokenizer

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config("llama")).eval()
    base.save_pretrained(root / "base")
    save_tokenizer(root / "base", 64)
    out = []
    for i in range(n):
        ft = transformers.AutoModelForCausalLM.from_config(config("llama"))
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(root / f"ft{i}", max_shard_size="40KB")
        save_tokenizer(root / f"ft{i}", 64)
        data = root / f"calib{i}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[i]))
        out.append((root / f"ft{i}", data))
    return root / "base", out


def test_spectral_merge_of_a_transformers_model_loads_and_runs(tmp_path):
    base, fts = _tiny_family(tmp_path)
    out = tmp_path / "tsv"
    merge(make_recipe("tsv_merge", [str(p) for p, _ in fts], str(base)), out, ROOMY)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    ref = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    taus = torch.stack([transformers.AutoModelForCausalLM.from_pretrained(p).state_dict()[name] - ref[name]
                        for p, _ in fts])  # fmt: skip
    np.testing.assert_array_equal(model.state_dict()[name].numpy(), tsv_merge(ref[name], taus).numpy())


def test_regmean_through_the_engine_matches_in_memory_regmean(tmp_path, monkeypatch):
    from test_regmean import TEXTS, reference_grams, reference_regmean

    monkeypatch.setenv("SURGERY_GRAM_CACHE", str(tmp_path / "cache"))
    _, fts = _tiny_family(tmp_path)
    recipe = make_recipe("regmean", [str(p) for p, _ in fts], None, {"calibration": [str(d) for _, d in fts]})
    assert recipe.parameters["regmean_alpha"] == 0.9
    out = tmp_path / "regmean"
    merge(recipe, out, ROOMY)
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    models = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p, _ in fts]
    grams = [reference_grams(p, TEXTS[i]) for i, (p, _) in enumerate(fts)]
    for name, value in got.items():
        if name in grams[0]:
            want = reference_regmean(
                [m[name].double().numpy() for m in models], [g[name] for g in grams], 0.9
            )
            np.testing.assert_allclose(value.numpy(), want, atol=2e-5, err_msg=name)
        else:  # norms, embeddings, head: mean of the fine-tunes
            np.testing.assert_allclose(
                value.numpy(), (models[0][name] + models[1][name]).numpy() / 2, atol=1e-6
            )
    # a second merge with another alpha reuses the cached Grams (no forward pass)
    import surgery.calibration as calibration

    monkeypatch.setattr(calibration, "_gram_pass", lambda *a: pytest.fail("calibration pass not cached"))
    recipe = make_recipe("regmean", [str(p) for p, _ in fts], None,
                         {"calibration": [str(d) for _, d in fts], "regmean_alpha": 0.5})  # fmt: skip
    merge(recipe, tmp_path / "regmean05", ROOMY)
    name = "model.layers.0.self_attn.o_proj.weight"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "regmean05").state_dict()[name]
    want = regmean_solve(torch.stack([m[name] for m in models]),
                         torch.stack([torch.from_numpy(g[name]) for g in grams]), alpha=0.5)  # fmt: skip
    np.testing.assert_allclose(again.numpy(), want.numpy(), atol=2e-5)


def test_a_missing_torch_is_a_clear_error_before_any_output(invoke, make_family, tmp_path, monkeypatch):
    import importlib.util

    base, (ft1, ft2) = make_family()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    r = invoke("merge", ft1, ft2, "--base", base, "--iso-c", "-o", tmp_path / "out", "-q")
    assert r.exit_code == 1 and "needs torch" in r.stderr and "model-surgery[torch]" in r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
