import numpy as np
import pytest
import scipy.optimize

import bioinverse.optim.stacked_nnls as stacked
from bioinverse.errors import InputError
from bioinverse.optim.stacked_nnls import nnls_factored, nnls_stacked


def _scipy(A, B):
    out = [scipy.optimize.nnls(a, b, maxiter=50 * A.shape[2]) for a, b in zip(A, B)]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def _dual(A, B, X):
    return np.einsum("vmn,vm->vn", A, B - np.einsum("vmn,vn->vm", A, X))


def _random_stack(V, m, n, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((V, m, n))
    X0 = np.where(rng.random((V, n)) < 0.5, rng.random((V, n)), 0.0)
    B = np.einsum("vmn,vn->vm", A, X0) + 0.3 * rng.standard_normal((V, m))
    return A, B


@pytest.mark.parametrize("V, m, n, seed",
                         [(40, 40, 10, 0), (20, 100, 100, 1), (30, 12, 30, 2), (6, 552, 64, 3)],
                         ids=["tall", "square", "overcomplete", "552x64"])
def test_matches_scipy_on_random_stacks(V, m, n, seed):
    A, B = _random_stack(V, m, n, seed)
    X, rnorm = nnls_stacked(A, B)
    Xs, rs = _scipy(A, B)
    assert X.shape == (V, n) and (X >= 0).all()
    if n <= m:  # full column rank: the solution is unique
        np.testing.assert_allclose(X, Xs, atol=1e-10, rtol=0)
    np.testing.assert_allclose(rnorm, rs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rnorm, np.linalg.norm(np.einsum("vmn,vn->vm", A, X) - B, axis=1),
                               rtol=1e-12, atol=1e-13)


def test_every_problem_has_its_own_matrix():
    # Stacking the same right-hand side against different matrices gives different solutions,
    # each equal to the one of its own matrix solved alone.
    A, B = _random_stack(5, 30, 8, 4)
    B[:] = B[0]
    X, _ = nnls_stacked(A, B)
    for v in range(5):
        np.testing.assert_allclose(X[v], nnls_stacked(A[v:v + 1], B[v:v + 1])[0][0], atol=1e-13)
    assert np.ptp(X, axis=0).max() > 0.1


def test_coherent_dictionaries_reach_scipy_optimum():
    # Exponential decays on a per-problem grid of rates: numerically rank-deficient (κ > 1e16),
    # columns nearly parallel. Solutions are not unique to round-off; the optimum value is.
    rng = np.random.default_rng(5)
    bvals = np.linspace(0.0, 4.0, 80)
    rates = np.sort(rng.uniform(0.05, 3.0, (24, 60)), axis=1)
    A = np.exp(-bvals[None, :, None] * rates[:, None, :])
    truth = np.zeros((24, 60))
    truth[np.arange(24), rng.integers(0, 60, 24)] = rng.uniform(0.3, 1.0, 24)
    truth[np.arange(24), rng.integers(0, 60, 24)] += rng.uniform(0.3, 1.0, 24)
    B = np.einsum("vmn,vn->vm", A, truth) + 0.01 * rng.standard_normal((24, 80))
    X, rnorm = nnls_stacked(A, B)
    _, rs = _scipy(A, B)
    np.testing.assert_allclose(rnorm, rs, rtol=1e-11)
    assert (X >= 0).all() and ((X > 0).sum(axis=1) <= 10).all()


def test_kkt_certificate_holds():
    A, B = _random_stack(50, 60, 25, 6)
    A = np.abs(A)
    X, _ = nnls_stacked(A, B)
    W = _dual(A, B, X)
    scale = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)[:, None]
    assert (X >= 0).all()
    assert (np.abs(W[X > 0]) / scale[X > 0]).max() < 1e-12
    assert (W[X == 0] / scale[X == 0]).max() < 1e-12
    # Some problems are at the boundary (active constraints), some have x = 0 entirely.
    assert (X == 0).any() and (X > 0).any()


