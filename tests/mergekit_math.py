"""mergekit 0.1.5's NearSwap, NuSLERP, Multi-SLERP, Karcher and SCE re-derived step by step as mergekit
computes them (whole tensors, float64 numpy; Multi-SLERP keeps mergekit's tangent-space round trip that
the engine proves away), for the method tests and the mergekit-config tests."""

from __future__ import annotations

import numpy as np


def nearswap_ref(b, f, t):
    w = np.clip(t / np.maximum(np.abs(b - f), 1e-6), 0, 1)
    return w * f + (1 - w) * b


def nuslerp_ref(t, v0, v1, axis=None):
    """Slerp per vector along ``axis`` (None: the flattened tensors)."""
    shape = v0.shape
    if axis is None:
        a, c = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        a, c = np.moveaxis(v0, axis, -1), np.moveaxis(v1, axis, -1)
        moved = a.shape
        a, c = a.reshape(-1, moved[-1]), c.reshape(-1, moved[-1])
    a, c = a.astype(np.float64), c.astype(np.float64)
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        ua = a[i] / max(np.linalg.norm(a[i]), 1e-7)
        uc = c[i] / max(np.linalg.norm(c[i]), 1e-7)
        cos = np.clip(ua @ uc, -1, 1)
        if 1 - cos**2 <= 1e-16:
            out[i] = (1 - t) * a[i] + t * c[i]
        else:
            th = np.arccos(cos)
            out[i] = (np.sin((1 - t) * th) * a[i] + np.sin(t * th) * c[i]) / np.sin(th)
    if axis is None:
        return out.reshape(shape)
    return np.moveaxis(out.reshape(moved), -1, axis)


def multislerp_ref(vs, w, eps=1e-8, normalize=True):
    """mergekit's tangent-space construction, literally (the tangent mean is kept, not dropped)."""
    x = np.stack([v.ravel() for v in vs]).astype(np.float64)
    w = np.asarray(w, np.float64)
    w = w / np.sum(w) if normalize else w
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    dots = (u * mean).sum(-1, keepdims=True)
    tangent = ((u - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    return (res * (norms[:, 0] * w).sum()).reshape(vs[0].shape)


def karcher_ref(vs, max_iter=10, tol=1e-5):
    x = [v.ravel().astype(np.float64) for v in vs]
    n = len(x)
    norms = [np.linalg.norm(v) for v in x]
    units = [v / nv if nv > 0 else np.zeros_like(v) for v, nv in zip(x, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    a = 1.0 / len(valid)
    mean = sum(a * units[i] for i in valid)
    mean = units[valid[0]].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            dot = np.clip(mean @ units[i], -1, 1)
            th = np.arccos(dot)
            if th < tol:
                continue
            tangent += a * (th / np.sin(th)) * (units[i] - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        if np.linalg.norm(mean) > tol:
            mean /= np.linalg.norm(mean)
    return (sum(norms) / n * mean).reshape(vs[0].shape)


def sce_ref(b, fs, topk):
    tvs = np.stack([f - b for f in fs]).astype(np.float64)
    flat = tvs.reshape(len(fs), -1)
    if topk < 1:
        var = flat.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        order = sorted(range(var.size), key=lambda i: (-var[i], i))
        mask = np.zeros(var.size)
        mask[order[:k]] = 1
        flat = flat * mask
    sign = np.where(flat.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(flat) == sign
    means = (flat**2).mean(1)
    w = np.full(len(fs), 1 / len(fs)) if abs(means.sum()) < 1e-6 else means / means.sum()
    ew = w[:, None] * erase
    merged = (flat * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)
    return b + merged.reshape(b.shape)


def model_stock_ref(b, fs, filter_wise=False):
    """mergekit's model_stock: k from the mean pairwise cosine of the offsets, per row (vectors along
    the last axis; a 1-D tensor is one row) with filter_wise, else over the flattened tensor."""
    b = b.astype(np.float64)
    fs = [f.astype(np.float64) for f in fs]
    shape = b.shape
    if filter_wise:
        w0 = b.reshape(1, -1) if b.ndim == 1 else b.reshape(-1, shape[-1])
        ws = [f.reshape(w0.shape) for f in fs]
    else:
        w0, ws = b.reshape(1, -1), [f.reshape(1, -1) for f in fs]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for c in offsets[i + 1 :]:
            norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1)
            cosines.append(np.clip((a * c).sum(-1) / np.maximum(norm, 1e-6), -1, 1))
    cos = np.mean(cosines, axis=0)[:, None]
    n = len(ws)
    den = 1 + (n - 1) * cos
    k = np.where(np.abs(den) < 1e-6, 0.0, n * cos / np.where(np.abs(den) < 1e-6, 1.0, den))
    return (k * (sum(ws) / n) + (1 - k) * w0).reshape(shape)


def magnitude_outliers_ref(delta, density, gamma):
    """mergekit's magnitude_outliers: ascending sort, drop the n_bot smallest, keep int(density n)."""
    if density >= 1:
        return delta
    flat = delta.ravel()
    n = flat.size
    keep, top = int(density * n), int(gamma * n)
    n_bot = max(0, n - keep - top)
    order = np.argsort(np.abs(flat), kind="stable")
    mask = np.zeros(n)
    mask[order[n_bot : n_bot + keep]] = 1
    return (flat * mask).reshape(delta.shape)


def magnitude_ref(delta, density):
    """mergekit's magnitude (TIES' trim): the max(1, int(density n)) largest |delta|."""
    if density >= 1:
        return delta
    flat = delta.ravel()
    k = max(1, int(density * flat.size))
    order = np.argsort(-np.abs(flat), kind="stable")
    mask = np.zeros(flat.size)
    mask[order[:k]] = 1
    return (flat * mask).reshape(delta.shape)
