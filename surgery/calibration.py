"""Calibration data for RegMean: the texts, the Gram pass, and the Grams' on-disk cache.

For each linear layer y = x W^T inside the decoder blocks, the pass accumulates G = sum x^T x over
every token of the model's own calibration texts (each model tokenises with its own tokenizer), in
float64. Layers that read the same input tensor (q/k/v, gate/up) share one Gram: it is computed and
stored once. The pass runs block by block (:mod:`surgery.blockwise`), so it works for models larger
than memory.

Cache: ``<cache>/<model key>-<data key>/`` holds one safetensors file of Grams per block and
``grams.json`` (which weight uses which Gram, the weight layout, the token count). The model key hashes
the checkpoint's bytes and config; the data key the texts, the tokenizer files and ``max_length``.
Re-merging with other parameters then costs no forward pass. A folder appears under its final name
only when complete; processes that want the same entry at once (the shares of a split run) take turns
on ``<entry>.lock`` beside it, so the pass runs once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import InputNotFoundError, RecipeError
from surgery.jsonl import lines_of, looks_like_jsonl, parse_line

MAX_LENGTH = 512  # tokens per text (longer texts are truncated)
INDEX = "grams.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json")  # fmt: skip


def default_cache_dir() -> Path:
    """``$SURGERY_GRAM_CACHE``, else ``$XDG_CACHE_HOME/surgery/grams`` (``~/.cache/surgery/grams``)."""
    if os.environ.get("SURGERY_GRAM_CACHE"):
        return Path(os.environ["SURGERY_GRAM_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "surgery" / "grams"


def read_texts(path: str | os.PathLike) -> list[str]:
    """Calibration texts: JSONL with a ``text`` field per line, or plain text (one example a line)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(
            f"calibration file {p} does not exist", hint="pass --calibration FILE", path=str(p)
        )
    lines = lines_of(p)
    if looks_like_jsonl(p, lines):
        texts = [_text_field(p, i, line) for i, line in lines]
    else:
        texts = [line for _, line in lines]
    if not texts:
        raise RecipeError(
            f"calibration file {p} holds no text", hint="one example per line (or JSONL `text`)"
        )
    return texts


def _text_field(path: Path, lineno: int, line: str) -> str:
    record = parse_line(path, lineno, line)
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise RecipeError(f"{path}:{lineno}: no string field `text`", hint='write {"text": "..."} per line')
    return record["text"]


def data_key(texts: list[str], tokenizer_root: Path, max_length: int) -> str:
    h = hashlib.sha256(json.dumps({"texts": texts, "max_length": max_length}).encode())
    for name in _TOKENIZER_FILES:
        if (tokenizer_root / name).is_file():
            h.update(name.encode() + (tokenizer_root / name).read_bytes())
    return h.hexdigest()[:24]


