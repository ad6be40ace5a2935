"""Per-matrix spectral methods against independent float64 numpy references, and their invariants.

The references follow the papers' descriptions step by step with numpy's SVD in float64; the library
runs torch.linalg in float32. Tolerances are therefore float32-sized (about 1e-5 of the update).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.methods.cart import cart_merge
from surgery.methods.iso import common_rank, iso_c, iso_cts
from surgery.methods.per_matrix import matrix_role, merge_tensor
from surgery.methods.star import star_merge
from surgery.methods.tsv import tsv_merge
from surgery.methods.wudi import wudi_adam, wudi_closed, wudi_loss, wudi_merge

ATOL = 2e-5


def family(m=24, n=16, n_tasks=3, seed=0, update=0.1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((m, n)).astype(np.float32)
    taus = (update * rng.standard_normal((n_tasks, m, n))).astype(np.float32)
    return base, taus


def lora_like(m=24, n=16, n_tasks=3, rank=2, seed=1):
    """Task vectors B_t A_t of rank 2 each: their sum has rank <= 6 < min(m, n)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((m, n)).astype(np.float32)
    taus = np.stack(
        [rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) * 0.05 for _ in range(n_tasks)]
    )
    return base, taus.astype(np.float32)


def svd64(a):
    return np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)


def polar64(a):
    u, _, vt = svd64(a)
    return u @ vt


# --- independent references --------------------------------------------------------------------


