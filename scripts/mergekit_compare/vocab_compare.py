"""mergekit 0.1.5 vs `surgery run` on configs with different tokenizers, chat templates and model+lora.

Not part of the test suite (mergekit is no dependency); run it with mergekit in a throwaway venv:

    PYTHONPATH=. python scripts/mergekit_compare/vocab_compare.py --mergekit /tmp/mk/bin/mergekit-yaml WORKDIR

Models: tests/mergekit/vocab_family.py (three tiny Llama models whose tokenizers differ) and a peft
LoRA adapter over the base. mergekit numbers the union's new tokens in hash-map order (it changes
from run to run), so outputs are compared row by row *by token string*: same vocabulary as a set,
same config vocab_size, every tensor within the printed relative difference, and the same rendered
chat template. One line per config.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.mergekit.vocab_family import build_family


def configs(p: dict[str, str]) -> dict[str, dict]:
    three = [
        {"model": p["base"], "parameters": {"weight": 0.5}},
        {"model": p["ft1"], "parameters": {"weight": 0.3}},
        {"model": p["ft2"], "parameters": {"weight": 0.2}},
    ]
    two = [
        {"model": p["ft1"], "parameters": {"weight": 0.6}},
        {"model": p["ft2"], "parameters": {"weight": 0.4}},
    ]
    tokens = {
        "<|im_start|>": {"source": p["ft2"], "force": True},
        "<new>": {"source": {"kind": "zero"}},
        "y9": {"source": {"kind": "model_token", "model": p["ft1"], "token": "y1"}},
        "w3": {"source": {"kind": "model_token", "model": p["ft2"], "token_id": 5}, "force": True},
    }
    common = {"base_model": p["base"], "dtype": "float32"}
    ties = {**common, "merge_method": "ties", "parameters": {"density": 0.5}, "models": two}
    ta = {**common, "merge_method": "task_arithmetic", "models": two}
    padded = {"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}
    lora = [{"model": f"{p['base']}+{p['lora']}", "parameters": {"weight": 0.7}},
            {"model": p["twin"], "parameters": {"weight": 0.5}}]  # fmt: skip
    return {
        "linear_union_chatml": {**common, "merge_method": "linear", "models": three,
                                "tokenizer_source": "union", "chat_template": "chatml"},
        "ta_union_no_base_rows": {"merge_method": "linear", "models": two, "dtype": "float32",
                                  "tokenizer_source": "union"},
        "ta_tokens_pad8": {**ta, "tokenizer": padded},
        "ties_tokens": {**ties, "tokenizer": {"source": "union", "tokens": tokens}},
        "ties_tokens_pad8": {**ties, "tokenizer": padded},
        "ta_source_base": {**ta, "tokenizer_source": "base", "chat_template": "llama3"},
        "ta_source_ft1": {**ta, "tokenizer_source": p["ft1"]},
        "slerp_union_mistral": {**common, "merge_method": "slerp", "parameters": {"t": 0.3},
                                "models": [{"model": p["base"]}, {"model": p["ft2"]}],
                                "tokenizer_source": "union", "chat_template": "mistral"},
        "lora_models_and_base": {**common, "merge_method": "task_arithmetic", "models": lora},
    }  # fmt: skip


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def compare(ours: Path, theirs: Path) -> str:
    ta, tb = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    va, vb = ta.get_vocab(), tb.get_vocab()
    if set(va) != set(vb):
        return f"differs: vocabularies {sorted(set(va) ^ set(vb))}"
    sizes = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours, theirs)]
    if sizes[0] != sizes[1]:
        return f"differs: vocab_size {sizes}"
    sa, sb = state(ours), state(theirs)
    if set(sa) != set(sb):
        return f"differs: tensors {sorted(set(sa) ^ set(sb))}"
    order = [vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])]
    worst, where, real = 0.0, "", 0.0  # real: over every row that holds a token (padding rows left out)
    for name in sorted(sa):
        x, y = sa[name].float(), sb[name].float()
        if x.dim() == 2 and x.shape[0] == sizes[0] and ("embed" in name or "lm_head" in name):
            y = y[torch.tensor(order + list(range(len(order), x.shape[0])))]
        rel = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        if rel > worst:
            worst, where = rel, name
        n = len(order) if x.dim() == 2 and x.shape[0] == sizes[0] else x.shape[0]
        real = max(real, ((x[:n] - y[:n]).abs().max() / y.abs().max().clamp_min(1e-30)).item())
    chat = ""
    if ta.chat_template or tb.chat_template:
        msgs = [{"role": "user", "content": "w1 y0"}, {"role": "assistant", "content": "w2"}]
        render = [t.apply_chat_template(msgs, tokenize=False) for t in (ta, tb)]
        chat = ", chat template renders the same" if render[0] == render[1] else ", chat template DIFFERS"
    status = "match" if worst <= 1e-6 else "differs"
    rows = f"; rows that hold a token: {real:.2g}" if worst > 1e-6 else ""
    return (
        f"{status} (max relative difference {worst:.2g}{' in ' + where if worst > 1e-6 else ''}{rows}{chat})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mergekit", required=True)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: str(v) for k, v in build_family(work / "models").items()}
    paths.update(_lora_inputs(work / "models", Path(paths["base"])))
    for name, cfg in configs(paths).items():
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        mk, ours = work / f"{name}.mergekit", work / f"{name}.surgery"
        cmd = [args.mergekit, str(path), str(mk), "--allow-crimes", "--lazy-unpickle",
               "--lora-merge-cache", str(work / "lora-cache")]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: mergekit failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        ours_cmd = [
            sys.executable,
            "-m",
            "surgery_cli.main",
            "run",
            str(path),
            "-o",
            str(ours),
            "-q",
            "--overwrite",
        ]
        ran = subprocess.run(ours_cmd, capture_output=True, text=True)
        if ran.returncode != 0:
            print(f"{name}: refused: {ran.stderr.strip()}")
            continue
        print(f"{name}: {compare(ours, mk)}")


def _lora_inputs(root: Path, base: Path) -> dict[str, str]:
    """A LoRA adapter over the base, and a twin of the base (same tokenizer) as a second model."""
    import shutil

    import transformers
    from peft import LoraConfig

    from tests.adapters.peft_factory import make_adapter

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    lora = make_adapter(
        model, root / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    twin = root / "twin"
    if not twin.exists():
        shutil.copytree(base, twin)
        weights = load_file(str(twin / "model.safetensors"))
        g = torch.Generator().manual_seed(1)
        weights = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
        from safetensors.torch import save_file

        save_file(weights, str(twin / "model.safetensors"), metadata={"format": "pt"})
    return {"lora": str(lora), "twin": str(twin)}


if __name__ == "__main__":
    main()
