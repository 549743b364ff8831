r"""Exact non-negative least squares for a stack of problems, each with its own matrix.

Solves, for every problem v of a stack,

.. math::

    x_v = \arg\min_{x \ge 0} \lVert A_v x - b_v \rVert_2 ,\qquad A_v \in \mathbb{R}^{M \times N},

exactly (to round-off), with the active-set algorithm of Lawson & Hanson (1974, ch. 23), the
algorithm behind ``scipy.optimize.nnls``. Unlike :func:`bioinverse.optim.nnls`, which shares one
matrix (and so one Gram matrix) between all right-hand sides, every problem here has its own
matrix: for instance a dictionary of fingerprints rotated to the fibre orientations of each voxel.
Over-complete matrices (N > M) are allowed.

How
---
The problems are independent; a compiled kernel (Numba) runs Lawson–Hanson on each, in parallel
over problems, so no Python code runs per problem or per step:

* each problem keeps a QR factorisation of its passive columns (orthonormal Q, triangular R,
  ``Qᵀb``). A variable enters by classical Gram–Schmidt with reorthogonalisation (O(M|P|)), and
  only if its component orthogonal to the passive columns exceeds 10⁻¹³ of its norm (a column in
  their span would make the passive problem singular); when variables leave, the columns after
  the first leaving one are orthogonalised again;
* the dual vector is ``w = A_vᵀ(b_v − QQᵀb_v)``: the residual of the passive least-squares
  solution (which x is at every outer step), formed without x, whose entries can be large and
  cancel when the passive columns are nearly dependent. It costs one pass over ``A_v`` per step;
  for small matrices that pass stays in cache because a core finishes one problem before the next;
* variable j may enter while ``w_j > tol ‖a_j‖ ‖b_v‖``; the default ``tol = 0`` is SciPy's rule
  (any positive dual value).

Every returned solution is certified by its KKT conditions (x ≥ 0, ``|w_j| ≤ τ_j`` on P,
``w_j ≤ τ_j`` off P, w recomputed from the returned x, τ_j at the round-off of that computation);
a problem that fails the check is solved again with ``scipy.optimize.nnls`` on ``A_v``.

Why not the normal equations
----------------------------
Solving the passive problems through ``A_PᵀA_P`` (Gram columns ``A_vᵀa_j`` computed only for the
entering variables, inverse updated in O(|P|²)) squares the condition number. Dictionaries of
smooth fingerprints (exponential decays, restricted-diffusion signals) are numerically
rank-deficient: the 552 × 1564 dictionary of a voxel of the hybrid dMRI estimator has singular
values spanning 10³² and a numerical rank of about 30. Through the Gram matrix most useful columns
look dependent (their Schur complements fall below round-off) and Lawson–Hanson stops early: on 64
such voxels, 45 solutions failed the optimality check. Through QR every solution passes it and the
residual norms equal SciPy's to 10⁻¹⁴.

Exactness on coherent dictionaries: there the minimiser is not unique to round-off. Two exact
solvers (this one and SciPy) may return different x, with residual norms equal to ~10⁻¹⁴ relative
on noisy data; on noise-free data one may stop at a residual of 10⁻⁸ ‖b_v‖ and the other at
10⁻¹⁶ ‖b_v‖: both objective values ½‖A_v x − b_v‖² are zero to the round-off ε‖b_v‖², and no dual
value is then above its round-off (the columns that would lower the residual further are within
10⁻⁸ of the span of the passive ones). Which of the equally optimal x is returned can change with
last-bit changes of the input (on a dMRI dictionary with noisy signals: 9 voxels in 400 when the
gradient directions moved by 10⁻¹⁶).

Matrices that share a right factor, ``A_v = L_v R`` with a small inner dimension K < M, are first
reduced exactly to K rows by a Householder QR of ``L_v`` (:func:`nnls_factored`).

Reference
---------
C. L. Lawson and R. J. Hanson, *Solving Least Squares Problems*, Prentice-Hall 1974 (SIAM 1995),
chapter 23, algorithm NNLS.
"""

from __future__ import annotations

import warnings
from typing import Any

import numba
import numpy as np
import scipy.optimize
from numba import prange

from bioinverse.errors import InputError

__all__ = ["nnls_factored", "nnls_stacked"]

