"""TuCo, the tuning contribution: Nuti et al. (ICML 2025), "Tuning Contribution: How much does
fine-tuning change a model's computation?", arXiv 2506.23423.

On the fine-tuned model's residual stream ``x_l`` (the input of decoder layer ``l``), with ``f(x, l)``
a whole decoder layer's update (layer output - layer input):

    PTC_l = f_PT(x_l, l)                       pre-trained component
    FTC_l = f_FT(x_l, l) - f_PT(x_l, l)        fine-tuning component
    x_L   = x_0 + sum_l (PTC_l + FTC_l)        (exact: the fine-tuned forward pass)

    TuCo  = |sum_l FTC_l| / (|sum_l PTC_l| + |sum_l FTC_l|)     at the last prompt token, L2 norm

Steering scales the fine-tuning component at every layer and position:

    x_{l+1} = x_l + PTC_l + alpha * FTC_l      (alpha = 1: the fine-tuned model; 0: pre-trained blocks
                                                 on the fine-tuned embeddings)

Both models run through ``transformers``: a forward pre-hook (``with_kwargs=True``) on every decoder
layer of the fine-tuned model captures the arguments the model passes (hidden state, position
embeddings, attention mask...), and the pre-trained model's layer ``l`` is called with exactly those.
The decoder layers are found generically: the largest ``nn.ModuleList`` of the fine-tuned model (its
path must exist in the pre-trained model too). Nothing is architecture specific.

Memory: both models are held in memory at once (about twice the model size in the load dtype,
float32 by default). Generation recomputes the full sequence at every step (no KV cache), which keeps
both models' layers consistent and is fine for small models but quadratic in the length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import IncompatibleTensorsError, InputNotFoundError, RecipeError
from surgery.jsonl import lines_of, looks_like_jsonl, parse_line

__all__ = [
    "TucoReport",
    "PromptTuco",
    "decoder_layers",
    "load_pair",
    "read_prompts",
    "steered_generate",
    "tuco",
    "tuco_prompt",
]

# Arguments a decoder layer must not share between the two models: a KV cache written by the
# fine-tuned layer would be corrupted by the pre-trained layer appending to it.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


@dataclass(frozen=True)
class PromptTuco:
    """TuCo of one prompt, with the per-layer component norms at its last token."""

    prompt: str
    tuco: float
    ftc_norms: tuple[float, ...]  # |FTC_l| per layer
    ptc_norms: tuple[float, ...]  # |PTC_l| per layer
    sum_ftc_norm: float  # |sum_l FTC_l|
    sum_ptc_norm: float  # |sum_l PTC_l|


@dataclass(frozen=True)
class TucoReport:
    base: str
    finetuned: str
    num_layers: int
    prompts: tuple[PromptTuco, ...] = field(default_factory=tuple)

    @property
    def mean_tuco(self) -> float:
        return sum(p.tuco for p in self.prompts) / max(1, len(self.prompts))

    def mean_ftc_norms(self) -> list[float]:
        """Mean |FTC_l| per layer over the prompts."""
        n = max(1, len(self.prompts))
        return [sum(p.ftc_norms[i] for p in self.prompts) / n for i in range(self.num_layers)]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_tuco"] = self.mean_tuco
        data["mean_ftc_norms"] = self.mean_ftc_norms()
        return data


# -- models -----------------------------------------------------------------------------------------
def decoder_layers(model: Any) -> tuple[str, Any]:
    """(path, ModuleList) of the decoder layers: the largest ``nn.ModuleList`` of the model."""
    import torch.nn as nn

    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None or len(best[1]) == 0:
        raise RecipeError(
            f"{type(model).__name__} has no nn.ModuleList of decoder layers",
            hint="TuCo needs a causal LM whose decoder layers sit in a ModuleList (model.model.layers)",
        )
    return best


def _pt_layers(pt: Any, path: str, n: int) -> Any:
    try:
        layers = pt.get_submodule(path)
    except AttributeError:
        layers = None
    if layers is None or len(layers) != n:
        raise IncompatibleTensorsError(
            f"the pre-trained model has no {n} decoder layers at {path!r}",
            hint="the two models must share one architecture and depth",
        )
    return layers


def load_pair(base: str | Path, finetuned: str | Path, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(pre-trained model, fine-tuned model, tokenizer of the fine-tune), loaded offline in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (base, finetuned):
        _check_model_folder(Path(path))
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise RecipeError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    pt = _load(AutoModelForCausalLM, base, dtype=torch_dtype).eval()
    ft = _load(AutoModelForCausalLM, finetuned, dtype=torch_dtype).eval()
    tok = _load(AutoTokenizer, finetuned)
    return pt, ft, tok


def _check_model_folder(path: Path) -> None:
    """What transformers needs to build a model offline: a folder with config.json and weights."""
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such folder or file", hint="check the path", path=str(path))
    if not path.is_dir():
        raise InputNotFoundError(
            f"{path} is a file: this command runs the model, so it needs the model's folder",
            hint="pass the folder that holds config.json, the weights and the tokenizer",
            path=str(path),
        )
    if not (path / "config.json").is_file():
        raise InputNotFoundError(
            f"{path} has no config.json: this command runs the model with transformers, which "
            "builds it from its config",
            hint="copy config.json (and the tokenizer files) from the model's release into the folder",
            path=str(path),
        )


def _load(auto: Any, path: str | Path, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` offline, its failures (unknown architecture, no tokenizer, ...) as
    one domain error naming the folder instead of a transformers traceback."""
    try:
        return auto.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        what = "tokenizer" if "Tokenizer" in auto.__name__ else "model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputNotFoundError(
            f"cannot load the {what} of {path} with transformers: {first}",
            hint="the folder needs what `from_pretrained` reads: config.json, the weights and "
            "the tokenizer files",
            path=str(path),
        ) from exc


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL rows with a ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist", hint="pass a text or JSONL file", path=str(path))
    lines = lines_of(path)
    if not looks_like_jsonl(path, lines):
        return [line for _, line in lines]
    prompts = []
    for i, line in lines:
        row = parse_line(path, i, line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RecipeError(f"{path}:{i} has no string field 'prompt'", path=str(path))
        prompts.append(row["prompt"])
    return prompts


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``; with ``chat`` the tokenizer's chat template (generation prompt added)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError("the tokenizer has no chat template", hint="drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


# -- the decomposition ------------------------------------------------------------------------------
def _hidden(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: Any) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _pt_call(layer: Any, args: tuple, kwargs: dict) -> Any:
    """The pre-trained layer on the exact arguments the fine-tuned layer received (no shared cache)."""
    kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return _first(layer(*args, **kwargs))


@contextmanager
def _hooks(pt: Any, ft: Any, on_layer: Callable[[int, Any, Any, Any], Any]):
    """Call ``on_layer(l, x_l, ft_out, pt_out)`` after every fine-tuned layer; its return value (if not
    None) replaces the layer's hidden-state output."""
    path, ft_layers = decoder_layers(ft)
    pt_layers = _pt_layers(pt, path, len(ft_layers))
    captured: dict[int, tuple[tuple, dict]] = {}
    handles = []
    inside_pt = [False]  # pt may be ft itself: its own call must not re-enter the hooks

    def pre(i: int):
        def hook(module, args, kwargs):
            if not inside_pt[0]:
                captured[i] = (args, kwargs)

        return hook

    def post(i: int):
        def hook(module, args, kwargs, output):
            if inside_pt[0]:
                return None
            cargs, ckwargs = captured.pop(i)
            x = _hidden(cargs, ckwargs)
            inside_pt[0] = True
            try:
                pt_out = _pt_call(pt_layers[i], cargs, ckwargs)
            finally:
                inside_pt[0] = False
            new = on_layer(i, x, _first(output), pt_out)
            return None if new is None else _replace_first(output, new)

        return hook

    try:
        for i, layer in enumerate(ft_layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
        yield len(ft_layers)
    finally:
        for h in handles:
            h.remove()


def components(pt: Any, ft: Any, input_ids: Sequence[int]) -> dict[str, Any]:
    """PTC_l and FTC_l at every position (float32 tensors ``[L, T, d]``), x_0 and the fine-tuned
    model's final pre-norm hidden state ``x_L`` (``[T, d]``) for one sequence."""
    import torch

    ptc, ftc, xs = [], [], {}

    def on_layer(i, x, ft_out, pt_out):
        if i == 0:
            xs["x0"] = x[0].float()
        ptc.append((pt_out - x)[0].float())
        ftc.append((ft_out - pt_out)[0].float())
        xs["xL"] = ft_out[0].float()
        return None

    ids = torch.tensor([list(input_ids)], device=_device(ft))
    with torch.no_grad(), _hooks(pt, ft, on_layer):
        ft(input_ids=ids, use_cache=False)
    return {"ptc": torch.stack(ptc), "ftc": torch.stack(ftc), "x0": xs["x0"], "xL": xs["xL"]}


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def tuco_prompt(pt: Any, ft: Any, input_ids: Sequence[int], prompt: str = "") -> PromptTuco:
    """TuCo of one tokenised prompt at its last token."""
    comp = components(pt, ft, input_ids)
    ptc, ftc = comp["ptc"][:, -1], comp["ftc"][:, -1]  # [L, d]
    s_ptc, s_ftc = float(ptc.sum(0).norm()), float(ftc.sum(0).norm())
    denom = s_ptc + s_ftc
    return PromptTuco(
        prompt=prompt,
        tuco=s_ftc / denom if denom > 0 else 0.0,
        ftc_norms=tuple(float(v) for v in ftc.norm(dim=-1)),
        ptc_norms=tuple(float(v) for v in ptc.norm(dim=-1)),
        sum_ftc_norm=s_ftc,
        sum_ptc_norm=s_ptc,
    )


def tuco(
    base: str | Path | Any,
    finetuned: str | Path | Any,
    prompts: Sequence[str],
    tokenizer: Any = None,
    chat: bool = False,
    progress: Callable[[int, str | None], None] | None = None,
) -> TucoReport:
    """TuCo of ``finetuned`` against ``base`` for every prompt (paths, or in-memory models plus
    ``tokenizer``)."""
    if not prompts:
        raise RecipeError("no prompts given", hint="pass a file with one prompt per line")
    pt, ft, tok = _models(base, finetuned, tokenizer)
    rows = []
    for p in prompts:
        rows.append(tuco_prompt(pt, ft, encode_prompt(tok, p, chat), p))
        if progress is not None:
            progress(1, p)
    _, layers = decoder_layers(ft)
    return TucoReport(_name(base), _name(finetuned), len(layers), tuple(rows))


def _models(base: Any, finetuned: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    if isinstance(base, (str, Path)) != isinstance(finetuned, (str, Path)):
        raise RecipeError("pass both models as paths or both as loaded models")
    if isinstance(base, (str, Path)):
        pt, ft, tok = load_pair(base, finetuned)
        return pt, ft, tokenizer or tok
    if tokenizer is None:
        raise RecipeError("in-memory models need a tokenizer")
    return base.eval(), finetuned.eval(), tokenizer


def _name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


# -- steering ---------------------------------------------------------------------------------------
@contextmanager
def steering(pt: Any, ft: Any, alpha: float):
    """Inside the block, ``ft``'s forward computes x_{l+1} = x_l + PTC_l + alpha * FTC_l at every
    layer and position. alpha = 1 leaves the fine-tuned model untouched (bit for bit)."""
    if alpha == 1.0:
        yield
        return

    def on_layer(i, x, ft_out, pt_out):
        # ft_out + (alpha - 1) * FTC = x + PTC + alpha * FTC
        return ft_out + (alpha - 1.0) * (ft_out - pt_out)

    with _hooks(pt, ft, on_layer):
        yield


def steered_generate(
    base: str | Path | Any,
    finetuned: str | Path | Any,
    prompt: str,
    alpha: float,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
    chat: bool = False,
) -> dict[str, Any]:
    """Greedy generation with the fine-tuning component scaled by ``alpha`` (no KV cache: the full
    sequence is recomputed at each step). Returns ``{"text", "tokens", "prompt_tokens"}``, the shape
    of ``eft_generate``'s result."""
    import math

    import torch

    if not math.isfinite(alpha):
        raise RecipeError(
            f"alpha must be a finite number, got {alpha}", hint="1 = the fine-tune, 0 = the base"
        )
    pt, ft, tok = _models(base, finetuned, tokenizer)
    prompt_ids = encode_prompt(tok, prompt, chat)
    ids = torch.tensor([prompt_ids], device=_device(ft))
    eos = _eos_ids(ft, tok)
    new: list[int] = []
    with torch.no_grad(), steering(pt, ft, alpha):
        for _ in range(max_new_tokens):
            nxt = int(ft(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(nxt)
            if nxt in eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    text = tok.decode([t for t in new if t not in eos], skip_special_tokens=True)
    return {"text": text, "tokens": new, "prompt_tokens": list(prompt_ids)}


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return eos