def test_boundary_cases():
    rng = np.random.default_rng(7)
    A = rng.random((4, 10, 5))
    B = np.zeros((4, 10))
    B[1] = -rng.random(10)  # in the negative cone of a positive matrix: x = 0
    B[2] = A[2] @ np.array([0.0, 2.0, 0.0, 0.0, 1.0])  # exact sparse solution
    B[3] = A[3, :, 0] * 3.0  # a single column
    X, rnorm = nnls_stacked(A, B)
    np.testing.assert_array_equal(X[:2], 0.0)
    assert rnorm[0] == 0.0 and rnorm[1] == pytest.approx(np.linalg.norm(B[1]))
    np.testing.assert_allclose(X[2], [0.0, 2.0, 0.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(X[3], [3.0, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(rnorm[2:], 0.0, atol=1e-12)


def test_duplicate_columns_and_single_column():
    rng = np.random.default_rng(8)
    A = rng.random((10, 20, 6))
    A[:, :, 3] = A[:, :, 1]  # a column equal to another: never both in the passive set
    B = rng.standard_normal((10, 20)) + 2.0
    X, rnorm = nnls_stacked(A, B)
    np.testing.assert_allclose(rnorm, _scipy(A, B)[1], rtol=1e-12)
    assert not ((X[:, 1] > 0) & (X[:, 3] > 0)).any()
    x1, _ = nnls_stacked(A[:, :, :1], B)
    np.testing.assert_allclose(x1[:, 0], np.maximum((A[:, :, 0] * B).sum(1), 0) / (A[:, :, 0] ** 2).sum(1))


def test_failed_certificate_falls_back_to_scipy(monkeypatch):
    A, B = _random_stack(6, 30, 12, 9)

    def broken(A, b, rows, c, dual_tol, max_iter, factors):  # returns x = 0: not optimal
        return np.zeros((rows.size, A.shape[2])), np.ones(rows.size, dtype=bool)

    monkeypatch.setattr(stacked, "_lawson_hanson", broken)
    X, rnorm = nnls_stacked(A, B)
    Xs, rs = _scipy(A, B)
    np.testing.assert_allclose(X, Xs, atol=1e-12)
    np.testing.assert_allclose(rnorm, rs, rtol=1e-12)


def test_iteration_limit_warns():
    A, B = _random_stack(3, 30, 12, 10)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        X, _ = nnls_stacked(A, B, max_iter=1)
    assert (X >= 0).all()


@pytest.mark.parametrize("K", [4, 60])
def test_factored_equals_materialised(K):
    rng = np.random.default_rng(11)
    left = rng.random((12, 50, K))
    right = rng.random((K, 80)) - 0.3
    B = np.einsum("vmk,kn,vn->vm", left, right, np.where(rng.random((12, 80)) < 0.1, 1.0, 0.0))
    B += 0.05 * rng.standard_normal(B.shape)
    X, rnorm = nnls_factored(left, right, B)
    A = left @ right
    _, rd = nnls_stacked(A, B)
    np.testing.assert_allclose(rnorm, rd, rtol=1e-10)
    np.testing.assert_allclose(rnorm, np.linalg.norm(np.einsum("vmn,vn->vm", A, X) - B, axis=1), rtol=1e-10)
    W = _dual(A, B, X)
    scale = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)[:, None]
    assert (W / scale).max() < 1e-11 and (np.abs(W[X > 0]) / scale[X > 0]).max() < 1e-11


def test_bad_input():
    A, B = _random_stack(2, 5, 3, 12)
    with pytest.raises(InputError, match="A"):
        nnls_stacked(A[0], B)
    with pytest.raises(InputError, match="B"):
        nnls_stacked(A, B[:, :4])
    bad = A.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(InputError, match="matrix 1 contains NaN"):
        nnls_stacked(bad, B)
    with pytest.raises(InputError, match="B"):
        nnls_stacked(A, np.where(B > 0, np.inf, B))
    with pytest.raises(InputError, match="tol"):
        nnls_stacked(A, B, tol=-1.0)
    with pytest.raises(InputError, match="max_iter"):
        nnls_stacked(A, B, max_iter=-2)
    with pytest.raises(InputError, match="right"):
        nnls_factored(A, np.ones((4, 2)), B)