# A column enters the passive set only when its component orthogonal to the passive columns
# exceeds this fraction of its norm (Gram–Schmidt resolves it to ~10⁻¹⁵).
_INDEPENDENCE = 1e-13


@numba.njit(cache=True, parallel=True)
def _column_statistics(A, b, c, norms2):  # pragma: no cover - compiled
    """c[v] = A[v]ᵀ b[v] and norms2[v, j] = ‖A[v][:, j]‖², in one pass over the matrices."""
    V, M, N = A.shape
    for v in prange(V):
        for j in range(N):
            c[v, j] = 0.0
            norms2[v, j] = 0.0
        for i in range(M):
            bi = b[v, i]
            for j in range(N):
                a = A[v, i, j]
                c[v, j] += a * bi
                norms2[v, j] += a * a


@numba.njit(cache=True, parallel=True)
def _dual(A, residual, w):  # pragma: no cover - compiled
    """w[v] = A[v]ᵀ residual[v] for every problem."""
    V, M, N = A.shape
    for v in prange(V):
        for j in range(N):
            w[v, j] = 0.0
        for i in range(M):
            r = residual[v, i]
            for j in range(N):
                w[v, j] += A[v, i, j] * r


@numba.njit(cache=True)
def _orthogonalise(Q, p, a, s, e):  # pragma: no cover - compiled
    """e = a − Q[:p]ᵀ s with s = Q[:p] a, by classical Gram–Schmidt applied twice ("twice is
    enough", Giraud et al., Numer. Math. 101:87, 2005); returns ‖e‖. Q holds orthonormal rows."""
    m = a.shape[0]
    for i in range(m):
        e[i] = a[i]
    for k in range(p):
        s[k] = 0.0
    for _ in range(2):
        for k in range(p):
            dot = 0.0
            for i in range(m):
                dot += Q[k, i] * e[i]
            s[k] += dot
            for i in range(m):
                e[i] -= dot * Q[k, i]
    norm2 = 0.0
    for i in range(m):
        norm2 += e[i] * e[i]
    return np.sqrt(norm2)


@numba.njit(cache=True)
def _append_column(A, v, j, b, Q, R, qtb, var, p, s, e, work):  # pragma: no cover - compiled
    """Orthogonalise column j of A[v] against Q[:p]; if it is independent, store it as passive
    slot p and return True."""
    m = A.shape[1]
    norm2 = 0.0
    for i in range(m):
        work[i] = A[v, i, j]
        norm2 += work[i] * work[i]
    rho = _orthogonalise(Q, p, work, s, e)
    if not rho > _INDEPENDENCE * np.sqrt(norm2):
        return False
    dot = 0.0
    for i in range(m):
        Q[p, i] = e[i] / rho
        dot += Q[p, i] * b[i]
    for k in range(p):
        R[k, p] = s[k]
    R[p, p] = rho
    qtb[p] = dot
    var[p] = j
    return True


@numba.njit(cache=True)
def _back_substitute(R, qtb, p, z):  # pragma: no cover - compiled
    for i in range(p - 1, -1, -1):
        acc = qtb[i]
        for k in range(i + 1, p):
            acc -= R[i, k] * z[k]
        z[i] = acc / R[i, i]


