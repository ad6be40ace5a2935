"""A PEFT LoRA ``adapter_config.json``, read and honoured exactly as peft 0.21 does.

The rules below mirror peft's own code, so an adapter means here what it means in
``PeftModel.from_pretrained(...).merge_and_unload()``:

- a module is adapted when ``check_target_module_exists`` says so (peft/tuners/tuners_utils.py):
  ``exclude_modules`` and ``modules_to_save`` win, then ``target_modules`` (a regex matched in full
  when it is a string; else a name or a ``.name`` suffix), then ``layers_to_transform`` (the first
  numbered segment, or the one after ``layers_pattern``);
- its rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (``get_pattern_key``: the first
  pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``), else ``r`` / ``lora_alpha``;
- scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``.

Variants whose merged weights are not ``W + scaling * B @ A`` (DoRA, aLoRA, QALoRA, Arrow, ...) are
refused with an error rather than merged wrongly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import read_json
from surgery.errors import CorruptCheckpointError, InputNotFoundError, RecipeError
from surgery.files import ADAPTER_CONFIG as CONFIG_NAME

# Config keys that change what the merged weights are; any of them set means "not plain LoRA".
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales each column)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that decide the merged weights."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: tuple[str, ...] | str | None
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | int | None
    layers_pattern: tuple[str, ...] | None
    modules_to_save: tuple[str, ...]
    lora_bias: bool
    base_model: str | None  # base_model_name_or_path

    def targets(self, module: str) -> bool:
        """peft's ``check_target_module_exists(config, module)``, as a bool."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(
                module.endswith(f".{m}") for m in self.exclude_modules
            ):
                return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, tuple) and not layers):
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match["idx"])
        return index == layers if isinstance(layers, int) else index in layers

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of a module: the first matching ``rank_pattern`` / ``alpha_pattern`` entry wins."""
        return (
            int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)),
            float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)),
        )

    def scaling(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, arXiv 2312.03732)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, module: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` beside its weights."""
    return folder.is_dir() and (folder / CONFIG_NAME).is_file()


def read_settings(folder: Path) -> LoraSettings:
    """Parse ``adapter_config.json``; refuse adapter types and variants we cannot merge exactly."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise InputNotFoundError(
            f"no {CONFIG_NAME} in {folder}", hint="name a PEFT adapter folder", path=str(path)
        )
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object", path=str(path))
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise RecipeError(
            f"{folder} is a {kind} adapter; surgery reads LoRA adapters only",
            hint="merge it into its base with peft (merge_and_unload) and pass the merged model",
            path=str(folder),
        )
    for key, what in _VARIANTS.items():
        if raw.get(key):
            raise RecipeError(
                f"{folder} uses {what} ({key} in {CONFIG_NAME}), which surgery does not merge",
                hint="merge it into its base with peft (merge_and_unload) and pass the merged model",
                path=str(folder),
            )
    try:
        return LoraSettings(
            r=int(raw.get("r", 8)),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            target_modules=_names(raw.get("target_modules")),
            exclude_modules=_names(raw.get("exclude_modules")),
            layers_to_transform=_layers(raw.get("layers_to_transform")),
            layers_pattern=_names_tuple(raw.get("layers_pattern")),
            modules_to_save=_names_tuple(raw.get("modules_to_save")) or (),
            lora_bias=bool(raw.get("lora_bias", False)),
            base_model=raw.get("base_model_name_or_path") or None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path} has a malformed field ({exc})", path=str(path)) from None


def _names(value) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(str(v) for v in value)


def _names_tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _layers(value) -> tuple[int, ...] | int | None:
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)
