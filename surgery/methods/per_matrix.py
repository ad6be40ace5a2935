"""The key policy of the per-matrix (spectral) methods, and running a matrix method on any tensor.

METHODS-2 "Key policy": spectral methods apply to 2-D linear weights inside the transformer blocks.
Stacked 3-D expert tensors ([experts, out, in]) get the method per expert slice. Everything else
(embeddings, the LM head, norms, biases, MoE router gates) is ``b + scale * mean_t tau_t``. The policy
text below is what the recipe records, so a merged checkpoint says how each kind of tensor was made.

This module imports nothing heavy at import time: method specs that point at it stay cheap to import.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from surgery.methods.spec import Combine, Operands, Param
from surgery.names import place

# MoE routers are 2-D weights inside a block, but their rows are expert logits, not a linear map whose
# spectrum means anything. `mlp.gate_proj` (a SwiGLU half) must not match.
_ROUTER = re.compile(r"(^|\.)(gate|router|router\.layer|shared_expert_gate)\.weight$")

KEY_POLICY = (
    "2-D weights inside the blocks: per matrix; stacked 3-D expert weights: per expert slice; "
    "embeddings, lm_head, norms, biases, router gates: b + scale * mean_t tau_t"
)


def matrix_role(name: str, ndim: int) -> str:
    """``"matrix"``, ``"experts"`` (per slice) or ``"mean"`` for a tensor with this name and rank."""
    if place(name).position != "block" or _ROUTER.search(name):
        return "mean"
    return {2: "matrix", 3: "experts"}.get(ndim, "mean")


KEY_POLICY_PARAM = Param("key_policy", "fixed", KEY_POLICY, "which tensors get the per-matrix method")


def needs_whole(name: str, shape: tuple[int, ...], params: object = None) -> bool:
    """The engine hands whole tensors only to the tensors the method factors (the rest stream)."""
    return matrix_role(name, len(shape)) != "mean"


def merge_tensor(
    fn: Callable[..., Any],
    name: str,
    base: Any,
    taus: Any,
    *,
    scale: float = 1.0,
    mean_scale: float | None = None,
    **params: Any,
) -> Any:
    """Apply the matrix method ``fn(base, taus, scale=..., **params)`` following the key policy.

    ``base`` has the tensor's shape, ``taus`` one more leading axis (the models). numpy in, numpy out
    (float32); torch in, torch out. Tensors outside the policy get ``b + mean_scale * mean_t tau_t``
    (``mean_scale`` defaults to ``scale``).
    """
    role = matrix_role(name, base.ndim)
    if role == "matrix":
        return fn(base, taus, scale=scale, **params)
    if role == "experts":
        slices = [fn(base[e], taus[:, e], scale=scale, **params) for e in range(base.shape[0])]
        return _stack(slices)
    return mean_update(base, taus, scale=scale if mean_scale is None else mean_scale)


def mean_update(base: Any, taus: Any, *, scale: float = 1.0) -> Any:
    """``b + scale * mean_t tau_t`` in float32."""
    return base + scale * taus.mean(0)


def _stack(parts: list[Any]) -> Any:
    import numpy as np  # lazy: see the module docstring

    if isinstance(parts[0], np.ndarray):
        return np.stack(parts)
    import torch

    return torch.stack(parts)


def require(*modules: str, extra: str = "torch") -> None:
    """Fail before any output is written when an optional dependency is missing."""
    import importlib.util

    from surgery.errors import RecipeError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RecipeError(
            f"this method needs {', '.join(missing)}, which is not installed",
            hint=f"pip install 'model-surgery[{extra}]' (install the CPU wheel of torch first, see README)",
        )


def require_torch(recipe: Any) -> dict:
    """``Method.prepare`` of the per-matrix methods: torch must be importable (no parameters)."""
    require("torch")
    return {}


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "saved": 0}


@contextlib.contextmanager
def one_torch_thread_per_worker() -> Iterator[None]:
    """In the engine's worker threads, run torch single-threaded (restored when the last one ends).

    The engine already runs one tensor per core; torch's own intra-op threads on top of that
    oversubscribe the cores. Measured on the 2-core VM (4 matrices 768 x 512, T = 3, tsv_merge):
    2 workers with 2 torch threads each 14.8 s, with 1 torch thread 9.2 s. A single-worker run
    (the calling thread) keeps torch's default.
    """
    if threading.current_thread() is threading.main_thread():
        yield
        return
    import torch

    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def device_of(backend: Any) -> str | None:
    """torch device of an engine backend: None for the numba CPU backend (torch on CPU)."""
    name = getattr(backend, "name", "cpu")
    return None if name == "cpu" else ("cpu" if name == "torch-cpu" else name)


def combine_for(
    name: str, fn: Callable[..., Any], kwargs: Callable[[Any], dict], *, adds_update: bool = True
) -> Combine:
    """A whole-matrix ``Combine`` running ``fn`` on every tensor under the key policy.

    ``kwargs(params)`` picks the method's own parameters from the job's. With ``adds_update`` the
    engine's ``scale`` (the recipe's, LiNeS folded in) is the method's scale; without it (CART) the
    method reads its multiplier from ``kwargs`` and other tensors get the plain mean (scale 1).
    """

    def apply(be: Any, x: Operands, coeffs: Any, scale: Any, out: Any) -> None:
        base = x.base.reshape(x.shape)
        taus = x.tau.reshape(x.tau.shape[0], *x.shape)
        extra = dict(kwargs(x.params), device=device_of(be))
        if adds_update:
            extra["scale"] = float(scale)
        else:
            extra["mean_scale"] = 1.0
        with one_torch_thread_per_worker():
            result = merge_tensor(fn, x.tensor, base, taus, **extra)
        out[...] = result.reshape(-1)

    return Combine(name, uses_tau=True, adds_update=adds_update, apply=apply, whole_matrix=needs_whole)
