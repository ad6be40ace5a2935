"""Reading a mergekit YAML configuration (mergekit 0.1.5's schema) into frozen data.

Only the shape of the file is checked here: which keys exist, what a model reference says, how
parameter settings are written. What each parameter means per method lives in ``methods.py``; how
a setting evaluates for one tensor lives in ``params.py``. Anything mergekit accepts that we do not
run yet is refused here or in ``methods.py`` with an error that names the feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.errors import RecipeError

# Every top-level key of mergekit 0.1.5's MergeConfiguration.
TOP_LEVEL = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name",
)  # fmt: skip
_DTYPES = {"bfloat16", "float16", "float32", "torch.bfloat16", "torch.float16", "torch.float32"}
_HINT = "see README.md, 'Coming from mergekit', for what runs as is"

Setting = Any  # scalar | list of scalars (gradient) | {filter, value} | list of {filter, value}
Parameters = dict[str, Setting]


def unsupported(feature: str, hint: str | None = None) -> RecipeError:
    """The one error for a mergekit feature we do not run yet."""
    return RecipeError(f"mergekit config: {feature} is not supported yet", hint=hint or _HINT)


@dataclass(frozen=True)
class ModelRef:
    """``path`` (a Hub id ``org/name`` or a local folder), optional ``@revision``, optional ``+lora``."""

    path: str
    revision: str | None = None
    lora: str | None = None

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        return text + (f"+{self.lora}" if self.lora else "")

    @property
    def source(self) -> str:
        """What ``open_checkpoint`` understands: ``org/name@rev`` or a path (the model, without its
        adapter: tensor names and config.json are the model's)."""
        return self.path + (f"@{self.revision}" if self.revision else "")

    @property
    def input(self) -> str:
        """The recipe input: the adapter (applied to ``source``, see ``Recipe.adapter_bases``) or
        the model."""
        return self.lora if self.lora else self.source


def parse_model_ref(value: object, where: str) -> ModelRef:
    """mergekit's rule: split once on ``+`` (model + LoRA), then each side once on ``@``."""
    if isinstance(value, dict):  # the long form {model: ..., lora: ...}
        extra = set(value) - {"model", "lora"}
        if extra:
            raise unsupported(f"{where}: model reference key(s) {', '.join(sorted(extra))}")
        model = parse_model_ref(value.get("model"), where)
        lora = value.get("lora")
        value = str(model) + (f"+{_path_text(lora, where)}" if lora else "")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"mergekit config: {where} must name a model, not {value!r}")
    parts = value.split("+")
    if len(parts) > 2:
        raise RecipeError(f"mergekit config: cannot read model reference {value!r} ({where})")
    path, revision = _split_revision(parts[0], where)
    lora = parts[1] if len(parts) == 2 and _split_revision(parts[1], where) else None  # keeps @revision
    if lora is not None and not lora.strip():
        raise RecipeError(f"mergekit config: {where}: {value!r} names no LoRA adapter after '+'")
    return ModelRef(path, revision, lora)


def _path_text(value: object, where: str) -> str:
    if isinstance(value, dict):
        return str(value.get("path", "")) + (f"@{value['revision']}" if value.get("revision") else "")
    if not isinstance(value, str):
        raise RecipeError(f"mergekit config: {where} must name a model, not {value!r}")
    return value


def _split_revision(text: str, where: str) -> tuple[str, str | None]:
    if text.count("@") > 1:
        raise RecipeError(f"mergekit config: invalid model path {text!r} (more than one @) ({where})")
    path, _, revision = text.partition("@")
    return path, revision or None


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: ModelRef | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None  # mergekit 0.1.5 accepts it and ignores it; so do we


@dataclass(frozen=True)
class ModelInput:
    model: ModelRef
    parameters: Parameters | None = None


