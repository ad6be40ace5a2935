"""WUDI merging, data-free (Cheng et al., ICML 2025, arXiv 2503.08099).

Per matrix, minimise L(X) = sum_t w_t || (X - tau_t) tau_t^T ||_F^2 starting from X = sum_t tau_t,
then out = b + scale * X (the paper has no scale: 1.0).

Reference solver ("adam", the default): the authors' iteration, Adam with lr 1e-5 for 300 steps and
w_t = 1 / ||tau_t||_F (their code; FusionBench uses 1 / ||tau_t||_F^2 and 400 steps: ``weight_power``
and ``steps`` select either). Instead of autograd on the loss we use its equal closed gradient
grad = 2 (X G - B) with G = sum_t w_t tau_t^T tau_t [n, n] and B = sum_t w_t tau_t tau_t^T tau_t
[m, n], both computed once, so a step costs one GEMM; the Adam update is torch.optim.Adam's.
The test suite checks this against torch.optim.Adam on the literal loss.

Closed form ("closed", an option): the stationary point X* = B G^+ (RegMean's normal equations with
task vectors as the inputs), by a float64 eigendecomposition of G (pseudo-inverse on its numerical
range). The early-stopped iteration is NOT at X*: with lr 1e-5, 300 steps move X by at most ~3e-3
per entry. Both are offered; they are different merges (see the README for how far apart they are).
"""

from __future__ import annotations

from typing import Any

from surgery.methods.per_matrix import KEY_POLICY_PARAM, combine_for, require_torch
from surgery.methods.spec import SCALE, Method, Param

LR = 1e-5
STEPS = 300
WEIGHT_POWER = 1
SOLVERS = ("adam", "closed")
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, as the authors use


def wudi_merge(
    base: Any,
    taus: Any,
    *,
    scale: float = 1.0,
    solver: str = "adam",
    steps: int = STEPS,
    lr: float = LR,
    weight_power: int = WEIGHT_POWER,
    device: str | None = None,
) -> Any:
    """WUDI of one matrix: ``base`` [m, n], ``taus`` [T, m, n]; numpy or torch, same kind out."""
    from surgery import spectral

    b = spectral.to_torch(base, device)
    tau = spectral.to_torch(taus, b.device).to(b.dtype)
    x = wudi_closed(tau, weight_power) if solver == "closed" else wudi_adam(tau, steps, lr, weight_power)
    return spectral.like(b + scale * x, base)


def task_weights(tau: Any, weight_power: int) -> Any:
    """w_t = 1 / ||tau_t||_F^p (0 for a zero task vector, which then contributes nothing)."""
    import torch

    norms = torch.linalg.vector_norm(tau.reshape(tau.shape[0], -1).double(), dim=1) ** weight_power
    return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)


def _gram_terms(tau: Any, weight_power: int) -> tuple[Any, Any]:
    """G = sum_t w_t tau_t^T tau_t and B = sum_t w_t tau_t tau_t^T tau_t, accumulated in float64."""
    w = task_weights(tau, weight_power)
    g = bmat = 0
    for t in range(tau.shape[0]):  # one task at a time: a [T, n, n] stack would not fit at 8k widths
        t64 = tau[t].double()
        gram = w[t] * (t64.T @ t64)
        g, bmat = g + gram, bmat + t64 @ gram
    return g, bmat


def wudi_adam(tau: Any, steps: int = STEPS, lr: float = LR, weight_power: int = WEIGHT_POWER) -> Any:
    """The authors' Adam iteration from X = sum_t tau_t, in the task vectors' float precision."""
    import torch

    g64, b64 = _gram_terms(tau, weight_power)
    g, bmat = g64.to(tau.dtype), b64.to(tau.dtype)
    x = tau.sum(0)
    m1 = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    for step in range(1, int(steps) + 1):
        grad = 2.0 * (x @ g - bmat)
        m1.lerp_(grad, 1 - _BETA1)
        m2.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        denom = (m2.sqrt() / (1 - _BETA2**step) ** 0.5).add_(_EPS)
        x.addcdiv_(m1, denom, value=-lr / (1 - _BETA1**step))
    return x


def wudi_closed(tau: Any, weight_power: int = WEIGHT_POWER) -> Any:
    """X* = B G^+ in float64 (G is symmetric PSD: eigendecomposition, tiny eigenvalues dropped)."""
    import torch

    g, bmat = _gram_terms(tau, weight_power)
    lam, vecs = torch.linalg.eigh(g)
    floor = torch.finfo(torch.float64).eps * g.shape[0] * (lam.abs().max() if lam.numel() else 0)
    inv = torch.where(lam > floor, 1.0 / torch.where(lam > floor, lam, 1.0), 0.0)
    return ((bmat @ vecs) * inv[None, :] @ vecs.T).to(tau.dtype)


def wudi_loss(x: Any, tau: Any, weight_power: int = WEIGHT_POWER) -> float:
    """L(X) in float64, the literal formula (for reports and tests)."""
    w = task_weights(tau, weight_power)
    x64, t64 = x.double(), tau.double()
    return float(sum(w[t] * ((x64 - t64[t]) @ t64[t].T).square().sum() for t in range(tau.shape[0])))


WUDI = Method(
    name="wudi",
    title="WUDI merging (data-free, Adam on the interference loss)",
    paper="https://arxiv.org/abs/2503.08099",
    formula="per block matrix: b + scale * X, X from sum_t tau_t by `wudi_steps` Adam steps (`wudi_lr`) on "
    "sum_t ||(X - tau_t) tau_t^T||_F^2 / ||tau_t||_F^p; other tensors: b + scale * mean_t tau_t",
    combine=combine_for(
        "wudi",
        wudi_merge,
        lambda p: {"steps": p["wudi_steps"], "lr": p["wudi_lr"], "weight_power": p["wudi_weight_power"]},
    ),
    params=(
        SCALE,
        Param("wudi_steps", "int", STEPS, "Adam steps (the authors' 300; FusionBench 400)"),
        Param("wudi_lr", "float", LR, "Adam learning rate"),
        Param(
            "wudi_weight_power", "int", WEIGHT_POWER, "task weight 1/||tau_t||_F^p: 1 authors', 2 FusionBench"
        ),
        KEY_POLICY_PARAM,
    ),
    prepare=require_torch,
)
