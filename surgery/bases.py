"""Which base a fine-tune was made from: the ``base_model`` its model card names.

``surgery merge`` without ``--base`` (and a recipe without ``base:``) takes the base every fine-tune's
card names; an explicit base that no card names is allowed but worth a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from surgery.errors import InputNotFoundError, RecipeError, SurgeryError
from surgery.files import ADAPTER_CONFIG, CARD
from surgery.hub import parse_hub_id, resolve


def front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (``---`` ... ``---``), or {} when there is none."""
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def adapter_base(folder: Path) -> str | None:
    """A PEFT adapter folder's ``base_model_name_or_path`` (None: not an adapter, or none named)."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return None  # opening the adapter reports the broken file
    return base if isinstance(base, str) and base else None


def card_base(model: str) -> str | None:
    """The base that ``model``'s card names as ``base_model`` (a LoRA adapter: the
    ``base_model_name_or_path`` of its adapter_config.json first): a local folder (a relative path is
    resolved against the fine-tune's folder, never the current directory), else a Hub id; None when
    the card names no single base."""
    root = resolve(model)  # a Hub fine-tune: its card comes with it
    if not root.exists():
        raise InputNotFoundError(f"{model}: no such folder or file", hint="check the path", path=str(model))
    folder = root if root.is_dir() else root.parent
    base = adapter_base(folder) or front_matter(folder / CARD).get("base_model")
    if isinstance(base, list) and len(base) == 1:
        base = base[0]
    if not isinstance(base, str) or not base:
        return None
    local = folder / Path(base).expanduser()
    if local.exists():
        return str(local.resolve())
    if parse_hub_id(base) is not None and not base.startswith((".", "/", "~")):
        return base
    raise InputNotFoundError(
        f"the model card of {model} names base {base!r}, which is not a folder beside it "
        f"({local} does not exist) nor a Hub id",
        hint="fix base_model in its README.md, or name the base explicitly",
        path=str(local),
    )


def base_from_cards(models: list[str], explicit: str = "pass --base BASE") -> str:
    """The base that every fine-tune's model card names as ``base_model``.

    ``explicit`` says how the user names a base instead (it goes into the hints).
    """
    for model in models:  # a typo in any input is reported as such, before any card is read
        if not resolve(model).exists():
            raise InputNotFoundError(
                f"{model}: no such folder or file", hint="check the path", path=str(model)
            )
    found: dict[str, str] = {}
    for model in models:
        base = card_base(model)
        if base is None:
            raise RecipeError(
                f"{model} has no single base_model in its model card (README.md)", hint=explicit
            )
        found[model] = base
    distinct = sorted(set(found.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{m} -> {b}" for m, b in found.items())
        raise RecipeError(
            f"the fine-tunes' model cards name different bases ({listing})",
            hint=f"{explicit} to choose one",
        )
    return distinct[0]


def contradicting_cards(base: str, models: list[str]) -> dict[str, str]:
    """{model: the base its card names} when every card names a base and none of them is ``base``
    (an explicit base that may be the wrong one); {} otherwise. Card problems are not errors here:
    the user named the base."""
    named: dict[str, str] = {}
    for model in models:
        try:
            card = card_base(model)
        except SurgeryError:
            return {}
        if card is None:
            return {}
        named[model] = card
    chosen = Path(base).expanduser()
    chosen_key = str(chosen.resolve()) if chosen.exists() else base
    if any(card == chosen_key for card in named.values()):
        return {}
    return named