def ref_tsv(base, taus, scale=1.0):
    n_tasks, m, n = taus.shape
    k = max(1, min(m, n) // n_tasks)
    us, ss, vts = zip(*(svd64(t) for t in taus))
    u = np.hstack([x[:, :k] for x in us])
    s = np.concatenate([x[:k] for x in ss])
    vt = np.vstack([x[:k] for x in vts])
    return base + scale * (polar64(u) @ np.diag(s) @ polar64(vt))


def ref_iso_c(base, taus, scale=1.0):
    u, s, vt = svd64(taus.sum(0))
    return base + scale * s.mean() * (u @ vt)


def ref_iso_cts(base, taus, scale=1.0):
    n_tasks, m, n = taus.shape
    r = min(m, n)
    k_c = r - round((r - int(0.8 * r)) / n_tasks) * n_tasks
    each = (r - k_c) // n_tasks
    uc, sc, vtc = svd64(taus.sum(0))
    uc, sc, vtc = uc[:, :k_c], sc[:k_c], vtc[:k_c]
    cols, vals, rows = [], [], []
    for t in taus:
        ut, st, vtt = svd64(t - uc @ uc.T @ t)
        cols.append(ut[:, :each]), vals.append(st[:each]), rows.append(vtt[:each])
    u = polar64(np.hstack(cols + [uc]))
    vt = polar64(np.vstack(rows + [vtc]))
    s = np.concatenate(vals + [sc])
    return base + scale * s.mean() * (u @ vt)


def ref_cart(base, taus, lam=2.0, rho=0.12):
    n_tasks, m, n = taus.shape
    k = max(1, int(rho * min(m, n)))
    avg = base + taus.mean(0)
    total = 0
    for t in taus:
        u, s, vt = svd64(t - taus.mean(0))
        total = total + (u[:, :k] * s[:k]) @ vt[:k]
    return avg + lam * total


def ref_star(base, taus, eta=0.4):
    out = np.zeros(base.shape)
    for t in taus:
        u, s, vt = svd64(t)
        cum = np.cumsum(s)
        k = int(np.argmax(cum >= eta * s.sum() * (1 - 1e-12))) + 1
        out += (u[:, :k] * (s[:k] * s.sum() / s[:k].sum())) @ vt[:k]
    return base + out / len(taus)


def ref_wudi_adam(taus, steps, lr):
    """The authors' loop: torch.optim.Adam on the literal loss through autograd (float64)."""
    tau = torch.from_numpy(taus.astype(np.float64))
    w = 1.0 / torch.linalg.vector_norm(tau.reshape(len(taus), -1), dim=1)
    x = torch.nn.Parameter(tau.sum(0).clone())
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        inner = (x.unsqueeze(0) - tau) @ tau.transpose(1, 2)
        loss = (inner.square().sum((1, 2)) * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach().numpy()


# --- formulas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_tsv_matches_reference(shape):
    base, taus = family(*shape)
    np.testing.assert_allclose(tsv_merge(base, taus, scale=0.7), ref_tsv(base, taus, 0.7), atol=ATOL)


def test_iso_c_matches_reference():
    base, taus = family()
    np.testing.assert_allclose(iso_c(base, taus, scale=1.5), ref_iso_c(base, taus, 1.5), atol=ATOL)


@pytest.mark.parametrize(("shape", "n_tasks"), [((24, 16), 3), ((20, 20), 2), ((16, 40), 4)])
def test_iso_cts_matches_reference(shape, n_tasks):
    base, taus = family(*shape, n_tasks=n_tasks, seed=2)
    np.testing.assert_allclose(iso_cts(base, taus), ref_iso_cts(base, taus), atol=ATOL)


def test_common_rank_formula():
    assert common_rank(16, 3) == 16 - 3  # floor(12.8) = 12; round(4/3) = 1 -> 3 task dims
    assert common_rank(100, 8) == 100 - 16  # round(20/8) = 2 (banker's: 2.5 -> 2)
    assert common_rank(4, 8) == 4


def test_cart_matches_reference():
    base, taus = family(40, 30, n_tasks=4, seed=3)
    np.testing.assert_allclose(cart_merge(base, taus), ref_cart(base, taus), atol=ATOL)
    np.testing.assert_allclose(
        cart_merge(base, taus, scale=1.0, rho=0.5), ref_cart(base, taus, 1.0, 0.5), atol=ATOL
    )


@pytest.mark.parametrize("eta", [0.4, 0.8])
def test_star_matches_reference(eta):
    base, taus = family(seed=4)
    np.testing.assert_allclose(star_merge(base, taus, eta=eta), ref_star(base, taus, eta), atol=ATOL)


def test_wudi_adam_matches_torch_adam_on_the_literal_loss():
    base, taus = family(12, 10, n_tasks=3, seed=5)
    ref = ref_wudi_adam(taus, steps=50, lr=1e-3)
    got = wudi_adam(torch.from_numpy(taus).double(), steps=50, lr=1e-3).numpy()
    # Adam's step is ~lr per entry whatever the gradient's scale: agreement to 1e-3 of one step.
    np.testing.assert_allclose(got, ref, atol=1e-6)
    out = wudi_merge(base, taus, steps=50, lr=1e-3)  # float32 route, same iteration
    np.testing.assert_allclose(out, base + ref, atol=5e-5)


def test_wudi_defaults_move_at_most_lr_times_steps_and_lower_the_loss():
    base, taus = family(seed=6)
    tau = torch.from_numpy(taus)
    x = wudi_adam(tau)
    start = tau.sum(0)
    assert float((x - start).abs().max()) <= 300 * 1e-5 * 1.01  # Adam's step bound
    assert wudi_loss(x, tau) < wudi_loss(start, tau)


def test_wudi_closed_form_is_the_minimum_and_solves_the_normal_equations():
    base, taus = family(30, 12, n_tasks=3, seed=7)
    tau = torch.from_numpy(taus).double()
    closed = wudi_closed(tau)
    # grad L = 2 sum_t w_t (X - tau_t) tau_t^T tau_t = 0 at X*
    w = [1 / float(torch.linalg.vector_norm(t)) for t in tau]
    grad = sum(wt * (closed - t) @ t.T @ t for wt, t in zip(w, tau))
    assert float(grad.abs().max()) < 1e-10
    assert wudi_loss(closed, tau) <= wudi_loss(wudi_adam(tau, steps=300, lr=1e-3), tau) + 1e-12
    np.testing.assert_allclose(wudi_merge(base, taus, solver="closed"), base + closed.numpy(), atol=ATOL)


# --- invariants --------------------------------------------------------------------------------


def test_tsv_single_model_returns_its_fine_tune():
    base, taus = family(n_tasks=1)
    np.testing.assert_allclose(tsv_merge(base, taus), base + taus[0], atol=ATOL)


def test_cart_single_model_and_identical_models_return_the_fine_tune():
    base, taus = family(n_tasks=1, seed=8)
    np.testing.assert_allclose(cart_merge(base, taus), base + taus[0], atol=ATOL)
    same = np.repeat(taus, 3, axis=0)
    np.testing.assert_allclose(cart_merge(base, same), base + taus[0], atol=ATOL)


def test_star_keeping_everything_is_the_mean():
    base, taus = family(seed=9)
    np.testing.assert_allclose(star_merge(base, taus, eta=1.0), base + taus.mean(0), atol=ATOL)


def test_iso_c_single_model_has_a_flat_spectrum_not_the_fine_tune():
    base, taus = family(n_tasks=1, seed=10)
    s = np.linalg.svd(iso_c(base, taus) - base, compute_uv=False)
    np.testing.assert_allclose(s, np.linalg.svd(taus[0], compute_uv=False).mean(), rtol=1e-4)


ALL = {
    "tsv": tsv_merge,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "cart": cart_merge,
    "star": star_merge,
    "wudi": wudi_merge,
    "wudi_closed": lambda b, t, **k: wudi_merge(b, t, solver="closed", **k),
}


@pytest.mark.parametrize("name", ALL)
def test_zero_task_vectors_give_the_base(name):
    base, taus = family(seed=11)
    np.testing.assert_array_equal(ALL[name](base, np.zeros_like(taus)), base)


@pytest.mark.parametrize("name", ALL)
def test_model_order_changes_only_rounding(name):
    base, taus = family(seed=12)
    one = ALL[name](base, taus)
    two = ALL[name](base, taus[::-1].copy())
    np.testing.assert_allclose(one, two, atol=ATOL)


@pytest.mark.parametrize("name", ALL)
def test_torch_and_numpy_inputs_agree(name):
    base, taus = family(seed=13)
    from_np = ALL[name](base, taus)
    from_t = ALL[name](torch.from_numpy(base), torch.from_numpy(taus))
    assert isinstance(from_t, torch.Tensor)
    np.testing.assert_allclose(from_t.numpy(), from_np, atol=1e-6)


def _column_space(a, tol=1e-4):
    u, s, _ = svd64(a)
    return u[:, s > tol * s.max()]


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "cart", "star", "wudi_closed"])
def test_lora_like_updates_stay_in_the_tasks_subspace(name):
    """Rank-deficient task vectors: the merged update must not invent null-space directions."""
    base, taus = lora_like()
    update = ALL[name](base, taus).astype(np.float64) - base
    span = _column_space(np.hstack(list(taus)))  # the tasks' column spaces together (rank 6)
    assert span.shape[1] == 6
    outside = update - span @ (span.T @ update)
    assert np.abs(outside).max() < 1e-4 * max(np.abs(update).max(), 1e-12)
    assert np.linalg.matrix_rank(update, tol=1e-4 * np.abs(update).max()) <= 6


