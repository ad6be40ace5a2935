"""mergekit ``model+lora`` references: the adapter applied to its model first, in every position
(models:, base_model:, slices' sources). Real peft adapters on tiny Llama models; the reference is the
same config run on peft's ``merge_and_unload()`` of each adapter over its model (float32, 1e-6)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tests.mergekit.test_run_mergekit import write_config
from tests.test_e2e_transformers import load_state

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

from tests.adapters.peft_factory import llama, make_adapter, merged_reference, save_base  # noqa: E402


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """base B; a full fine-tune F of B; adapter L1 trained on B, adapter L2 trained on F; and
    peft's merged models B+L1, F+L2 saved as plain checkpoints."""
    import transformers

    root = tmp_path_factory.mktemp("lora")
    base = save_base(llama(), root / "base")
    ft = llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_base(ft, root / "ft")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    l1 = make_adapter(llama(), root / "l1", config, seed=1)
    l2 = make_adapter(transformers.LlamaForCausalLM.from_pretrained(root / "ft"), root / "l2", config, seed=2)
    paths = {"base": base, "ft": root / "ft", "l1": l1, "l2": l2}
    for name, (model, adapter) in {"m1": ("base", l1), "m2": ("ft", l2)}.items():
        state = merged_reference(transformers.LlamaForCausalLM, paths[model], adapter)
        merged = llama()
        merged.load_state_dict(state, strict=False)
        paths[name] = save_base(merged, root / name)
    return paths


def run(invoke, tmp_path, data: dict, out: str):
    cfg = tmp_path / f"{out}.yml"
    cfg.write_text(yaml.safe_dump(data))
    result = invoke("run", cfg, "-o", tmp_path / out, "-q")
    assert result.exit_code == 0, result.output
    return load_state(tmp_path / out)


def same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)


def test_lora_in_models_and_base_model(lora_family, invoke, tmp_path):
    p = {k: str(v) for k, v in lora_family.items()}
    with_lora = {
        "merge_method": "ties",
        "base_model": f"{p['base']}+{p['l1']}",
        "models": [
            {"model": f"{p['ft']}+{p['l2']}", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": p["ft"], "parameters": {"weight": 0.4, "density": 0.8}},
        ],
        "dtype": "float32",
    }
    merged = {**with_lora, "base_model": p["m1"]}
    merged["models"] = [{**with_lora["models"][0], "model": p["m2"]}, with_lora["models"][1]]
    got = run(invoke, tmp_path, with_lora, "lora")
    same(got, run(invoke, tmp_path, merged, "merged"))
    # the adapter really changed something: the merge differs from one without it
    plain = {**with_lora, "base_model": p["base"]}
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           run(invoke, tmp_path, plain, "plain")["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    recipe = yaml.safe_load((tmp_path / "lora" / "surgery_recipe.yaml").read_text())
    assert recipe["adapter_bases"] == {p["l1"]: p["base"], p["l2"]: p["ft"]}
    assert recipe["base"] == p["l1"] and recipe["models"][0] == p["l2"]


def test_lora_in_slice_sources(lora_family, invoke, tmp_path):
    p = {k: str(v) for k, v in lora_family.items()}

    def stack(first: str) -> dict:
        return {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": first, "layer_range": [0, 2]}]},
                {"sources": [{"model": p["base"], "layer_range": [1, 3]}]},
            ],
        }

    same(
        run(invoke, tmp_path, stack(f"{p['ft']}+{p['l2']}"), "lora"),
        run(invoke, tmp_path, stack(p["m2"]), "merged"),
    )


def test_a_lora_that_is_not_an_adapter_is_refused(lora_family, invoke, tmp_path):
    p = {k: str(v) for k, v in lora_family.items()}
    data = {"merge_method": "task_arithmetic", "base_model": p["base"],
            "models": [{"model": f"{p['ft']}+{p['m1']}", "parameters": {"weight": 1.0}}]}  # fmt: skip
    cfg = write_config(tmp_path, data)
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert re.search(
        r"error: .*m1 is applied to .*ft as a LoRA adapter, but it is not a PEFT adapter", result.stderr
    )
    assert "hint:" in result.stderr and not (tmp_path / "out").exists()


def test_lora_as_the_model_of_a_later_slice(lora_family, invoke, tmp_path):
    """slerp slices with another model per slice, the second slice's being base+adapter: opened as an
    extra input applied to its own model, the same numbers as the merged checkpoint."""
    p = {k: str(v) for k, v in lora_family.items()}

    def slerp(second: str) -> dict:
        return {
            "merge_method": "slerp",
            "base_model": p["base"],
            "slices": [
                {
                    "sources": [
                        {"model": p["base"], "layer_range": [0, 1]},
                        {"model": p["ft"], "layer_range": [0, 1]},
                    ]
                },
                {
                    "sources": [
                        {"model": p["base"], "layer_range": [1, 2]},
                        {"model": second, "layer_range": [1, 2]},
                    ]
                },
            ],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        }

    same(
        run(invoke, tmp_path, slerp(f"{p['base']}+{p['l1']}"), "lora"),
        run(invoke, tmp_path, slerp(p["m1"]), "merged"),
    )
