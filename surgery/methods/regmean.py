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

from typing import Any

ALPHA = 0.9


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
