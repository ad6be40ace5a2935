"""Arcee Fusion (mergekit 0.1.5, Arcee AI): keep a fine-tune's changes only where they matter most.

For a base b and one fine-tune f, per tensor (rows along the last axis; a 1-D tensor is one row):

    KL_i   = sum_j p_ij log(p_ij / q_ij),  p_i = softmax(f_i) + 1e-8,  q_i = softmax(b_i) + 1e-8
    I_ij   = |f_ij - b_ij| * KL_i                                  (importance)
    theta  = Q2 + 1.5 (Q3 - Q1)      Qk: the element of rank floor(k/4 * (n - 1)) of the sorted I
    out    = b + scale * (f - b) * [I >= theta]

(scale 1 is mergekit's.) The quartiles are exact order statistics of the whole tensor, so the method
takes each tensor whole (``whole_matrix``: a tensor too big for one worker's share of the budget is
an error naming the memory it needs). mergekit estimates them from 1,000,000 entries drawn at random
(with replacement) when a tensor has more; up to that size the two agree. The importance is computed
in float64 (mergekit: in the merge dtype), so an entry within rounding of theta may fall either way.
"""

from surgery.methods.spec import SCALE, Combine, Method, Operands


def fusion_importance(base, model):
    """I = |f - b| * KL(softmax(f) || softmax(b)) per row (float64, the tensors' shape)."""
    import numpy as np

    cols = base.shape[-1] if base.ndim else 1
    b = base.reshape(-1, cols)
    f = model.reshape(-1, cols)
    kl = np.empty(b.shape[0], np.float64)
    for start in range(0, b.shape[0], 256):  # float64 temporaries of 256 rows at a time
        p = _softmax(f[start : start + 256]) + 1e-8
        q = _softmax(b[start : start + 256]) + 1e-8
        kl[start : start + 256] = (p * np.log(p / q)).sum(axis=1)
    diff = np.abs(f.astype(np.float64) - b)
    diff *= kl[:, None]
    return diff.reshape(base.shape)


def _softmax(rows):
    import numpy as np

    x = rows.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def fusion_threshold(importance) -> float:
    """median + 1.5 IQR, each quartile the element of rank floor(q (n - 1)) of the sorted values."""
    import numpy as np

    flat = importance.reshape(-1)
    n = flat.size
    at = [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]
    q1, median, q3 = np.partition(flat, at)[at]
    return float(median + 1.5 * (q3 - q1))


def _fusion_apply(be, x: Operands, coeffs, scale, out) -> None:
    import numpy as np

    base, model = x.inputs[0], x.models[0]
    importance = fusion_importance(base.reshape(x.shape), model.reshape(x.shape)).reshape(-1)
    keep = importance >= fusion_threshold(importance)
    del importance
    update = np.where(keep, x.tau[0], np.float32(0.0))
    np.add(x.base, np.float32(scale) * update, out=out)


ARCEE_FUSION = Method(
    name="arcee_fusion",
    title="Arcee Fusion (keep the changes of highest importance)",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    formula="out = b + scale * (f - b) * [|f - b| KL(softmax f || softmax b) >= Q2 + 1.5 (Q3 - Q1)]",
    combine=Combine("arcee_fusion", uses_tau=True, adds_update=True, apply=_fusion_apply, whole_matrix=True),
    min_models=1,
    max_models=1,
    params=(SCALE,),
    roles="base: the model kept where the change is unimportant; models: the one fine-tune",
)