@dataclass(frozen=True)
class MergekitConfig:
    merge_method: str
    base_model: ModelRef | None
    models: tuple[ModelInput, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Parameters | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None  # "base", "union", or a model reference (as text)
    name: str | None
    raw: dict  # the file as read, kept for the output folder and the card
    # the tokenizer block's tokens (token -> {"source": ModelRef | {kind: ...}, "force": bool})
    tokens: tuple[tuple[str, dict], ...] = ()
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # "auto", a template name, or Jinja text (as written)


def looks_like_mergekit(data: object) -> bool:
    """A mergekit config names ``merge_method``; a surgery recipe names ``method``."""
    return isinstance(data, dict) and "merge_method" in data and "method" not in data


def parse_config(data: dict) -> MergekitConfig:
    """Check a loaded mergekit YAML and return it as frozen data (no file is opened)."""
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(
            f"mergekit config: unknown top-level key(s) {', '.join(unknown)}",
            hint=f"mergekit 0.1.5 knows: {', '.join(TOP_LEVEL)}",
        )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise RecipeError("mergekit config: merge_method must be a method name")
    if data.get("modules"):
        raise unsupported("'modules:' (per-module configurations of multimodal models)")
    given = [k for k in ("models", "slices") if data.get(k)]
    if len(given) != 1:
        raise RecipeError(
            "mergekit config: give exactly one of 'models' or 'slices'",
            hint="'models:' merges whole models; 'slices:' stacks layer ranges",
        )
    base = parse_model_ref(data["base_model"], "base_model") if data.get("base_model") else None
    models = None
    if data.get("models"):
        models = tuple(_model_input(m, i) for i, m in enumerate(_list(data["models"], "models")))
    slices = None
    if data.get("slices"):
        slices = tuple(_output_slice(s, i) for i, s in enumerate(_list(data["slices"], "slices")))
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and str(data[key]) not in _DTYPES:
            raise RecipeError(
                f"mergekit config: {key} {data[key]!r} is not a float dtype we write",
                hint="use bfloat16, float16 or float32",
            )
    return MergekitConfig(
        merge_method=method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=_parameters(data.get("parameters"), "parameters"),
        dtype=_dtype(data.get("dtype")),
        out_dtype=_dtype(data.get("out_dtype")),
        tokenizer_source=_tokenizer(data),
        name=str(data["name"]) if data.get("name") is not None else None,
        raw=dict(data),
        tokens=_tokens(data.get("tokenizer")),
        pad_to_multiple_of=_pad(data.get("tokenizer")),
        chat_template=_chat_template(data.get("chat_template")),
    )


def _dtype(value: object) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


def _list(value: object, where: str) -> list:
    if not isinstance(value, list):
        raise RecipeError(f"mergekit config: '{where}' must be a list")
    return value


def _model_input(entry: object, i: int) -> ModelInput:
    where = f"models[{i}]"
    if isinstance(entry, str):  # mergekit also accepts a bare reference
        return ModelInput(parse_model_ref(entry, where))
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"mergekit config: {where} needs a 'model'")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise RecipeError(f"mergekit config: {where} has unknown key(s) {', '.join(extra)}")
    return ModelInput(
        parse_model_ref(entry["model"], f"{where}.model"),
        _parameters(entry.get("parameters"), f"{where}.parameters"),
    )


def _output_slice(entry: object, i: int) -> OutputSlice:
    where = f"slices[{i}]"
    if not isinstance(entry, dict) or not entry.get("sources"):
        raise RecipeError(f"mergekit config: {where} needs 'sources'")
    residual = entry.get("residual_weight")  # declared by mergekit 0.1.5, read nowhere: no effect
    if residual is not None and (isinstance(residual, bool) or not isinstance(residual, int | float)):
        raise RecipeError(f"mergekit config: {where}.residual_weight must be a number")
    extra = sorted(set(entry) - {"sources", "base_model", "parameters", "residual_weight"})
    if extra:
        raise RecipeError(f"mergekit config: {where} has unknown key(s) {', '.join(extra)}")
    sources = tuple(_source(s, f"{where}.sources[{j}]") for j, s in enumerate(_list(entry["sources"], where)))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) != 1:
        raise RecipeError(
            f"mergekit config: the sources of {where} cover different numbers of layers",
            hint="every source of a slice must have the same layer_range length",
        )
    base = parse_model_ref(entry["base_model"], f"{where}.base_model") if entry.get("base_model") else None
    params = _parameters(entry.get("parameters"), f"{where}.parameters")
    return OutputSlice(sources, base, params, None if residual is None else float(residual))


