#!/usr/bin/env python3
"""What aligning vocabularies costs: a mergekit `tokenizer_source: union` merge vs the same merge of
models that share one tokenizer (rows by index), on Llama-7B-shaped embeddings.

    PYTHONPATH=. python benchmarks/bench_vocab_union.py --data /tmp/vocab-bench [--vocab 32000 --hidden 2048]

Inputs (written once under --data, bfloat16, safetensors + config.json + a WordLevel tokenizer.json):
a base with V tokens, ft1 with the same tokens in reverse order plus 1,000 new ones, ft2 with 500 new
ones; each model holds `model.embed_tokens.weight`, `lm_head.weight` and one small block. The "same"
set has three models with the base's tokenizer and V rows. Each run is `surgery run CONFIG.yml` as a
subprocess after dropping the inputs from the page cache; wall time and peak RSS (wait4) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def tokenizer_json(words: list[str]) -> dict:
    vocab = {w: i for i, w in enumerate(["<unk>"] + words)}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }  # fmt: skip


def write_model(folder: Path, words: list[str], hidden: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    n = len(words) + 1
    g = torch.Generator().manual_seed(seed)

    def bf16(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": bf16((n, hidden)),
        "lm_head.weight": bf16((n, hidden)),
        "model.layers.0.input_layernorm.weight": bf16((hidden,)),
        "model.norm.weight": bf16((hidden,)),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": 1, "vocab_size": n, "torch_dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(words)))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def make_inputs(data: Path, vocab: int, hidden: int) -> None:
    words = [f"t{i}" for i in range(vocab - 1)]
    sets = {
        "union": {"base": words, "ft1": words[::-1] + [f"a{i}" for i in range(1000)],
                  "ft2": words + [f"b{i}" for i in range(500)]},
        "same": {"base": words, "ft1": words, "ft2": words},
    }  # fmt: skip
    for kind, models in sets.items():
        for seed, (name, w) in enumerate(models.items()):
            if not (data / kind / name / "model.safetensors").exists():
                write_model(data / kind / name, w, hidden, seed)


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, rusage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return seconds, rusage.ru_maxrss * 1024 / GiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    make_inputs(args.data, args.vocab, args.hidden)
    for kind in ("same", "union"):
        root = args.data / kind
        models = [{"model": str(root / m), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")]
        cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "models": models}
        if kind == "union":
            cfg["tokenizer_source"] = "union"
        path = args.data / f"{kind}.yml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        out = args.data / f"{kind}.out"
        drop_cache(root)
        cmd = [
            sys.executable,
            "-m",
            "surgery_cli.main",
            "run",
            str(path),
            "-o",
            str(out),
            "-q",
            "--overwrite",
        ]
        seconds, rss = timed(cmd)
        rows = json.loads((out / "config.json").read_text())["vocab_size"]
        print(f"{kind}: {seconds:.1f} s, peak RSS {rss:.2f} GiB, {rows} output rows")


if __name__ == "__main__":
    main()
