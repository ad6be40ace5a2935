"""model-surgery: streaming checkpoint surgery on safetensors files.

Library entry points (nothing here prints or exits)::

    from surgery import make_recipe, merge, EngineOptions
    recipe = make_recipe("breadcrumbs", ["ft_a", "ft_b"], base="base")
    merge(recipe, "merged/", EngineOptions(max_memory=2 * 2**30))
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["EngineOptions", "__version__", "make_recipe", "load_recipe", "merge", "open_checkpoint"]


def __getattr__(name: str):  # lazy: `surgery --help` must not import numba
    if name in ("EngineOptions", "merge"):
        from surgery import engine

        return getattr(engine, name)
    if name in ("make_recipe", "load_recipe"):
        from surgery import recipe

        return getattr(recipe, name)
    if name == "open_checkpoint":
        from surgery.checkpoint import open_checkpoint

        return open_checkpoint
    raise AttributeError(name)
