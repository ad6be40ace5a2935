"""NearSwap (mergekit 0.1.5; alchemonaut, QuartetAnemoi): take the fine-tune's value where it is
close to the base's, keep the base where the two are far apart.

Element-wise, with the swap distance ``distance`` (mergekit's ``t``):
    w = clamp(distance / max(|b - f|, 1e-6), 0, 1),    out = w f + (1 - w) b
so entries within ``distance`` of the base become the fine-tune's, farther ones move towards it by
distance / |b - f|. distance = 0 gives the base.
"""

from surgery.methods.spec import Combine, Method, Operands, Param


def _nearswap_apply(be, x: Operands, coeffs, scale, out) -> None:
    """In float32, in mergekit's order of operations, with one temporary row."""
    import numpy as np

    base, model = x.inputs[0], x.models[0]
    np.subtract(base, model, out=out)
    np.abs(out, out=out)
    np.maximum(out, np.float32(1e-6), out=out)
    np.divide(np.float32(x.params["distance"]), out, out=out)
    np.clip(out, np.float32(0.0), np.float32(1.0), out=out)  # out = w
    keep = (np.float32(1.0) - out) * base
    np.multiply(out, model, out=out)
    np.add(out, keep, out=out)


NEARSWAP = Method(
    name="nearswap",
    title="NearSwap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    formula="w = clamp(distance / |b - f|, 0, 1); out = w f + (1 - w) b",
    combine=Combine("nearswap", uses_tau=False, adds_update=False, apply=_nearswap_apply),
    min_models=1,
    max_models=1,
    params=(Param("distance", "float", 0.0001, "entries this close to the base take the model's value"),),
    roles="base: the model kept where far; models: the one model swapped in where near",
)
