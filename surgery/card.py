"""Model cards: reading ``base_model`` from the inputs' cards and writing the output's card."""

from __future__ import annotations

from pathlib import Path

import yaml

from surgery.errors import InputNotFoundError, RecipeError


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


def base_from_cards(models: list[str]) -> str:
    """The base that every fine-tune's model card names as ``base_model``.

    A local path in a card is resolved against the fine-tune's folder, then the current directory.
    """
    found: dict[str, str] = {}
    for model in models:
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        base = front_matter(folder / "README.md").get("base_model")
        if isinstance(base, list) and len(base) == 1:
            base = base[0]
        if not isinstance(base, str) or not base:
            raise RecipeError(
                f"{model} has no single base_model in its model card (README.md)",
                hint="pass --base BASE",
            )
        for candidate in (folder / base, Path(base)):
            if candidate.exists():
                base = str(candidate.resolve())
                break
        found[model] = base
    distinct = sorted(set(found.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{m} -> {b}" for m, b in found.items())
        raise RecipeError(
            f"the fine-tunes' model cards name different bases ({listing})",
            hint="pass --base BASE to choose one",
        )
    base = distinct[0]
    if not Path(base).exists():
        raise InputNotFoundError(
            f"the model cards name base {base!r}, which is not a local folder",
            hint="download it and pass --base PATH",
            path=base,
        )
    return base


def render_card(
    method_title: str, method_name: str, paper: str, formula: str, inputs: list[str],
    recipe_yaml: str, parameters: dict, lines: dict | None = None, relation: str = "merge",
) -> str:  # fmt: skip
    """Card text: front matter the Hub understands, then what was done and how to redo it.

    ``lines``: the LiNeS schedule with the alpha and beta actually used.
    """
    tags = ["model-surgery", relation, method_name] + (["lines"] if lines else [])
    meta = {
        "base_model": list(inputs),
        "base_model_relation": relation,
        "library_name": "transformers",
        "tags": tags,
    }
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in parameters.items()) or "| (none) | |"
    models = "\n".join(f"- `{m}`" for m in inputs)
    return (
        "---\n"
        + yaml.safe_dump(meta, sort_keys=False)
        + "---\n\n"
        + f"# {method_title}\n\n"
        + f"Made with [model-surgery](https://pypi.org/project/model-surgery/) using **{method_title}** "
        + f"([paper]({paper})):\n\n    {formula}\n\n"
        + f"## Inputs\n\n{models}\n\n"
        + f"## Parameters\n\n| parameter | value |\n|---|---|\n{params}\n\n"
        + _lines_section(lines)
        + "## Recipe\n\nReproduce with `surgery run surgery_recipe.yaml -o OUT`:\n\n"
        + f"```yaml\n{recipe_yaml}```\n"
    )


def _lines_section(lines: dict | None) -> str:
    if not lines:
        return ""
    return (
        "## LiNeS layer scaling ([paper](https://arxiv.org/abs/2410.17146))\n\n"
        "Each tensor's update was scaled by its block depth: "
        f"`lambda(l) = {lines['alpha']:.6g} + {lines['beta']:.6g} * l / (L - 1)`; tensors outside the "
        f"blocks: `{lines['outside']}`. Requested alpha: `{lines['requested_alpha']}`.\n\n"
    )
