"""RegMean: dataless knowledge fusion by merging weights of language models (Jin et al., ICLR 2023,
arXiv 2212.09849). Needs calibration inputs (:mod:`surgery.calibration`).

For each linear layer y = x W^T (W is out x in), with G_t = X_t^T X_t the Gram of that layer's inputs
when fine-tune t runs on its own calibration texts:
    G~_t = a G_t + (1 - a) diag(G_t)            (a = alpha, default 0.9: shrink the off-diagonal)
    W*   = (sum_t W_t G~_t) (sum_t G~_t)^-1     (a float64 linear solve, never an inverse)
RegMean merges the fine-tunes f_t themselves, not task vectors. Tensors without a Gram (norms,
embeddings, biases, the head) are the mean of the f_t. An input dimension that no model ever
activates (a zero row and column in every Gram) leaves its weight column unconstrained: it gets the
mean of the models' columns (our choice; a plain solve would fail on the singular system).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.methods.spec import Combine, Method, Operands, Param
from surgery.names import place

ALPHA = 0.9
MAX_LENGTH = 512  # = surgery.calibration.MAX_LENGTH (not imported: that module needs torch)
KEY_POLICY = (
    "block linear weights with calibration Grams: RegMean solve; every other tensor (embeddings, "
    "lm_head, norms, biases, weights without a Gram): mean_t f_t"
)


def regmean_solve(weights: Any, grams: Any, *, alpha: float = ALPHA, layout: str = "out_in") -> Any:
    """W* for one layer: ``weights`` [T, out, in] (``layout="in_out"``: [T, in, out], GPT-2's Conv1D),
    ``grams`` [T, in, in]; numpy or torch. Returns float32 in the weights' layout and kind."""
    import torch

    from surgery import spectral

    w = spectral.to_torch(weights).double()
    if layout == "in_out":
        w = w.transpose(1, 2)
    g = spectral.to_torch(grams, w.device).double()
    diag = torch.diagonal(g, dim1=1, dim2=2)
    shrunk = alpha * g + (1 - alpha) * torch.diag_embed(diag)
    lhs = shrunk.sum(0)  # [in, in]
    rhs = torch.einsum("toi,tij->oj", w, shrunk)  # sum_t W_t G~_t  [out, in]
    dead = torch.diagonal(lhs) <= 0
    if bool(dead.any()):
        lhs[dead, dead] = float(w.shape[0])
        rhs[:, dead] = w[:, :, dead].sum(0)
    merged = torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric: W* lhs = rhs
    if layout == "in_out":
        merged = merged.T
    return spectral.like(merged, weights)


def _prepare(recipe: Any) -> dict:
    """The calibration pass (or the cache): one Gram folder per model, in model order."""
    from surgery.methods.per_matrix import require

    require("torch", "transformers", "safetensors", extra="calibration")
    from surgery.calibration import collect_grams

    params = recipe.parameters
    folders = [
        str(collect_grams(model, data, max_length=int(params["max_length"])).folder)
        for model, data in zip(recipe.models, params["calibration"])
    ]
    return {"gram_sets": tuple(folders)}


def _gram_set(folder: str):
    from surgery.calibration import GramSet

    cached = _SETS.get(folder)
    if cached is None:
        cached = _SETS[folder] = GramSet.load(Path(folder))
    return cached


_SETS: dict = {}  # Gram folder -> GramSet (its index is read once per process)


def _whole(name: str, shape: tuple[int, ...], params: object = None) -> bool:
    return len(shape) == 2 and place(name).position == "block"


def _apply(be: Any, x: Operands, coeffs: Any, scale: Any, out: Any) -> None:
    models = x.models.reshape(x.models.shape[0], *x.shape)
    sets = [_gram_set(f) for f in x.params["gram_sets"]]
    have = [x.tensor in s.uses for s in sets]
    if not any(have):
        out[...] = models.mean(0).reshape(-1)
        return
    if not all(have) or len({s.layouts[x.tensor] for s in sets}) != 1:
        from surgery.errors import IncompatibleTensorsError

        raise IncompatibleTensorsError(
            f"tensor {x.tensor!r} has calibration Grams for some models only",
            hint="RegMean needs models of one architecture",
            tensor=x.tensor,
        )
    import torch

    from surgery.methods.per_matrix import one_torch_thread_per_worker

    grams = torch.stack([s.gram(x.tensor) for s in sets])
    with one_torch_thread_per_worker():
        merged = regmean_solve(
            models, grams, alpha=float(x.params["regmean_alpha"]), layout=sets[0].layouts[x.tensor]
        )
    out[...] = merged.reshape(-1)


REGMEAN = Method(
    name="regmean",
    title="RegMean (regression mean, calibration data)",
    paper="https://arxiv.org/abs/2212.09849",
    formula="per block linear layer: W* = (sum_t W_t G~_t)(sum_t G~_t)^-1, G~_t = a G_t + (1-a) diag(G_t), "
    "G_t = X_t^T X_t on model t's calibration texts; other tensors: mean_t f_t",
    combine=Combine("regmean", uses_tau=False, adds_update=False, apply=_apply, whole_matrix=_whole),
    params=(
        Param("calibration", "files", None, "calibration texts, one file per model (JSONL `text` or lines)"),
        Param("regmean_alpha", "float", ALPHA, "scale of the Grams' off-diagonal (RegMean's alpha)"),
        Param("max_length", "int", MAX_LENGTH, "tokens per calibration text (longer texts are cut)"),
        Param("key_policy", "fixed", KEY_POLICY, "which tensors get the RegMean solve"),
    ),
    needs_base=False,
    prepare=_prepare,
    roles="base (optional): not used by the solve; models: the fine-tunes merged, one calibration file each",
)