@numba.njit(cache=True, parallel=True)
def _lawson_hanson(A, b, c, dual_tol, max_iter, X, converged):  # pragma: no cover - compiled
    """Lawson–Hanson NNLS for every problem v (A[v] (M × N), b[v]), in parallel over problems.

    The passive columns are kept as a QR factorisation (rows of Q orthonormal, R upper
    triangular, qtb = Qb); the dual vector is A[v]ᵀ(b − Qᵀqtb), the residual of the passive
    least-squares solution, formed without x."""
    V, M, N = A.shape
    capacity = min(M, N)
    for v in prange(V):
        # Only the leading p rows/entries are ever read, so these need no initialisation.
        Q = np.empty((capacity, M))
        R = np.empty((capacity, capacity))
        qtb = np.empty(capacity)
        var = np.empty(capacity, dtype=np.int64)
        z = np.empty(capacity)
        s = np.empty(capacity)
        e = np.zeros(M)
        work = np.zeros(M)
        residual = np.zeros(M)
        keep = np.zeros(capacity, dtype=np.int64)
        x = np.zeros(N)
        w = c[v].copy()
        state = np.zeros(N, dtype=np.uint8)
        p = 0
        attempts = 0
        converged[v] = True
        while True:
            best = -1
            best_w = 0.0
            for j in range(N):
                if state[j] == 0 and w[j] > dual_tol[v, j] and (best < 0 or w[j] > best_w):
                    best = j
                    best_w = w[j]
            if best < 0 or p >= capacity:
                break
            if attempts >= max_iter:
                converged[v] = False
                break
            attempts += 1
            if not _append_column(A, v, best, b[v], Q, R, qtb, var, p, s, e, work):
                state[best] = 2  # in the span of the passive columns: barred until x changes
                continue
            p += 1
            _back_substitute(R, qtb, p, z)
            if not z[p - 1] > 0.0:
                # Positive in exact arithmetic; round-off says otherwise: bar it until x changes.
                p -= 1
                state[best] = 2
                continue
            state[best] = 1
            for j in range(N):
                if state[j] == 2:
                    state[j] = 0
            # Inner loop: step back towards feasibility until the passive solution is positive.
            while True:
                alpha = np.inf
                leaving = -1
                for i in range(p):
                    if z[i] <= 0.0:
                        t = x[var[i]] / (x[var[i]] - z[i])
                        if t < alpha:
                            alpha = t
                            leaving = i
                if leaving < 0:
                    break
                for i in range(p):
                    x[var[i]] += alpha * (z[i] - x[var[i]])
                x[var[leaving]] = 0.0
                n_keep = 0
                first = p
                for i in range(p):
                    if x[var[i]] > 0.0:
                        keep[n_keep] = var[i]
                        n_keep += 1
                    else:
                        if first == p:
                            first = i
                        state[var[i]] = 0
                        x[var[i]] = 0.0
                # The factorisation of the columns before the first leaving one is unchanged;
                # the later kept columns are orthogonalised again.
                p = first
                for i in range(first, n_keep):
                    if _append_column(A, v, keep[i], b[v], Q, R, qtb, var, p, s, e, work):
                        p += 1
                    else:  # dependent on the others to round-off once they moved: it leaves too
                        state[keep[i]] = 0
                        x[keep[i]] = 0.0
                _back_substitute(R, qtb, p, z)
            for i in range(p):
                x[var[i]] = z[i]
            for i in range(M):
                residual[i] = b[v, i]
            for k in range(p):
                for i in range(M):
                    residual[i] -= qtb[k] * Q[k, i]
            for j in range(N):
                w[j] = 0.0
            for i in range(M):
                r = residual[i]
                for j in range(N):
                    w[j] += A[v, i, j] * r
        for j in range(N):
            X[v, j] = x[j]


@numba.njit(cache=True, parallel=True)
def _householder_reduce(left, b, T, reduced, outside):  # pragma: no cover - compiled
    """Householder QR of every [left[v] | b[v]] (M × (K+1)), without forming Q: T[v] = R factor of
    left[v] (K × K), reduced[v] = (Qᵀb[v])[:K], outside[v] = ‖(Qᵀb[v])[K:]‖."""
    V, M, K = left.shape
    for v in prange(V):
        work = np.empty((K + 1, M))  # columns of [left | b] as rows, contiguous
        for k in range(K):
            for m in range(M):
                work[k, m] = left[v, m, k]
        for m in range(M):
            work[K, m] = b[v, m]
        for k in range(K):
            norm2 = 0.0
            for m in range(k, M):
                norm2 += work[k, m] * work[k, m]
            if norm2 == 0.0:
                continue
            alpha = -np.sqrt(norm2) if work[k, k] >= 0.0 else np.sqrt(norm2)
            # Reflector H = I − 2hhᵀ/‖h‖² with h = x − αe₁ maps the column to αe₁.
            head = work[k, k] - alpha
            h_norm2 = norm2 - work[k, k] * work[k, k] + head * head
            work[k, k] = head
            for j in range(k + 1, K + 1):
                dot = 0.0
                for m in range(k, M):
                    dot += work[k, m] * work[j, m]
                scale = 2.0 * dot / h_norm2
                for m in range(k, M):
                    work[j, m] -= scale * work[k, m]
            work[k, k] = alpha
            for m in range(k + 1, M):
                work[k, m] = 0.0
        for i in range(K):
            for j in range(K):
                T[v, i, j] = work[j, i] if i <= j else 0.0
            reduced[v, i] = work[K, i]
        rest = 0.0
        for m in range(K, M):
            rest += work[K, m] * work[K, m]
        outside[v] = np.sqrt(rest)


