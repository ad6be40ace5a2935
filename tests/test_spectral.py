"""The spectral core against numpy's SVD, Eckart-Young, and the polar factor's defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery import spectral
from surgery.errors import RecipeError


def decaying(m: int, n: int, seed: int = 0, decay: float = 0.85) -> np.ndarray:
    """A matrix with a known, geometrically decaying spectrum (like a fine-tune's task vector)."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = decay ** np.arange(r)
    return ((u * s) @ v.T).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (32, 32)])
def test_thin_svd_matches_numpy(shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got = spectral.thin_svd(a)
    ref_s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert isinstance(got.u, np.ndarray) and got.u.dtype == np.float32
    assert got.u.shape == (shape[0], min(shape)) and got.vh.shape == (min(shape), shape[1])
    np.testing.assert_allclose(got.s, ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.matrix(), a, atol=2e-5)
    np.testing.assert_allclose(got.u.T @ got.u, np.eye(min(shape)), atol=2e-5)
    np.testing.assert_allclose(got.vh @ got.vh.T, np.eye(min(shape)), atol=2e-5)


def test_torch_in_torch_out_and_same_numbers_as_numpy_route():
    a = decaying(30, 20, seed=2)
    from_np = spectral.thin_svd(a)
    from_t = spectral.thin_svd(torch.from_numpy(a))
    assert isinstance(from_t.s, torch.Tensor)
    np.testing.assert_allclose(from_t.s.numpy(), from_np.s, rtol=1e-6)
    np.testing.assert_allclose(from_t.matrix().numpy(), from_np.matrix(), atol=1e-6)


def test_bf16_input_is_factored_in_float32():
    a = torch.from_numpy(decaying(16, 12)).to(torch.bfloat16)
    got = spectral.thin_svd(a)
    assert got.s.dtype == torch.float32
    ref = np.linalg.svd(a.float().numpy().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(got.s.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_truncated_svd_meets_eckart_young(method):
    a = decaying(300, 200, seed=3)
    rank = 12
    got = spectral.truncated_svd(a, rank, method=method, seed=7)
    s_all = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    best = float((s_all[rank:] ** 2).sum())
    assert best == pytest.approx(spectral.tail_energy(s_all, rank))
    err = float(((a.astype(np.float64) - got.matrix().astype(np.float64)) ** 2).sum())
    assert got.rank == rank
    # Never better than the optimum (up to float32 rounding), and within 1% of it.
    assert best * (1 - 1e-4) - 1e-9 <= err <= best * 1.01
    np.testing.assert_allclose(got.s, s_all[:rank], rtol=1e-4)


def test_randomized_on_a_flat_noisy_spectrum_still_close():
    """Power iterations are what keep the sketch good when the tail is heavy."""
    rng = np.random.default_rng(4)
    a = (decaying(256, 256, seed=4, decay=0.7) * 10 + 0.05 * rng.standard_normal((256, 256))).astype(
        np.float32
    )
    s_all = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    got = spectral.truncated_svd(a, 8, method="randomized", power_iters=3)
    err = float(((a - got.matrix()).astype(np.float64) ** 2).sum())
    assert err <= spectral.tail_energy(s_all, 8) * 1.02


def test_auto_picks_exact_for_large_ranks_and_is_deterministic():
    a = decaying(64, 48, seed=5)
    exact = spectral.truncated_svd(a, 30, method="exact")
    auto = spectral.truncated_svd(a, 30)  # sketch 40 > 48/4: exact
    np.testing.assert_array_equal(auto.s, exact.s)
    big = decaying(400, 300, seed=6)
    one = spectral.truncated_svd(big, 5, seed=3)
    two = spectral.truncated_svd(big, 5, seed=3)
    np.testing.assert_array_equal(one.u, two.u)


def test_truncated_svd_rejects_bad_arguments():
    a = decaying(10, 8)
    with pytest.raises(RecipeError):
        spectral.truncated_svd(a, 0)
    with pytest.raises(RecipeError):
        spectral.truncated_svd(a, 3, method="lanczos")
    assert spectral.truncated_svd(a, 100).rank == 8  # clipped to min(m, n)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30)])
def test_polar_factor_is_orthogonal_and_both_routes_agree(shape):
    a = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    q_svd = spectral.polar_factor(a, route="svd")
    q_gram = spectral.polar_factor(a, route="gram")
    k = min(shape)
    gram = q_svd.T @ q_svd if shape[0] >= shape[1] else q_svd @ q_svd.T
    np.testing.assert_allclose(gram, np.eye(k), atol=2e-5)
    np.testing.assert_allclose(q_gram, q_svd, atol=2e-5)
    # Defining property: Q^T a is symmetric positive semi-definite (tall case), i.e. a = Q P.
    p = q_svd.T @ a if shape[0] >= shape[1] else a @ q_svd.T
    np.testing.assert_allclose(p, p.T, atol=1e-4)
    assert np.linalg.eigvalsh(p.astype(np.float64)).min() > -1e-4
    # Independent formula: U V^T from numpy.
    u, _, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(q_svd, u @ vt, atol=2e-5)


def test_polar_of_orthonormal_columns_is_itself():
    q, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((40, 10)))
    q = q.astype(np.float32)
    np.testing.assert_allclose(spectral.polar_factor(q), q, atol=1e-5)
    np.testing.assert_allclose(spectral.polar_factor(q, route="gram"), q, atol=1e-5)


def test_gram_route_refuses_rank_deficient_matrices():
    a = np.outer(np.arange(1, 11), np.arange(1, 5)).astype(np.float32)  # rank 1
    with pytest.raises(ValueError, match="full-rank"):
        spectral.polar_factor(a, route="gram")
    q = spectral.polar_factor(a, route="svd")  # still defined (any completion of the null space)
    assert q.shape == (10, 4)


def test_rank_rules():
    s = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    assert spectral.nuclear_rank(s, 0.4) == 1  # 4 >= 0.4 * 10: the boundary counts as reached
    assert spectral.nuclear_rank(s, 0.41) == 2
    assert spectral.nuclear_rank(s, 1.0) == 4
    assert spectral.energy_rank(s, 16 / 30) == 1
    assert spectral.energy_rank(s, 0.9) == 3  # 16+9+4 = 29 >= 27
    assert spectral.numerical_rank(np.array([1.0, 1e-3, 1e-9, 0.0])) == 2
    assert spectral.numerical_rank(np.zeros(3)) == 0
    assert spectral.tail_energy(s, 2) == pytest.approx(5.0)
    with pytest.raises(RecipeError):
        spectral.energy_rank(s, 0.0)


def test_spectrum_edits():
    s = np.array([4.0, 2.0, 1.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(spectral.flat_spectrum(s), [1.875] * 4)
    np.testing.assert_allclose(spectral.flat_spectrum(s, 2), [3.0, 3.0, 0.0, 0.0])
    np.testing.assert_allclose(
        spectral.rescaled_to_nuclear(s, 2), [4 * 7.5 / 6, 2 * 7.5 / 6, 0, 0], rtol=1e-6
    )
    st = spectral.flat_spectrum(torch.tensor([3.0, 1.0]))
    assert isinstance(st, torch.Tensor) and st.tolist() == [2.0, 2.0]
    svd = spectral.thin_svd(decaying(6, 4))
    edited = svd.with_spectrum(spectral.flat_spectrum(svd.s))
    np.testing.assert_allclose(
        np.linalg.svd(edited.matrix(), compute_uv=False), [svd.s.mean()] * 4, rtol=1e-5
    )