def model_key(ckpt) -> str:
    """blake2b of the checkpoint's tensor files (sorted by name) and config.json."""
    h = hashlib.blake2b(digest_size=12)
    for path in sorted(ckpt.files, key=lambda p: p.name) + [ckpt.root / "config.json"]:
        if not path.is_file():
            continue
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class GramSet:
    """The Grams of one model on its calibration texts, read lazily from the cache folder."""

    folder: Path
    uses: dict[str, str]  # weight tensor name -> Gram name
    layouts: dict[str, str]  # weight tensor name -> "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D)
    files: dict[str, str]  # Gram name -> file in folder
    tokens: int
    texts: int

    def gram(self, weight: str):
        """The float64 Gram [in, in] of a weight's input, or None for a weight without one."""
        from safetensors import safe_open

        name = self.uses.get(weight)
        if name is None:
            return None
        with safe_open(self.folder / self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    @classmethod
    def load(cls, folder: Path) -> GramSet:
        meta = json.loads((folder / INDEX).read_text())
        return cls(folder, meta["uses"], meta["layouts"], meta["files"], meta["tokens"], meta["texts"])


def collect_grams(
    model: str | os.PathLike,
    calibration: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_length: int = MAX_LENGTH,
) -> GramSet:
    """The Grams of ``model``'s block linear layers on its texts: from the cache, or by a pass."""
    from surgery.checkpoint import open_checkpoint

    texts = read_texts(calibration)
    with open_checkpoint(model) as ckpt:
        folder = (
            Path(cache_dir or default_cache_dir())
            / f"{model_key(ckpt)}-{data_key(texts, ckpt.root, max_length)}"
        )
        if (folder / INDEX).is_file():
            return GramSet.load(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # One pass per cache entry even when several processes want it at once (the shares of a
        # `--shards` run): the first takes the lock and computes, the others wait and then load.
        with open(folder.with_name(f"{folder.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / INDEX).is_file():
                _fill(folder, ckpt, texts, max_length)
    return GramSet.load(folder)


def _fill(folder: Path, ckpt, texts: list[str], max_length: int) -> None:
    """Run the pass into a staging folder and move it into place whole."""
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _gram_pass(ckpt, texts, max_length, staging)
        os.replace(staging, folder) if not folder.exists() else shutil.rmtree(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gram_pass(ckpt, texts: list[str], max_length: int, staging: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from surgery.blockwise import run_blocks

    tok = AutoTokenizer.from_pretrained(ckpt.root, local_files_only=True)
    ids = [tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"] for t in texts]
    ids = [x for x in ids if x.shape[1] > 0]
    meta: dict = {"uses": {}, "layouts": {}, "files": {}, "tokens": int(sum(x.shape[1] for x in ids)),
                  "texts": len(ids)}  # fmt: skip

    def on_block(i: int, prefix: str, block: torch.nn.Module):
        acc = _BlockGrams(prefix, block)
        fname = f"block-{i:05d}.safetensors"

        def finish() -> None:
            acc.remove()
            _save(acc.grams, staging / fname)
            meta["files"].update(dict.fromkeys(acc.grams, fname))
            meta["uses"].update(acc.uses)
            meta["layouts"].update(acc.layouts)

        return finish

    run_blocks(ckpt.root, ckpt, ids, on_block)
    (staging / INDEX).write_text(json.dumps(meta, indent=1, sort_keys=True))


class _BlockGrams:
    """Forward hooks on one block's linear layers that accumulate their input Grams (float64).

    Inputs are buffered (float32, up to ``FLUSH_BYTES`` per Gram) and folded in by one float64 GEMM
    per flush: per-text products of a few rows each would cost far more in call overhead.
    """

    FLUSH_BYTES = 64 * 2**20

    def __init__(self, prefix: str, block) -> None:
        self.grams: dict = {}
        self.uses: dict[str, str] = {}
        self.layouts: dict[str, str] = {}
        self._pending: dict[str, list] = {}
        self._seen: dict[int, tuple] = {}  # id(input) -> (input, Gram name), within one block call
        self._handles = [block.register_forward_pre_hook(lambda *_: self._seen.clear())]
        for name, module in block.named_modules():
            layout = _layout(module)
            if layout:
                weight = f"{prefix}.{name}.weight"
                self.layouts[weight] = layout
                self._handles.append(module.register_forward_pre_hook(self._hook(weight)))

    def _hook(self, weight: str):
        def hook(module, args) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:  # the same input as an earlier layer: share its Gram
                self.uses.setdefault(weight, seen[1])
                return
            name = weight.removesuffix(".weight") + ".input"
            self._seen[id(x)] = (x, name)
            self.uses.setdefault(weight, name)
            rows = self._pending.setdefault(name, [])
            rows.append(x.detach().reshape(-1, x.shape[-1]).float())
            if sum(r.numel() for r in rows) * 4 >= self.FLUSH_BYTES:
                self._flush(name)

        return hook

    def _flush(self, name: str) -> None:
        import torch

        rows = self._pending.pop(name, [])
        if not rows:
            return
        flat = torch.cat(rows).double()
        gram = flat.T @ flat
        self.grams[name] = self.grams[name] + gram if name in self.grams else gram

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name in list(self._pending):
            self._flush(name)


def _layout(module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return "in_out"
    return None


def _save(grams: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in grams.items()}, str(path))