def test_wudi_adam_leaves_the_subspace_only_by_its_step_bound():
    """Adam scales each entry separately, so its steps leave the tasks' span: by at most lr per step."""
    base, taus = lora_like()
    update = wudi_merge(base, taus).astype(np.float64) - base
    span = _column_space(np.hstack(list(taus)))
    outside = update - span @ (span.T @ update)
    assert 1e-6 < np.linalg.norm(outside) <= 300 * 1e-5 * np.sqrt(update.size)


def test_iso_c_on_a_rank_deficient_sum_flattens_only_its_rank():
    base, taus = lora_like()
    s = np.linalg.svd(iso_c(base, taus).astype(np.float64) - base, compute_uv=False)
    ref = np.linalg.svd(taus.sum(0).astype(np.float64), compute_uv=False)[:6].mean()
    np.testing.assert_allclose(s[:6], ref, rtol=1e-4)
    assert s[6:].max() < 1e-5 * ref


# --- key policy --------------------------------------------------------------------------------


def test_key_policy_roles():
    assert matrix_role("model.layers.0.self_attn.q_proj.weight", 2) == "matrix"
    assert matrix_role("model.layers.0.mlp.gate_proj.weight", 2) == "matrix"
    assert matrix_role("model.layers.0.mlp.gate.weight", 2) == "mean"  # MoE router
    assert matrix_role("model.layers.0.block_sparse_moe.gate.weight", 2) == "mean"
    assert matrix_role("model.layers.0.mlp.experts.down_proj", 3) == "experts"
    assert matrix_role("model.layers.0.input_layernorm.weight", 1) == "mean"
    assert matrix_role("model.layers.0.self_attn.q_proj.bias", 1) == "mean"
    assert matrix_role("model.embed_tokens.weight", 2) == "mean"
    assert matrix_role("lm_head.weight", 2) == "mean"


