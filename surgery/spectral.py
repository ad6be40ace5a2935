"""The per-matrix spectral core: thin and truncated SVD, the polar factor, spectrum rules.

Every spectral method (TSV-M, Iso-C/CTS, CART, STAR, LoRA extraction) is built from these few
pieces. Inputs are numpy arrays or torch tensors of shape ``[m, n]``; results come back in the same
kind (numpy in, numpy out). The linear algebra is torch.linalg for both: LAPACK/BLAS on CPU, cuSOLVER
/ cuBLAS when ``device="cuda"`` (or the tensor already lives there), so CPU and CUDA run one code path.

Precision: matrices are factored in float32 (an SVD is backward stable: errors ~1e-6 of s_max), and
float64 is used where float32 would lose digits that matter:

* the Gram route of the polar factor squares the condition number, so it runs in float64;
* the small core SVD of the randomized method runs in float64 (it is tiny: [k, n]);
* rank rules sum spectra in float64.

The randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4) draws its test matrix on the
CPU from a seeded generator, so the same seed gives the same sketch on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from surgery.errors import RecipeError

POLAR_ROUTES = ("svd", "gram")
SVD_METHODS = ("auto", "exact", "randomized")
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 3


@dataclass(frozen=True)
class SVD:
    """A (possibly truncated) thin SVD ``a ~ u @ diag(s) @ vh``: u [m, k], s [k] descending, vh [k, n].

    Fields are numpy arrays or torch tensors, the kind of the factored input.
    """

    u: Any
    s: Any
    vh: Any

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def truncate(self, k: int) -> SVD:
        """The best rank-``k`` part (Eckart-Young): the first ``k`` triplets."""
        k = max(0, min(int(k), self.rank))
        return SVD(self.u[:, :k], self.s[:k], self.vh[:k, :])

    def with_spectrum(self, s: Any) -> SVD:
        """The same singular vectors with another spectrum (an edit such as flattening)."""
        if tuple(s.shape) != tuple(self.s.shape):
            raise ValueError(f"spectrum of shape {tuple(s.shape)} for an SVD of rank {self.rank}")
        return SVD(self.u, s, self.vh)

    def matrix(self) -> Any:
        """``u @ diag(s) @ vh``."""
        return (self.u * self.s[None, :]) @ self.vh


# --- conversions -------------------------------------------------------------------------------


def to_torch(a: Any, device: str | torch.device | None = None) -> torch.Tensor:
    """A numpy array (zero-copy) or tensor as a float32/float64 torch tensor, on ``device`` if given."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(a).__name__}")
    if device is not None:
        t = t.to(device)
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def like(t: torch.Tensor, ref: Any, dtype: torch.dtype = torch.float32) -> Any:
    """``t`` cast to ``dtype``, as numpy on the CPU when ``ref`` is numpy, else as a tensor."""
    t = t.to(dtype)
    return t.cpu().numpy() if isinstance(ref, np.ndarray) else t


def _as_torch(a: Any, device: str | torch.device | None) -> torch.Tensor:
    t = to_torch(a, device)
    if t.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(t.shape)}")
    return t


def _svd_like(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, ref: Any) -> SVD:
    return SVD(like(u, ref), like(s, ref), like(vh, ref))


# --- SVDs --------------------------------------------------------------------------------------


def thin_svd(a: Any, *, device: str | None = None) -> SVD:
    """Thin SVD of ``a`` (k = min(m, n) triplets), singular values descending, float32."""
    t = _as_torch(a, device)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    return _svd_like(u, s, vh, a)


def truncated_svd(
    a: Any,
    rank: int,
    *,
    method: str = "auto",
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    device: str | None = None,
) -> SVD:
    """The top ``rank`` singular triplets of ``a``.

    ``method="exact"`` truncates the thin SVD; ``"randomized"`` sketches the range with
    ``rank + oversample`` Gaussian vectors and ``power_iters`` power iterations (re-orthonormalised
    each time, so small singular values are not lost to rounding); ``"auto"`` picks randomized when
    the sketch is at most a quarter of min(m, n), where it is several times cheaper.
    """
    if method not in SVD_METHODS:
        raise RecipeError(f"unknown SVD method {method!r}", hint=f"choose one of: {', '.join(SVD_METHODS)}")
    t = _as_torch(a, device)
    m, n = t.shape
    full = min(m, n)
    rank = int(rank)
    if rank < 1:
        raise RecipeError(f"SVD rank must be at least 1, got {rank}", hint="pass a positive rank")
    rank = min(rank, full)
    sketch = min(rank + max(0, int(oversample)), full)
    if method == "exact" or (method == "auto" and 4 * sketch > full):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        return _svd_like(u[:, :rank], s[:rank], vh[:rank, :], a)
    u, s, vh = _randomized(t, rank, sketch, power_iters, seed)
    return _svd_like(u, s, vh, a)