@numba.njit(cache=True, parallel=True)
def _left_times_right(T, right, first, stop, out):  # pragma: no cover - compiled
    """out[v] = T[v] @ right, skipping zeros of T and the zero ends of the rows of ``right``
    (nonzero on first[k]:stop[k]); a fixed summation order, so the result is reproducible."""
    V, K = T.shape[0], T.shape[1]
    N = right.shape[1]
    for v in prange(V):
        for i in range(K):
            for j in range(N):
                out[v, i, j] = 0.0
            for k in range(K):
                t = T[v, i, k]
                if t != 0.0:
                    for j in range(first[k], stop[k]):
                        out[v, i, j] += t * right[k, j]


def nnls_stacked(
    A: np.ndarray,
    B: np.ndarray,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Non-negative least squares for a stack of problems, each with its own matrix.

    .. math::

        x_v = \arg\min_{x \ge 0} \lVert A_v x - b_v \rVert_2 ,\qquad v = 1, \dots, V,

    solved exactly by Lawson & Hanson's active-set method (1974, ch. 23), with the passive columns
    kept as a QR factorisation, in parallel over the stack (see the module documentation). Variable
    j may enter while its dual value exceeds ``tol`` ‖a_{v,j}‖ ‖b_v‖, and every solution is
    certified by the KKT conditions

    .. math::

        x \ge 0,\quad w = A_v^\mathsf{T}(b_v - A_v x),\quad |w_j| \le \tau_{vj}
        \text{ where } x_j > 0,\quad w_j \le \tau_{vj} \text{ where } x_j = 0,

    .. math::

        \tau_{vj} = \max(10\,\mathrm{tol},\; 10\sqrt{M}\,\varepsilon)\,
        \lVert a_{v,j} \rVert \big(\lVert b_v \rVert + \textstyle\sum_k x_k \lVert a_{v,k} \rVert\big)

    (ε the float64 machine epsilon: the round-off of w); a problem that fails is solved again
    with ``scipy.optimize.nnls``.

    Parameters
    ----------
    A : array_like, shape (V, M, N)
        One matrix per problem; N > M (over-complete) is allowed. float64 C-contiguous input is
        read in place, without a copy.
    B : array_like, shape (V, M)
        One right-hand side per problem.
    tol : float, default 0
        Dual value, relative to ‖a_{v,j}‖ ‖b_v‖ (column norm times right-hand-side norm), that a
        variable must exceed to enter the passive set. 0 is SciPy's rule.
    max_iter : int, optional
        Maximum number of variables entering a passive set per problem (default ``3 N``, as
        ``scipy.optimize.nnls``). A problem that reaches it is solved again with SciPy; if SciPy
        fails too, it keeps its last feasible iterate and a ``RuntimeWarning`` says how many did.

    Returns
    -------
    X : ndarray, shape (V, N)
        Non-negative solutions.
    rnorm : ndarray, shape (V,)
        Residual norms ``‖A_v x_v − b_v‖₂``.

    Raises
    ------
    InputError
        Wrong shapes, empty or non-finite input, a negative tolerance or iteration count.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
    ...               [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    >>> X, rnorm = nnls_stacked(A, np.array([[2.0, 1.0, 1.0], [1.0, -1.0, 5.0]]))
    >>> X.round(6).tolist(), rnorm.round(6).tolist()
    ([[1.5, 1.0], [1.0, 0.0]], [0.707107, 5.09902])
    """
    A, B = _checked(A, B)
    tol, max_iter = _options(tol, max_iter, A.shape[1], A.shape[2])
    return _solve(A, B, tol, max_iter)


def nnls_factored(
    left: np.ndarray,
    right: np.ndarray,
    B: np.ndarray,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Non-negative least squares for stacked matrices that share a right factor, ``A_v = L_v R``.

    When the inner dimension K is smaller than M, each problem is first reduced exactly to K rows:
    with the thin QR factorisation :math:`L_v = Q_v T_v` (Householder, :math:`Q_v^\mathsf{T}Q_v = I`),

    .. math::

        \lVert L_v R x - b_v 
Vert_2^2 = \lVert T_v R x - Q_v^\mathsf{T} b_v 
Vert_2^2
        + \lVert b_v - Q_v Q_v^\mathsf{T} b_v 
Vert_2^2 ,

    so the minimiser is that of the K × N problem, solved by :func:`nnls_stacked`, and the KKT
    conditions are the same (:math:`A_v^\mathsf{T}(b_v - A_v x) = (T_vR)^\mathsf{T}(Q_v^\mathsf{T}b_v
    - T_vRx)`). A dictionary whose atoms are smooth functions has a factor R of low numerical
    rank (e.g. a truncated SVD of its table of fingerprints), and the reduced problems are then
    much smaller than ``A_v``. When K ≥ M the products ``L_v R`` are formed and solved directly.

    Parameters
    ----------
    left : array_like, shape (V, M, K)
        Per-problem left factors.
    right : array_like, shape (K, N)
        The shared right factor.
    B : array_like, shape (V, M)
        Right-hand sides.
    tol, max_iter
        As in :func:`nnls_stacked`, applied to the reduced problems (their column norms are those
        of ``A_v``, their right-hand-side norms at most ‖b_v‖).

    Returns
    -------
    X : ndarray, shape (V, N)
        Non-negative solutions.
    rnorm : ndarray, shape (V,)
        Residual norms ``‖L_v R x_v − b_v‖₂`` (reduced residual and the part of b_v outside the
        range of L_v, combined).

    Raises
    ------
    InputError
        Wrong shapes, empty or non-finite input.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> left, right = rng.random((3, 50, 4)), rng.random((4, 30))
    >>> B = rng.random((3, 50))
    >>> X, rnorm = nnls_factored(left, right, B)
    >>> X2, rnorm2 = nnls_stacked(left @ right, B)
    >>> bool(np.allclose(rnorm, rnorm2, rtol=1e-12))
    True
    """
    left, right = _real(left, "left"), _real(right, "right")
    if left.ndim != 3 or left.size == 0:
        raise InputError("left", f"must be a non-empty array of shape (V, M, K), got {left.shape}")
    if right.ndim != 2 or right.shape[0] != left.shape[2] or right.size == 0:
        raise InputError("right", f"must have shape ({left.shape[2]}, N), got {right.shape}")
    left = np.ascontiguousarray(left, dtype=np.float64)
    right = np.ascontiguousarray(right, dtype=np.float64)
    for name, a in (("left", left), ("right", right)):
        if not np.isfinite(a).all():
            raise InputError(name, "contains NaN or Inf")
    V, M, K = left.shape
    B = _right_hand_sides(B, (V, M))
    if K >= M:
        return nnls_stacked(left @ right, B, tol=tol, max_iter=max_iter)
    tol, max_iter = _options(tol, max_iter, K, right.shape[1])
    T = np.empty((V, K, K))
    reduced = np.empty((V, K))
    outside = np.empty(V)
    _householder_reduce(left, B, T, reduced, outside)
    nonzero = right != 0
    first = np.where(nonzero.any(axis=1), np.argmax(nonzero, axis=1), 0)
    stop = np.where(nonzero.any(axis=1), right.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    A = np.empty((V, K, right.shape[1]))
    # Compiled rather than BLAS: BLAS results may change in the last bit with the memory alignment
    # of the operands, and solutions on coherent dictionaries can follow another path on such a
    # change (same objective value, other x).
    _left_times_right(T, right, first, stop, A)
    X, rnorm = _solve(A, reduced, tol, max_iter)
    return X, np.hypot(rnorm, outside)


def _options(tol: Any, max_iter: Any, m: int, n: int) -> tuple[float, int]:
    """Checked tolerance and iteration limit, with their defaults for m × n problems."""
    if max_iter is None:
        max_iter = 3 * n
    elif isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise InputError("max_iter", f"must be a non-negative integer, got {max_iter!r}")
    if tol is None:
        tol = 0.0
    else:
        try:
            tol = float(tol)
        except (TypeError, ValueError):
            raise InputError("tol", f"must be a non-negative finite number, got {tol!r}") from None
        if not (np.isfinite(tol) and tol >= 0):
            raise InputError("tol", f"must be a non-negative finite number, got {tol!r}")
    return float(tol), int(max_iter)


def _solve(A: np.ndarray, B: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Solve a checked stack: Lawson–Hanson, certificates, SciPy for the uncertified."""
    V, M, N = A.shape
    c = np.empty((V, N))
    norms2 = np.empty((V, N))
    _column_statistics(A, B, c, norms2)
    bad = ~np.isfinite(norms2).all(axis=1)
    if bad.any():
        raise InputError("A", f"matrix {int(np.flatnonzero(bad)[0])} contains NaN or Inf "
                              "(or values too large to square)")
    norms = np.sqrt(norms2)
    dual_tol = tol * norms * np.linalg.norm(B, axis=1)[:, None]

    X = np.zeros((V, N))
    converged = np.empty(V, dtype=bool)
    _lawson_hanson(A, B, c, dual_tol, max_iter, X, converged)
    rnorm, certified = _certify(A, B, X, norms, max(10 * tol, 10 * np.sqrt(M) * np.finfo(np.float64).eps))
    # A certified point is optimal however it was reached.
    converged |= certified
    for v in np.flatnonzero(~certified):
        try:
            X[v], rnorm[v] = scipy.optimize.nnls(A[v], B[v], maxiter=max(max_iter, 1))
            converged[v] = True
        except RuntimeError:  # SciPy ran out of iterations too: keep the feasible iterate
            converged[v] = False
    unconverged = int(V - converged.sum())
    if unconverged:
        warnings.warn(f"nnls_stacked: {unconverged} of {V} problems did not converge in {max_iter} "
                      "iterations", RuntimeWarning, stacklevel=3)
    return X, rnorm


def _gather_columns(A: np.ndarray, matrix: np.ndarray, variables: np.ndarray) -> np.ndarray:
    """``A[matrix[i]][:, variables[i]]`` for every i: (len(matrix), M, k), by one flat ``take``."""
    _, M, N = A.shape
    index = (matrix[:, None, None] * M + np.arange(M)[None, :, None]) * N + variables[:, None, :]
    return A.reshape(-1).take(index)


def _real(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise InputError(name, f"must be a real numeric array, got dtype {a.dtype}")
    return a


def _right_hand_sides(B, shape: tuple[int, int]) -> np.ndarray:
    B = _real(B, "B")
    if B.shape != shape:
        raise InputError("B", f"must have shape {shape} (one right-hand side per matrix), got {B.shape}")
    B = np.ascontiguousarray(B, dtype=np.float64)
    if not np.isfinite(B).all():
        raise InputError("B", "contains NaN or Inf")
    return B


def _checked(A, B) -> tuple[np.ndarray, np.ndarray]:
    A = _real(A, "A")
    if A.ndim != 3 or A.size == 0:
        raise InputError("A", f"must be a non-empty array of shape (V, M, N), got {A.shape}")
    B = _right_hand_sides(B, A.shape[:2])
    # The matrices are checked for NaN/Inf through their column norms, in the pass that needs those.
    return np.ascontiguousarray(A, dtype=np.float64), B


def _certify(A: np.ndarray, b: np.ndarray, X: np.ndarray, norms: np.ndarray,
             relative: float) -> tuple[np.ndarray, np.ndarray]:
    """Residual norms and KKT certificates of the solutions ``X`` (one more pass over ``A``), with
    slack ``relative ‖a_j‖ (‖b‖ + Σ_k x_k ‖a_k‖)``: the round-off of the recomputed dual vector."""
    V, N = X.shape
    support = X > 0
    width = max(int(support.sum(axis=1).max(initial=0)), 1)
    variables = np.argsort(~support, axis=1, kind="stable")[:, :width]
    values = np.take_along_axis(X, variables, axis=1)
    columns = _gather_columns(A, np.arange(V), variables)
    residual = b - np.einsum("kmp,kp->km", columns, values)
    w = np.empty((V, N))
    _dual(A, np.ascontiguousarray(residual), w)
    slack = relative * norms * (np.linalg.norm(b, axis=1) + (X * norms).sum(axis=1))[:, None]
    certified = np.where(support, np.abs(w) <= slack, w <= slack).all(axis=1) & (X >= 0).all(axis=1)
    return np.linalg.norm(residual, axis=1), certified