def test_merge_tensor_follows_the_policy():
    base, taus = family(seed=14)
    name = "model.layers.3.mlp.up_proj.weight"
    np.testing.assert_array_equal(merge_tensor(tsv_merge, name, base, taus), tsv_merge(base, taus))
    np.testing.assert_allclose(
        merge_tensor(tsv_merge, "lm_head.weight", base, taus, scale=0.5), base + 0.5 * taus.mean(0), atol=1e-7
    )
    experts_b = np.stack([base, base * 2])
    experts_t = np.stack([taus, taus * 0.5], axis=1)  # [T, experts, m, n]
    got = merge_tensor(iso_c, "model.layers.1.mlp.experts.up_proj", experts_b, experts_t)
    np.testing.assert_allclose(got[1], iso_c(base * 2, taus * 0.5), atol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (owed: no GPU in this session)"
)
@pytest.mark.parametrize("name", ALL)
def test_cuda_equals_cpu_within_tolerance(name):
    base, taus = family(64, 48, seed=15)
    cpu = ALL[name](base, taus)
    gpu = ALL[name](base, taus, device="cuda")
    assert isinstance(gpu, np.ndarray)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (owed: no GPU in this session)"
)
def test_spectral_core_on_cuda():
    from surgery import spectral

    a = np.random.default_rng(16).standard_normal((300, 200)).astype(np.float32)
    t = torch.from_numpy(a).cuda()
    for rank, method in [(10, "randomized"), (10, "exact")]:
        got = spectral.truncated_svd(t, rank, method=method)
        assert got.u.is_cuda
        np.testing.assert_allclose(
            got.s.cpu().numpy(), spectral.truncated_svd(a, rank, method=method).s, rtol=1e-4
        )
    np.testing.assert_allclose(
        spectral.polar_factor(t, route="gram").cpu().numpy(), spectral.polar_factor(a), atol=1e-4
    )


def test_engine_workers_run_torch_single_threaded_and_restore_it():
    from concurrent.futures import ThreadPoolExecutor

    from surgery.methods.per_matrix import one_torch_thread_per_worker

    before = torch.get_num_threads()

    def inside(_):
        with one_torch_thread_per_worker():
            return torch.get_num_threads()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(inside, range(4))) == [1, 1, 1, 1]
    assert torch.get_num_threads() == before
    with one_torch_thread_per_worker():  # the calling (main) thread keeps torch's setting
        assert torch.get_num_threads() == before
