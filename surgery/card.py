"""Model cards: the output's card (``base_model`` of the inputs' cards is read in surgery.bases)."""

from __future__ import annotations

from pathlib import Path

from surgery.bases import front_matter
from surgery.files import CARD
from surgery.hub import HubRef, hub_ref
from surgery.methods.lines import PAPER as LINES_PAPER
from surgery.methods.lines import LinesResolved
from surgery.recipe import Recipe


def _lines_section(lines: LinesResolved | None) -> str:
    if not lines:
        return ""
    return (
        f"## LiNeS layer scaling ([paper]({LINES_PAPER}))\n\n"
        "Each tensor's update was scaled by its block depth: "
        f"`lambda(l) = {lines.alpha:.6g} + {lines.beta:.6g} * l / (L - 1)`; tensors outside the "
        f"blocks: `{lines.outside}`. Requested alpha: `{lines.requested_alpha}`.\n\n"
    )


def card_for(recipe: Recipe, lines: LinesResolved | None = None) -> str:
    """The model card of an output of ``recipe`` (``lines``: the LiNeS schedule the run resolved)."""
    spec = recipe.spec
    relation = "merge" if spec.command == "merge" and len(recipe.models) > 1 else "finetune"
    return render_card(spec.title, spec.name, spec.paper, spec.formula, list(recipe.inputs),
                       recipe.to_yaml(), recipe.parameters, lines, relation)  # fmt: skip


def render_card(
    method_title: str, method_name: str, paper: str, formula: str, inputs: list[str],
    recipe_yaml: str, parameters: dict, lines: LinesResolved | None = None, relation: str = "merge",
) -> str:  # fmt: skip
    """The output's model card.

    Front matter from ``huggingface_hub.ModelCardData``: ``base_model`` lists the inputs that are Hub
    repos (local paths are not valid there; the body lists them), ``license`` when every input's card
    declares the same one. The body says what was done and holds the recipe that redoes it.
    """
    refs = [(source, hub_ref(source)) for source in inputs]
    bases = list(dict.fromkeys(ref.repo_id for _, ref in refs if ref is not None))
    license_fields = _agreed_license(inputs)
    meta: dict = {}
    if bases:
        meta["base_model"] = bases
        meta["base_model_relation"] = relation
    meta.update(license_fields)
    meta["library_name"] = "transformers"
    meta["tags"] = ["model-surgery", relation, method_name] + (["lines"] if lines else [])
    front = _front_matter(meta)
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in parameters.items()) or "| (none) | |"
    listed = "\n".join(_input_line(source, ref) for source, ref in refs)
    license_note = ""
    if not license_fields:
        license_note = (
            "## License\n\nThe inputs' model cards do not all declare the same license: check each input's "
            "terms before sharing this model.\n\n"
        )
    text = (
        f"---\n{front}---\n\n"
        + f"# {method_title}\n\n"
        + f"Made with [model-surgery](https://pypi.org/project/model-surgery/) using **{method_title}** "
        + f"([paper]({paper})):\n\n    {formula}\n\n"
        + f"## Inputs\n\n{listed}\n\n"
        + f"## Parameters\n\n| parameter | value |\n|---|---|\n{params}\n\n"
        + _lines_section(lines)
        + license_note
        + "## Recipe\n\nReproduce with `surgery run surgery_recipe.yaml -o OUT`:\n\n"
        + f"```yaml\n{recipe_yaml}```\n"
    )
    _check_round_trip(text, bases)
    return text


def _front_matter(meta: dict) -> str:
    try:
        from huggingface_hub import ModelCardData
    except ImportError:  # the same keys, written without the library
        import yaml

        return yaml.safe_dump(meta, sort_keys=False)
    data = ModelCardData(
        base_model=meta.get("base_model"),
        license=meta.get("license"),
        license_name=meta.get("license_name"),
        license_link=meta.get("license_link"),
        library_name=meta["library_name"],
        tags=meta["tags"],
        **({"base_model_relation": meta["base_model_relation"]} if "base_model_relation" in meta else {}),
    )
    return data.to_yaml() + "\n"


def _check_round_trip(text: str, bases: list[str]) -> None:
    """The card must parse back with huggingface_hub's own tools, base_model entries valid repo ids."""
    try:
        from huggingface_hub import ModelCard
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        return
    data = ModelCard(text).data
    assert (data.base_model or []) == bases, (data.base_model, bases)
    for base in bases:
        validate_repo_id(base)


def _input_line(source: str, ref: HubRef | None) -> str:
    if ref is None:
        return f"- `{source}` (local path, not on the Hub)"
    at = f" at revision `{ref.revision}`" if ref.revision else ""
    return f"- [{ref.repo_id}](https://huggingface.co/{ref.repo_id}){at}"


def _agreed_license(inputs: list[str]) -> dict:
    """``license`` (with ``license_name``/``license_link`` for "other") when every input's card agrees."""
    found = set()
    for source in inputs:
        readme = _cached_card(source)
        data = front_matter(readme) if readme is not None else {}
        lic = data.get("license")
        if not isinstance(lic, str) or not lic:
            return {}
        found.add((lic, data.get("license_name"), data.get("license_link")))
    if len(found) != 1:
        return {}
    lic, name, link = found.pop()
    out = {"license": lic}
    if isinstance(name, str) and name:
        out["license_name"] = name
    if isinstance(link, str) and link:
        out["license_link"] = link
    return out


def _cached_card(source: str) -> Path | None:
    """An input's README.md: beside a local checkpoint, or in the Hub cache (never a network call)."""
    ref = hub_ref(source)
    if ref is None:
        path = Path(source).expanduser()
        return (path if path.is_dir() else path.parent) / CARD
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(ref.repo_id, CARD, revision=ref.revision)
    return Path(found) if isinstance(found, str) else None
