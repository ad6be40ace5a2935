"""Emulated fine-tuning and up-scaling (EFT): Mitchell et al., "An Emulator for Fine-Tuning Large
Language Models using Small Language Models", ICLR 2024, arXiv 2310.12962.

At every decoding step the next-token logits are

    l = l_LB + alpha * (l_SF - l_SB)

with SB a small base, SF its fine-tune and LB a (larger) base of the same family: the small pair's
"fine-tuning behaviour delta" is added to the large base (up-scaling). The three models must share one
tokenizer. Decoding is greedy. Each model keeps its own KV cache (``past_key_values``), so a step
feeds one new token to each model (transformers' ``past_key_values``, named ``cache`` in
5.x).

The sum is taken in float64: float32 logits subtract exactly there, so with LB == SB and alpha = 1 the
combined logits ARE l_SF bit for bit and the decoding reproduces the small fine-tune token for token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from surgery.analysis.tuco import _device, _eos_ids, encode_prompt
from surgery.errors import IncompatibleTensorsError, InputNotFoundError, RecipeError

__all__ = ["eft_generate", "load_eft", "check_same_tokenizer"]


def load_eft(small_base: str | Path, small_finetuned: str | Path, large_base: str | Path,
             dtype: str = "float32") -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """(small base, small fine-tune, large base, tokenizer), loaded offline; the tokenizers are checked.

    A path given twice is loaded once (LB == SB: the identity check costs one model less)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = [Path(p) for p in (small_base, small_finetuned, large_base)]
    for path in paths:
        if not path.exists():
            raise InputNotFoundError(
                f"{path} does not exist", hint="pass a local model folder", path=str(path)
            )
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise RecipeError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    tokenizers = [AutoTokenizer.from_pretrained(p, local_files_only=True) for p in paths]
    check_same_tokenizer(tokenizers, [str(p) for p in paths])
    loaded: dict[Path, Any] = {}
    models = []
    for path in paths:
        key = path.resolve()
        if key not in loaded:
            loaded[key] = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True
            ).eval()
        models.append(loaded[key])
    return models[0], models[1], models[2], tokenizers[1]


def check_same_tokenizer(tokenizers: list[Any], names: list[str]) -> None:
    """The models must map text to the same ids: equal vocabularies and special tokens."""
    ref = tokenizers[0]
    ref_vocab = ref.get_vocab()
    for tok, name in zip(tokenizers[1:], names[1:]):
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            differ = sorted(set(vocab.items()) ^ set(ref_vocab.items()))
            raise IncompatibleTensorsError(
                f"{name} does not share the tokenizer of {names[0]} ({len(vocab)} vs {len(ref_vocab)} "
                f"tokens, {len(differ)} (token, id) pairs differ, e.g. {differ[0]!r})",
                hint="EFT adds logits token by token: the three models must use one tokenizer",
            )
        for attr in ("bos_token_id", "eos_token_id"):
            if getattr(tok, attr, None) != getattr(ref, attr, None):
                raise IncompatibleTensorsError(
                    f"{name} has {attr} {getattr(tok, attr, None)} but {names[0]} has "
                    f"{getattr(ref, attr, None)}",
                    hint="EFT adds logits token by token: the three models must use one tokenizer",
                )


class _Stepper:
    """One model's next-token logits, with its KV cache (or recomputing the sequence without one)."""

    def __init__(self, model: Any, use_cache: bool) -> None:
        import inspect

        self.model, self.use_cache = model, use_cache
        self.past = None
        self.ids = None
        # transformers 5.x renames the forward argument `past_key_values` to `cache` (the old name
        # is deprecated): use whichever this model's forward takes.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def logits(self, new_ids: Any) -> Any:
        import torch

        if not self.use_cache:
            self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
            return self.model(input_ids=self.ids, use_cache=False).logits[0, -1]
        out = self.model(input_ids=new_ids, use_cache=True, **{self.cache_arg: self.past})
        self.past = getattr(out, self.cache_arg, None) or out.past_key_values
        return out.logits[0, -1]


def eft_generate(
    small_base: str | Path | Any,
    small_finetuned: str | Path | Any,
    large_base: str | Path | Any,
    prompt: str,
    alpha: float = 1.0,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
    chat: bool = False,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Greedy decoding with l = l_LB + alpha * (l_SF - l_SB) per step (paths, or loaded models plus
    ``tokenizer``). Returns ``{"text", "tokens", "prompt_tokens"}``."""
    import torch

    models = (small_base, small_finetuned, large_base)
    as_paths = [isinstance(m, (str, Path)) for m in models]
    if any(as_paths) and not all(as_paths):
        raise RecipeError("pass the three models as paths or all three as loaded models")
    if all(as_paths):
        sb, sf, lb, tok = load_eft(*models)
        tokenizer = tokenizer or tok
    else:
        if tokenizer is None:
            raise RecipeError("in-memory models need a tokenizer")
        sb, sf, lb = (m.eval() for m in models)
    if max_new_tokens < 0:
        raise RecipeError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not math.isfinite(alpha):
        raise RecipeError(
            f"alpha must be a finite number, got {alpha}", hint="1 = the small fine-tune's delta"
        )
    # Same-size families often pad the embedding differently (e.g. 151936 vs 152064 rows): the rows
    # past the tokenizer's length are never produced by it, so compare on the common prefix.
    vocab = min(m.get_output_embeddings().weight.shape[0] for m in (sb, sf, lb))
    if len(tokenizer) > vocab:
        raise IncompatibleTensorsError(
            f"the tokenizer has {len(tokenizer)} tokens but a model's head has only {vocab} rows",
            hint="the three models must share one tokenizer and vocabulary",
        )
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    if not prompt_ids:
        raise RecipeError("the prompt encodes to no tokens", hint="pass a non-empty --prompt")
    steppers = [_Stepper(m, use_cache) for m in (sb, sf, lb)]
    eos = _eos_ids(sf, tokenizer)
    a = float(alpha)
    feed = torch.tensor([prompt_ids], device=_device(sf))
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            l_sb, l_sf, l_lb = (s.logits(feed.to(_device(s.model)))[:vocab].double().cpu() for s in steppers)
            nxt = int((l_lb + a * (l_sf - l_sb)).argmax())
            new.append(nxt)
            if nxt in eos:
                break
            feed = torch.tensor([[nxt]], device=feed.device)
    text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
    return {"text": text, "tokens": new, "prompt_tokens": list(prompt_ids)}
