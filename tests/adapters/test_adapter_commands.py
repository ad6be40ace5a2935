"""Adapters wherever a fine-tune is accepted: each command on (base, ADAPTER) gives what it gives on
(base, MERGED), where MERGED is the adapter's merge_and_unload saved in the base's dtype.

The adapters here are dyadic (factor products exact in float32, see peft_factory.make_adapter), so the
merged model peft writes is bit for bit what the adapter reads as, and outputs are compared as bytes.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel
from peft_factory import llama, make_adapter, save_base, set_base_name
from safetensors.torch import load_file

LLAMA = transformers.LlamaForCausalLM
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """bf16 base, a full fine-tune, a LoRA adapter (with modules_to_save) and its peft-merged model."""
    root = tmp_path_factory.mktemp("lora_family")
    base = save_base(llama(), root / "base", torch.bfloat16)
    full = llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_base(full, root / "full", torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    adapter = make_adapter(llama(), root / "adapter", config, dyadic=True)
    set_base_name(adapter, str(base))
    model = LLAMA.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(root / "merged")
    return {"base": base, "full": root / "full", "adapter": adapter, "merged": root / "merged", "root": root}


def weights(folder) -> dict[str, bytes]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(
            {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in load_file(str(f)).items()}
        )
    return out


def same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    differ = [k for k in wa if wa[k] != wb[k]]
    assert not differ, differ


def test_adapter_reads_as_peft_merged_model(family):
    from surgery.inputs import open_input

    merged = weights(family["merged"])
    with open_input(str(family["adapter"])) as ckpt:  # base from the adapter's config
        for name, data in merged.items():
            assert ckpt.read(name).tobytes() == data, name


@pytest.mark.parametrize(
    "method",
    [["--ties", "--density", "0.5"], ["--task-arithmetic", "--scale", "0.7"], ["--dare", "--density", "0.5"]],
)
def test_mixed_merge_equals_merging_the_merged_model(method, family, invoke, tmp_path):
    """surgery merge FT_FULL ADAPTER --base B == surgery merge FT_FULL MERGED --base B, byte for byte."""
    f = family
    a = invoke("merge", f["full"], f["adapter"], "--base", f["base"], *method, "-o", tmp_path / "a", "-q")
    assert a.exit_code == 0, a.output
    b = invoke("merge", f["full"], f["merged"], "--base", f["base"], *method, "-o", tmp_path / "b", "-q")
    assert b.exit_code == 0, b.output
    same_weights(tmp_path / "a", tmp_path / "b")
    recipe = (tmp_path / "a" / "surgery_recipe.yaml").read_text()
    assert str(f["adapter"]) in recipe  # the recipe names the adapter: `surgery run` reproduces it


def test_base_defaults_to_the_adapters_base(family, invoke, tmp_path):
    f = family
    r = invoke("merge", f["adapter"], "--ties", "-o", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("merge", f["merged"], "--base", f["base"], "--ties", "-o", tmp_path / "b", "-q")
    assert r.exit_code == 0, r.output
    same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "command",
    [
        ["lines", "{base}", "{ft}", "--alpha", "0.3"],
        ["diff", "{base}", "{ft}"],
        ["graft", "{base}", "{ft}", "--density", "0.1"],
        ["transfer", "--from", "{base}", "--finetuned", "{ft}", "--to", "{full}"],
    ],
    ids=lambda c: c[0],
)
def test_commands_take_adapters(command, family, invoke, tmp_path):
    f = family
    outs = []
    for ft in (f["adapter"], f["merged"]):
        args = [a.format(base=f["base"], ft=ft, full=f["full"]) for a in command]
        out = tmp_path / ft.name
        r = invoke(*args, "-o", out, "-q")
        assert r.exit_code == 0, r.output
        outs.append(out)
    same_weights(*outs)


def test_stats_and_intruders_on_adapter_equal_merged(family, invoke, tmp_path):
    f = family
    for command in (["stats", "--no-rank"], ["intruders", "--no-cache"]):
        reports = []
        for ft in (f["adapter"], f["merged"]):
            r = invoke(*command, f["base"], ft, "--json", "-q")
            assert r.exit_code == 0, r.output
            reports.append(json.loads(r.stdout))
        if command[0] == "stats":  # the adapter's own rank is reported beside the statistics
            ranks = reports[0].pop("adapter_ranks")[0]
            assert set(ranks.values()) == {4} and len(ranks) == 3 * 3 + 1  # q, v, down per block; embed
            assert reports[1].pop("adapter_ranks") == [None]
        for report in reports:  # the inputs' names differ; nothing else may
            report.pop("models", None), report.pop("finetuned", None)
        text = [json.dumps(r, sort_keys=True).replace(str(f["adapter"]), "FT").replace(str(f["merged"]), "FT")
                for r in reports]  # fmt: skip
        assert text[0] == text[1], command[0]


def test_stats_table_names_the_adapter_rank(family, invoke):
    r = invoke("stats", family["base"], family["adapter"], family["full"], "--no-rank", "-q")
    assert r.exit_code == 0, r.output
    assert "adapter: LoRA adapter, rank 4 on 10 tensors" in r.stdout
    assert "full: LoRA" not in r.stdout


def test_intruder_mitigation_of_an_adapter(family, invoke, tmp_path):
    f = family
    outs = []
    for ft in (f["adapter"], f["merged"]):
        out = tmp_path / ft.name
        r = invoke("intruders", f["base"], ft, "--mitigate", 0.5, "-o", out, "--no-cache", "-q")
        assert r.exit_code == 0, r.output
        outs.append(out)
    same_weights(*outs)
    assert json.loads((outs[0] / "config.json").read_text())["model_type"] == "llama"