def _source(entry: object, where: str) -> SliceSource:
    if not isinstance(entry, dict) or "model" not in entry or "layer_range" not in entry:
        raise RecipeError(f"mergekit config: {where} needs 'model' and 'layer_range: [start, end]'")
    extra = sorted(set(entry) - {"model", "layer_range", "parameters"})
    if extra:
        raise RecipeError(f"mergekit config: {where} has unknown key(s) {', '.join(extra)}")
    rng = entry["layer_range"]
    if (
        not isinstance(rng, list | tuple)
        or len(rng) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
        or not 0 <= rng[0] < rng[1]
    ):
        raise RecipeError(
            f"mergekit config: {where}.layer_range must be [start, end] with 0 <= start < end, not {rng!r}"
        )
    return SliceSource(
        parse_model_ref(entry["model"], f"{where}.model"),
        (rng[0], rng[1]),
        _parameters(entry.get("parameters"), f"{where}.parameters"),
    )


def _tokenizer(data: dict) -> str | None:
    """The tokenizer source: base, union or a model reference (as text); the ``tokenizer:`` block's
    ``source`` defaults to union, as in mergekit."""
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise RecipeError("mergekit config: give tokenizer_source or tokenizer, not both")
    block = data.get("tokenizer")
    source = data.get("tokenizer_source")
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError("mergekit config: 'tokenizer' must be a mapping with 'source'")
        extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if extra:
            raise RecipeError(f"mergekit config: tokenizer has unknown key(s) {', '.join(extra)}")
        source = block.get("source", "union")
    if source is None:
        return None
    if isinstance(source, dict):
        return str(parse_model_ref(source, "tokenizer_source"))
    text = str(source)
    if text.startswith("model:"):  # mergekit's long form "model:org/name"
        text = text.removeprefix("model:")
    return text if text in ("base", "union") else str(parse_model_ref(text, "tokenizer_source"))


def _tokens(block: object) -> tuple[tuple[str, dict], ...]:
    """``tokenizer.tokens``: per token, its row's source (a model reference, ``{kind: zero}`` or
    ``{kind: model_token, model, token | token_id}``) and ``force``."""
    if not isinstance(block, dict) or not block.get("tokens"):
        return ()
    tokens = block["tokens"]
    if not isinstance(tokens, dict):
        raise RecipeError("mergekit config: tokenizer.tokens must map token strings to settings")
    out = []
    for token, cfg in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        cfg = cfg or {}
        if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
            raise RecipeError(f"mergekit config: {where} takes source and force")
        source = cfg.get("source")
        if source is None:  # mergekit fails on it (NotImplementedError) whenever the row is needed
            raise unsupported(f"{where} without a source", hint="give source: MODEL or {kind: zero}")
        if isinstance(source, dict) and source.get("kind") in ("zero", "model_token"):
            source = dict(source)
            if source["kind"] == "model_token":
                source["model"] = parse_model_ref(source.get("model"), f"{where}.source.model")
        else:
            source = parse_model_ref(source, f"{where}.source")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"mergekit config: {where}.force must be true or false")
        out.append((str(token), {"source": source, "force": force}))
    return tuple(out)


def _pad(block: object) -> int | None:
    pad = block.get("pad_to_multiple_of") if isinstance(block, dict) else None
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(
            f"mergekit config: tokenizer.pad_to_multiple_of must be a positive integer, not {pad!r}"
        )
    return pad


def _chat_template(value: object) -> str | None:
    """Checked here (a name we know, auto, or Jinja text); resolved once the inputs are open."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecipeError("mergekit config: chat_template must be a template name or Jinja text")
    if value != "auto":
        from surgery.chat_templates import resolve_chat_template

        resolve_chat_template(value)
    return value


def _parameters(value: object, where: str) -> Parameters | None:
    """Check each setting's shape; values are typed per method later."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"mergekit config: {where} must be a mapping of parameter names to values")
    for name, setting in value.items():
        check_setting(setting, f"{where}.{name}")
    return dict(value)


def check_setting(setting: Setting, where: str) -> None:
    """A scalar, a gradient (list of scalars), one {filter, value} or a list of them."""
    if _is_scalar(setting):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise RecipeError(f"mergekit config: {where} cannot be {setting!r}")
    if all(_is_scalar(e) for e in setting):
        return
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise RecipeError(
                f"mergekit config: {where} mixes values and conditions",
                hint="write a gradient [a, b, ...] or a list of {filter: NAME_PART, value: ...}",
            )
        value = cond["value"]
        if not (_is_scalar(value) or (isinstance(value, list) and value and all(map(_is_scalar, value)))):
            raise RecipeError(f"mergekit config: {where}: a filter's value must be a number or a gradient")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise RecipeError(f"mergekit config: {where}: filter must be a substring of tensor names")


def _is_scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)