def _randomized(
    t: torch.Tensor, rank: int, sketch: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(t.shape[1], sketch, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
    q, _ = torch.linalg.qr(t @ omega)
    for _ in range(max(0, int(power_iters))):
        w, _ = torch.linalg.qr(t.T @ q)
        q, _ = torch.linalg.qr(t @ w)
    b = (q.T @ t).to(torch.float64)  # [sketch, n]: small, so factor it in float64
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q.to(torch.float64) @ ub[:, :rank]
    return u, s[:rank], vh[:rank, :]


# --- the polar factor --------------------------------------------------------------------------


def polar_factor(a: Any, *, route: str = "svd", device: str | None = None) -> Any:
    """The orthogonal polar factor ``Q`` of ``a`` (a = Q P), i.e. ``U V^T`` of its thin SVD.

    ``Q`` is the matrix with orthonormal columns (m >= n) or rows (m < n) nearest to ``a``.
    ``route="svd"`` takes it from the thin SVD (works for any ``a``); ``route="gram"`` from the
    eigendecomposition of the smaller Gram matrix in float64, ``Q = a (a^T a)^(-1/2)``: cheaper for
    tall matrices, defined only when ``a`` has full rank (else a clear error).
    """
    if route not in POLAR_ROUTES:
        raise RecipeError(f"unknown polar route {route!r}", hint=f"choose one of: {', '.join(POLAR_ROUTES)}")
    t = _as_torch(a, device)
    if route == "svd":
        u, _, vh = torch.linalg.svd(t, full_matrices=False)
        return like(u @ vh, a)
    tall = t.shape[0] >= t.shape[1]
    x = (t if tall else t.T).to(torch.float64)
    lam, vecs = torch.linalg.eigh(x.T @ x)
    floor = torch.finfo(torch.float32).eps * lam.abs().max()
    if lam.numel() and bool(lam.min() <= floor):
        raise ValueError(
            "polar factor by the Gram route needs a full-rank matrix; use route='svd' for this one"
        )
    q = x @ ((vecs / lam.sqrt()[None, :]) @ vecs.T)
    return like(q if tall else q.T, a)


def orthogonal_union(parts: list[SVD], min_s: float | None = None) -> SVD | None:
    """The parts' singular triplets side by side, both bases replaced by their polar factors.

    ``U = polar([U_1 | ... | U_T])``, ``s = [s_1; ...; s_T]``, ``V^T = polar([V_1^T; ...; V_T^T])``: the
    nearest orthonormal bases to the union of several subspaces (TSV-M, Iso-CTS). Triplets with
    ``s <= min_s`` are dropped before the polar step (their vectors are arbitrary). None when no
    triplet is left. Torch tensors in and out.
    """
    s = torch.cat([p.s for p in parts])
    keep = None if min_s is None else s > min_s
    if keep is not None:
        s = s[keep]
    if s.numel() == 0:
        return None
    u = torch.cat([p.u for p in parts], dim=1)
    vh = torch.cat([p.vh for p in parts], dim=0)
    if keep is not None:
        u, vh = u[:, keep], vh[keep, :]
    return SVD(polar_factor(u), s, polar_factor(vh))


# --- rank rules and spectrum edits -------------------------------------------------------------


def _s64(s: Any) -> np.ndarray:
    if isinstance(s, torch.Tensor):
        s = s.detach().cpu().numpy()
    return np.asarray(s, dtype=np.float64)


def numerical_rank(s: Any, rtol: float | None = None) -> int:
    """How many singular values exceed ``rtol * s_max`` (default: float32 eps x len(s)).

    Iso-C flattens the spectrum only over this rank, so a rank-deficient sum of task vectors (LoRA-like
    updates) does not get arbitrary null-space directions at the mean singular value.
    """
    v = _s64(s)
    if v.size == 0 or v.max() <= 0:
        return 0
    tol = (np.finfo(np.float32).eps * v.size) if rtol is None else float(rtol)
    return int(np.count_nonzero(v > tol * v.max()))


def energy_rank(s: Any, fraction: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= fraction * sum s_i^2 (at least 1 when s is not all zero)."""
    return _cumulative_rank(_s64(s) ** 2, fraction)


def nuclear_rank(s: Any, fraction: float) -> int:
    """Smallest r with sum_{i<=r} s_i >= fraction * sum s_i (STAR's eta rule)."""
    return _cumulative_rank(_s64(s), fraction)


def _cumulative_rank(weights: np.ndarray, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise RecipeError(f"fraction must be in (0, 1], got {fraction}", hint="e.g. 0.4 keeps 40%")
    total = weights.sum()
    if total <= 0:
        return 0
    cum = np.cumsum(weights)
    # A relative slack so fraction=1 is met despite rounding in the running sum.
    r = int(np.searchsorted(cum, fraction * total * (1 - 1e-12), side="left")) + 1
    return min(r, weights.size)


def tail_energy(s: Any, rank: int) -> float:
    """sum_{i>rank} s_i^2: the squared Frobenius error of the best rank-``rank`` approximation."""
    return float((_s64(s)[int(rank) :] ** 2).sum())


def flat_spectrum(s: Any, rank: int | None = None) -> Any:
    """Iso's edit: the first ``rank`` values (default all) replaced by their mean, the rest zero."""
    k = s.shape[0] if rank is None else max(0, min(int(rank), s.shape[0]))
    out = s * 0
    if k:
        out[:k] = float(_s64(s[:k]).mean())
    return out


def rescaled_to_nuclear(s: Any, k: int) -> Any:
    """STAR's edit: keep the first ``k`` values, scaled so their sum equals the sum of all of ``s``."""
    v = _s64(s)
    kept = v[:k].sum()
    out = s * 0
    if k and kept > 0:
        out[:k] = s[:k] * float(v.sum() / kept)
    return out
