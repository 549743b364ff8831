"""Exhaustive dictionary fingerprinting of two crossing axon populations.

Fingerprinting (Rensonnet et al., NeuroImage 184:964, 2019; ICML IMLH 2021, Sec. 3.2, eq. 3–4)
explains a voxel's signal **y** by one atom of each sub-dictionary, :math:`\\mathbf{C}^1` rotated
to the first population's orientation and :math:`\\mathbf{C}^2` to the second's, with non-negative
weights, and keeps the best of all :math:`N_1 N_2` pairs:

.. math::

    (\\hat{j}_1, \\hat{j}_2) = \\operatorname*{argmin}_{j_1, j_2} \\; \\min_{w \\ge 0}
        \\left\\| \\mathbf{y} - w_1 \\mathbf{a}_{j_1} - w_2 \\mathbf{b}_{j_2} \\right\\|_2^2,
    \\qquad \\mathbf{a}_j = \\mathbf{C}^1_{:j},\\; \\mathbf{b}_k = \\mathbf{C}^2_{:k}.

Closed form of one pair
-----------------------
With the Gram quantities :math:`\\alpha = \\|a\\|^2`, :math:`\\beta = \\|b\\|^2`, :math:`g = a^Tb`,
:math:`c_1 = a^Ty`, :math:`c_2 = b^Ty` and :math:`\\Delta = \\alpha\\beta - g^2`, the unconstrained
minimiser is :math:`w_1 = (\\beta c_1 - g c_2)/\\Delta`, :math:`w_2 = (\\alpha c_2 - g c_1)/\\Delta`. When
both are positive it is the NNLS solution (a convex problem whose unconstrained minimiser is
feasible) and the objective drops from :math:`\\|y\\|^2` by :math:`w_1 c_1 + w_2 c_2`; otherwise the
solution lies on an edge of the orthant and is the better one-atom fit,
:math:`w = \\max(c, 0)/\\|\\cdot\\|^2` with drop :math:`\\max(c, 0)^2/\\|\\cdot\\|^2` (zero when both
correlations are ≤ 0). Pairs with :math:`\\Delta \\le 10^{-8}\\,\\alpha\\beta` (sin² of the angle
between the atoms below 1e-8, collinear to rounding) and atoms of zero norm use the one-atom fits:
Δ cannot be computed from Gram quantities to better than ~1e-16αβ, and for atoms pointing in
opposite directions an NNLS solver then returns huge, ill-conditioned weights instead (this never
happens with non-negative signal atoms).
Ties go to the first pair in row-major order, as :func:`numpy.argmin` would; objectives within
1e-12‖y‖² of each other count as tied, since rounding (here or in an NNLS solver) cannot order
them — an optimum that uses one atom only ties with every pair sharing that atom, for instance.

How all pairs are searched fast and exactly
-------------------------------------------
The cost is the cross Gram matrix :math:`\\mathbf{C}^{1T}\\mathbf{C}^2` per voxel (0.68 GFLOP at
M = 552, N = 782). Dictionary atoms of one orientation span a space of low numerical rank (signals
of a smooth two-parameter family), so it is computed through an exact identity: with orthonormal
bases :math:`U_1, U_2` (M × k) of the leading column spaces (a sparse random range finder, Halko,
Martinsson & Tropp, SIAM Rev. 53:217, 2011), :math:`P_i = U_i^T C^i` and remainders
:math:`R_i = C^i - U_i P_i`,

.. math::

    C^{1T} C^2 = P_1^T (U_1^T C^2 - U_1^T U_2 P_2) + (C^{1T} U_2) P_2 + R_1^T R_2,

whatever the bases. The first two terms cost :math:`O(kMN + kN^2)`; the last is bounded by
:math:`\\|r_{1j}\\|\\,\\|r_{2k}\\|` (norms bounded from :math:`\\|a\\|^2 - \\|p\\|^2` with rounding
terms) when that is negligible, and computed in float32 otherwise (error at most
:math:`\\gamma_M\\|r_{1j}\\|\\|r_{2k}\\|` plus conversion, Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, eq. 3.5). Every pair then gets its NNLS value from the approximate cross
product together with a rigorous margin: the objective of a pair is concave and non-decreasing
in g with slope :math:`2 w_1 w_2 \\le \\|y\\|^2 / (\\|a\\|\\|b\\| + g)`, so a cross-product error E
moves it by at most that slope times E, plus the float64 rounding of the closed form
(:math:`\\lesssim 20u\\,\\|y\\|^2 \\alpha\\beta/\\Delta`, u = 2⁻⁵³); the bounds carry a safety
factor 2. Pairs where this bound does not apply (:math:`g < -\\|a\\|\\|b\\|/2`, or nearly collinear,
:math:`\\Delta \\le 2\\cdot 10^{-8}\\alpha\\beta`) get an infinite margin. Only pairs whose interval
reaches the best guaranteed value survive (usually one to a few), and they are re-evaluated from
float64 dot products of their columns, in row-major order. The result is the pair the float64
closed form selects over all :math:`N_1 N_2` pairs, at a small fraction of the cost of the float64
cross Gram matrix.

Chunks of voxels run in worker threads (single-threaded BLAS and compiled kernels that release
the GIL), which meet once per chunk rather than at every matrix product.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
from pathlib import Path

import numba
import numpy as np
from numpy.typing import ArrayLike

import bioinverse
from bioinverse._checks import real_finite_array
from bioinverse._progress import progress_bar
from bioinverse.dmri.crossing import Microstructure, normalise_b0
from bioinverse.dmri.dictionary import FingerprintDictionary
from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError
from bioinverse.io import atomic_open

try:  # installed with scikit-learn
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

__all__ = ["Fingerprinting", "exhaustive_pair_search", "exhaustive_pair_search_bruteforce"]

_FORMAT = "bioinverse.dmri.fingerprint/1"
_PROTOCOL_FIELDS = ("directions", "gradient_strength", "small_delta", "big_delta", "echo_time")

_U32 = 2.0**-24  # unit round-off of float32
_U64 = 2.0**-53  # unit round-off of float64
_COLLINEAR = 1e-8  # sin² of the angle between two atoms at or below which a pair counts as collinear
_RANK = 10  # columns of each sub-dictionary's range finder
_SKETCH_NONZEROS = 8  # non-zeros per column of the sparse sign sketch
_SKIP_REMAINDER = 1e-9  # bound on |r₁ᵀr₂| / (‖a‖‖b‖) below which R₁ᵀR₂ is bounded, not computed
_SEED = 20210718
_TIE_RTOL = 1e-12  # objectives within this fraction of ‖y‖² are tied (rounding cannot order them)


def _gamma(n: int, unit: float) -> float:
    """Higham's γ_n = n u / (1 − n u): relative error bound of an n-term float sum of products."""
    return n * unit / (1.0 - n * unit)


# ---------------------------------------------------------------------------------------------
# compiled kernels
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _column_statistics(C, y, sketch_index, sketch_sign, norms2, proj, sketch, peak):  # pragma: no cover
    """‖C[:, j]‖², C[:, j]ᵀy, the sketch C Ω (Ω sparse, ±1) and max|C| in one pass over each voxel."""
    V, M, N = C.shape
    k, s = sketch_index.shape
    column_peak = np.empty(N)
    for v in range(V):
        for j in range(N):
            norms2[v, j] = 0.0
            proj[v, j] = 0.0
            column_peak[j] = 0.0
        for i in range(M):
            yi = y[v, i]
            for j in range(N):
                x = C[v, i, j]
                norms2[v, j] += x * x
                proj[v, j] += x * yi
                column_peak[j] = max(column_peak[j], abs(x))
            for r in range(k):
                acc = 0.0
                for t in range(s):
                    acc += sketch_sign[r, t] * C[v, i, sketch_index[r, t]]
                sketch[v, i, r] = acc
        peak[v] = column_peak.max()


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _remainders(C, U, P, scale, norms2, low):  # pragma: no cover - compiled
    """R = C − U P per voxel: squared column norms of R, and R · scale rounded to float32."""
    V, M, N = C.shape
    k = U.shape[2]
    row = np.empty(N)
    for v in range(V):
        for j in range(N):
            norms2[v, j] = 0.0
        for i in range(M):
            for j in range(N):
                row[j] = C[v, i, j]
            for q in range(k):
                u = U[v, i, q]
                for j in range(N):
                    row[j] -= u * P[v, q, j]
            for j in range(N):
                norms2[v, j] += row[j] * row[j]
                low[v, i, j] = np.float32(row[j] * scale[v])


@numba.njit(error_model="numpy")
def _dot(a, b):  # pragma: no cover - compiled
    # Eight interleaved partial sums: the same summation order for every pair, and vectorisable.
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = a.shape[0]
    n8 = n - n % 8
    for i in range(0, n8, 8):
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
    for i in range(n8, n):
        s0 += a[i] * b[i]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(error_model="numpy")
def _pair_drop(aaj, bbk, g, ayj, byk, one, tol):  # pragma: no cover - compiled
    """Drop ‖y‖² − min_{w≥0}‖y − w₁a − w₂b‖² of one pair (``one``: the better one-atom drop)."""
    aab = aaj * bbk
    det = aab - g * g
    w1n = bbk * ayj - g * byk
    w2n = aaj * byk - g * ayj
    if (w1n > 0.0) & (w2n > 0.0) & (det > tol * aab):
        return (w1n * ayj + w2n * byk) / det
    return one


@numba.njit(error_model="numpy")
def _screened_pair(aaj, bbk, g, ayj, byk, one, naj, nbk, rhoj, rhok, yy, c_res, c64, tol):  # pragma: no cover
    """(drop, margin) of one pair from an approximate cross product ``g``: the exact drop lies in
    [drop − margin, drop + margin]; margin = inf where no cheap bound holds."""
    aab = aaj * bbk
    det = aab - g * g
    w1n = bbk * ayj - g * byk
    w2n = aaj * byk - g * ayj
    inv_det = 1.0 / det
    drop = (w1n * ayj + w2n * byk) * inv_det
    drop = drop if ((w1n > 0.0) & (w2n > 0.0) & (det > tol * aab)) else one
    nn = naj * nbk
    rel = c_res * rhoj * rhok + c64  # |g − aᵀb| ≤ rel ‖a‖‖b‖
    # slope ≤ ‖y‖²/(‖a‖‖b‖ + g') ≤ 4‖y‖²/(‖a‖‖b‖) while g' ≥ −‖a‖‖b‖/2 − rel‖a‖‖b‖ and rel ≤ 1/4;
    # twice the error covers screen-vs-final; a further factor 2 covers first-order rounding terms
    margin = 16.0 * rel * yy + 4.0 * _U64 * yy * (20.0 * aab * inv_det + 3.0)
    margin = margin + (2.0 * tol * yy if det <= (2.0 * tol + 8.0 * rel) * aab else 0.0)
    margin = np.inf if ((det <= 2.0 * tol * aab) | (g < -0.5 * nn) | (4.0 * rel > 1.0)) else margin
    margin = 12.0 * _U64 * yy if nn == 0.0 else margin
    return drop, margin


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _select_pairs(G, G32, descale, aa, bb, ay, by, yy, rho1, rho2, c_res, c64, tol, tie, C1, C2, y,
                  j1, j2, weights, residual, n_candidates):  # pragma: no cover - compiled
    V, N1, N2 = G.shape
    M = C1.shape[1]
    for v in range(V):
        yyv = yy[v]
        tie_v = tie * yyv
        na = np.sqrt(aa[v])
        nb = np.sqrt(bb[v])
        r1 = np.zeros(N1)
        r2 = np.zeros(N2)
        for j in range(N1):
            if ay[v, j] > 0.0 and aa[v, j] > 0.0:
                r1[j] = ay[v, j] * ay[v, j] / aa[v, j]
        for k in range(N2):
            if by[v, k] > 0.0 and bb[v, k] > 0.0:
                r2[k] = by[v, k] * by[v, k] / bb[v, k]
        add32 = descale[v] != 0.0
        d32 = descale[v]
        cr = c_res[v]
        c64v = c64[v]
        # pass 1: the best guaranteed drop (floor), and every row's most optimistic drop
        lows = np.empty(N2)
        highs = np.empty(N2)
        row_top = np.empty(N1)
        floor = -np.inf
        for j in range(N1):
            aaj = aa[v, j]
            ayj = ay[v, j]
            r1j = r1[j]
            naj = na[j]
            rhoj = rho1[v, j]
            for k in range(N2):
                g = G[v, j, k]
                if add32:
                    g += d32 * G32[v, j, k]
                drop, margin = _screened_pair(aaj, bb[v, k], g, ayj, by[v, k], max(r1j, r2[k]), naj, nb[k],
                                              rhoj, rho2[v, k], yyv, cr, c64v, tol)
                lows[k] = drop - margin
                highs[k] = drop + margin
            top = -np.inf
            low = -np.inf
            for k in range(N2):
                top = max(top, highs[k])
                low = max(low, lows[k])
            row_top[j] = top
            floor = max(floor, low)
        # pass 2: the candidates, pairs whose most optimistic drop comes within a tie of the floor
        floor -= tie_v
        count = 0
        for sweep in range(2):
            if sweep == 1:
                cand = np.empty((count, 2), np.int64)
                count = 0
            for j in range(N1):
                if row_top[j] < floor:
                    continue
                for k in range(N2):
                    g = G[v, j, k]
                    if add32:
                        g += d32 * G32[v, j, k]
                    drop, margin = _screened_pair(aa[v, j], bb[v, k], g, ay[v, j], by[v, k], max(r1[j], r2[k]),
                                                  na[j], nb[k], rho1[v, j], rho2[v, k], yyv, cr, c64v, tol)
                    if drop + margin >= floor:
                        if sweep == 1:
                            cand[count, 0] = j
                            cand[count, 1] = k
                        count += 1
        n_candidates[v] = count
        # exact float64 cross products of the candidates, from contiguous copies of their columns
        slot1 = np.full(N1, -1, np.int64)
        slot2 = np.full(N2, -1, np.int64)
        n1 = 0
        n2 = 0
        for c in range(count):
            if slot1[cand[c, 0]] < 0:
                slot1[cand[c, 0]] = n1
                n1 += 1
            if slot2[cand[c, 1]] < 0:
                slot2[cand[c, 1]] = n2
                n2 += 1
        A = np.empty((n1, M))
        B = np.empty((n2, M))
        for i in range(M):
            for j in range(N1):
                if slot1[j] >= 0:
                    A[slot1[j], i] = C1[v, i, j]
            for k in range(N2):
                if slot2[k] >= 0:
                    B[slot2[k], i] = C2[v, i, k]
        drops = np.empty(count)
        products = np.empty(count)
        for c in range(count):
            j = cand[c, 0]
            k = cand[c, 1]
            if ay[v, j] <= 0.0 and by[v, k] <= 0.0:
                # ‖y − w₁a − w₂b‖² ≥ ‖y‖² − 2(w₁aᵀy + w₂bᵀy) ≥ ‖y‖² for every w ≥ 0: no drop at all
                products[c] = 0.0
                drops[c] = 0.0
            else:
                products[c] = _dot(A[slot1[j]], B[slot2[k]])
                drops[c] = _pair_drop(aa[v, j], bb[v, k], products[c], ay[v, j], by[v, k], max(r1[j], r2[k]), tol)
        best = drops.max()
        chosen = 0
        while drops[chosen] < best - tie_v:
            chosen += 1
        bj = cand[chosen, 0]
        bk = cand[chosen, 1]
        bg = products[chosen]
        aaj = aa[v, bj]
        bbk = bb[v, bk]
        ayj = ay[v, bj]
        byk = by[v, bk]
        det = aaj * bbk - bg * bg
        w1n = bbk * ayj - bg * byk
        w2n = aaj * byk - bg * ayj
        w1 = 0.0
        w2 = 0.0
        if (w1n > 0.0) & (w2n > 0.0) & (det > tol * aaj * bbk):
            w1 = w1n / det
            w2 = w2n / det
        elif r1[bj] >= r2[bk] and r1[bj] > 0.0:
            w1 = ayj / aaj
        elif r2[bk] > 0.0:
            w2 = byk / bbk
        j1[v] = bj
        j2[v] = bk
        weights[v, 0] = w1
        weights[v, 1] = w2
        res = 0.0
        for i in range(M):
            e = y[v, i] - w1 * C1[v, i, bj] - w2 * C2[v, i, bk]
            res += e * e
        residual[v] = res


# ---------------------------------------------------------------------------------------------
# exhaustive search
# ---------------------------------------------------------------------------------------------


def _search_inputs(C1: ArrayLike, C2: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for name, value, ndim in (("C1", C1, 3), ("C2", C2, 3), ("y", y, 2)):
        a = np.asarray(value)
        if a.dtype == object or np.iscomplexobj(a) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise InputError(name, f"must be a real numeric array, got dtype {a.dtype}")
        if a.ndim != ndim:
            raise InputError(name, f"must have {ndim} dimensions, got shape {a.shape}")
        arrays.append(np.ascontiguousarray(a, dtype=np.float64))
    C1, C2, y = arrays
    V, M, N1 = C1.shape
    if C2.shape[:2] != (V, M) or y.shape != (V, M):
        raise InputError("C1, C2, y", f"must have shapes (V, M, N1), (V, M, N2) and (V, M); got {C1.shape}, "
                                      f"{C2.shape} and {y.shape}")
    if M == 0 or N1 == 0 or C2.shape[2] == 0:
        raise InputError("C1, C2", f"need at least one measurement and one atom each; got {C1.shape} and "
                                   f"{C2.shape}")
    return C1, C2, y


class _Workspace:
    """Named scratch arrays reused from chunk to chunk and batch to batch: fresh allocations of
    tens of MB cost more in page faults than the arithmetic done in them."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = np.empty(size, dtype)
            self._buffers[name] = buffer
        return buffer[:size].reshape(shape)


def _sparse_sketch(n_atoms: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns of a sparse sign matrix Ω (n_atoms × rank): indices and ±1 of their non-zeros."""
    rng = np.random.default_rng(seed)
    nonzeros = min(_SKETCH_NONZEROS, n_atoms)
    index = np.zeros((rank, nonzeros), np.int64)
    for r in range(rank):
        index[r] = rng.choice(n_atoms, nonzeros, replace=False)
    return index, rng.choice([-1.0, 1.0], size=(rank, nonzeros))


def _remainder_bound(norms2: np.ndarray, coeffs: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Upper bound of ‖a_j − U p_j‖ for every atom, without forming the remainder.

    ‖a − Up‖² = ‖a‖² − 2pᵀUᵀa + pᵀUᵀUp exactly; with p = fl(Uᵀa) = Uᵀa + e (‖e‖ ≤ γ_M√k‖a‖) and
    F = UᵀU − I this is ‖a‖² − ‖p‖² + 2pᵀe + pᵀFp, bounded with the rounding of ‖a‖², ‖p‖² and F.
    """
    M, rank = basis.shape[1:]
    pp = np.einsum("vrn,vrn->vn", coeffs, coeffs)
    defect = basis.transpose(0, 2, 1) @ basis - np.eye(rank)
    defect = np.sqrt(np.einsum("vrs,vrs->v", defect, defect)) + rank * _gamma(M, _U64)
    slack = (_gamma(M, _U64) * (3.0 + 2.0 * math.sqrt(rank)) + _gamma(2 * rank, _U64) + 4.0 * _U64
             + defect[:, None]) * 1.01
    return np.sqrt(np.maximum(norms2 - pp, 0.0) + slack * np.maximum(norms2, pp))


def _cross_products(c1, c2, aa, bb, peak1, peak2, sketch1, sketch2, work):
    """C1ᵀC2 per voxel, as a float64 low-rank part plus (where needed) float32 remainder products,
    with what bounds the error: see the module notes.

    Returns G, G32, descale (n,; 0 where G32 is not used), rho1, rho2 (bounds of remainder norms
    over atom norms), c_res (n,) and c64 (n,).
    """
    n, M, N1 = c1.shape
    N2 = c2.shape[2]
    rank = sketch1.shape[2]
    U1, _ = np.linalg.qr(sketch1)
    U2, _ = np.linalg.qr(sketch2)
    both = np.concatenate([U1, U2], axis=2).transpose(0, 2, 1)  # (n, 2k, M)
    T1 = np.matmul(both, c1, out=work.take("T1", (n, 2 * rank, N1)))  # [P1; U2ᵀC1]
    T2 = np.matmul(both, c2, out=work.take("T2", (n, 2 * rank, N2)))  # [U1ᵀC2; P2]
    P1, P2 = T1[:, :rank], T2[:, rank:]
    right = work.take("right", (n, 2 * rank, N2))
    right[:, rank:] = P2
    np.subtract(T2[:, :rank], np.matmul(U1.transpose(0, 2, 1) @ U2, P2), out=right[:, :rank])
    G = np.matmul(T1.transpose(0, 2, 1), right, out=work.take("G", (n, N1, N2)))
    tiny = np.finfo(np.float64).tiny
    norm1 = np.maximum(np.sqrt(aa), tiny)
    norm2 = np.maximum(np.sqrt(bb), tiny)
    rho1 = _remainder_bound(aa, P1, U1) / norm1
    rho2 = _remainder_bound(bb, P2, U2) / norm2
    # rounding of H = U1ᵀC2, U2ᵀC1, U1ᵀU2 and of the products (P1, P2 need none: the identity
    # holds for whatever coefficients were computed), then of remainders formed explicitly
    c64 = np.full(n, 4.0 * _gamma(M + 2 * rank, _U64) * (rank + 2.0 * math.sqrt(rank) + 2.0)
                  + 8.0 * (1.0 + math.sqrt(rank)) * _gamma(rank + 1, _U64))
    c_res = np.ones(n)
    descale = np.zeros(n)
    G32 = work.take("G32-none", (n, 1, 1), np.float32)
    if (rho1.max(axis=1) * rho2.max(axis=1)).max() > _SKIP_REMAINDER:
        # Remainders are not negligible (Monte Carlo noise, generic matrices): add R1ᵀR2 computed
        # in float32, each side scaled by the power of two that brings max|C| to (0.5, 1]; as
        # |R| ≤ |C| + |U||P| ≤ (1 + √k)·max|C|·1.01, float32 cannot overflow.
        scale1 = 2.0 ** -np.ceil(np.log2(np.maximum(peak1, tiny)))
        scale2 = 2.0 ** -np.ceil(np.log2(np.maximum(peak2, tiny)))
        low1 = work.take("low1", c1.shape, np.float32)
        low2 = work.take("low2", c2.shape, np.float32)
        norms1, norms2 = work.take("rr1", (n, N1)), work.take("rr2", (n, N2))
        _remainders(c1, U1, np.ascontiguousarray(P1), scale1, norms1, low1)
        _remainders(c2, U2, np.ascontiguousarray(P2), scale2, norms2, low2)
        rho1 = np.sqrt(norms1) * (1.0 + _gamma(M, _U64)) / norm1
        rho2 = np.sqrt(norms2) * (1.0 + _gamma(M, _U64)) / norm2
        G32 = np.matmul(low1.transpose(0, 2, 1), low2, out=work.take("G32", (n, N1, N2), np.float32))
        descale = 1.0 / (scale1 * scale2)
        # float32 dot products of float32-rounded inputs (Higham eq. 3.5 plus the input rounding)
        c_res[:] = _gamma(M, _U32) * (1.0 + _U32) ** 2 + 2.0 * _U32 + _U32**2
        # subnormal range after scaling: |error| ≤ M·2^-148 / (scale1·scale2), relative to the smallest ‖a‖‖b‖
        smallest = (np.where(aa > 0, norm1, np.inf).min(axis=1) * np.where(bb > 0, norm2, np.inf).min(axis=1))
        c64 += np.where(np.isfinite(smallest), M * 2.0**-148 * descale / smallest, 0.0)
    return G, G32, descale, rho1, rho2, c_res, c64


def exhaustive_pair_search(C1: ArrayLike, C2: ArrayLike, y: ArrayLike, *, chunk: int = 4,
                           threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best pair of atoms, one per sub-dictionary, for every voxel: eq. (3)–(4) with K = 2.

    .. math::

        (\\hat{j}_1, \\hat{j}_2) = \\operatorname*{argmin}_{j_1, j_2} \\min_{w \\ge 0}
            \\|\\mathbf{y} - w_1 \\mathbf{C}^1_{:j_1} - w_2 \\mathbf{C}^2_{:j_2}\\|_2^2

    (Rensonnet et al., ICML IMLH 2021), solved exactly over all N1·N2 pairs with the closed-form
    two-variable NNLS; see the module notes for the algorithm and its error control. The selected
    pair is the one the float64 closed form picks over all pairs (ties, objectives within
    1e-12‖y‖²: the first pair in row-major order), as :func:`exhaustive_pair_search_bruteforce`
    does with one NNLS solve per pair.

    Parameters
    ----------
    C1 : array_like, shape (V, M, N1)
        First sub-dictionary per voxel (atoms in columns), e.g. rotated to the first orientation.
    C2 : array_like, shape (V, M, N2)
        Second sub-dictionary per voxel.
    y : array_like, shape (V, M)
        Signals (normalised like the atoms).
    chunk : int, default 4
        Voxels processed together by one thread (scratch memory ~6 MB per voxel at
        N1 = N2 = 782, ~20 MB when the float32 remainder products are needed).
    threads : int, optional
        Worker threads (default: the cores this process may use); 1 also keeps BLAS on one core.

    Returns
    -------
    j1, j2 : ndarray, shape (V,), int64
        Selected atoms. When the optimum uses one atom only, the other index is the first that
        ties (0 unless an interior pair does equally well).
    weights : ndarray, shape (V, 2)
        Their non-negative weights w₁, w₂.
    residual : ndarray, shape (V,)
        Squared residual norm ‖y − w₁a − w₂b‖², recomputed from the vectors.

    Raises
    ------
    InputError
        Non-numeric or complex input, wrong shapes, NaN/Inf, or values whose squares overflow.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> C1, C2 = rng.random((1, 20, 6)), rng.random((1, 20, 5))
    >>> y = 0.7 * C1[:, :, 4] + 0.3 * C2[:, :, 1]
    >>> j1, j2, w, res = exhaustive_pair_search(C1, C2, y)
    >>> int(j1[0]), int(j2[0]), w.round(6).tolist(), bool(res[0] < 1e-20)
    (4, 1, [[0.7, 0.3]], True)
    """
    return _search(C1, C2, y, chunk, threads)[:4]


def _search(C1: ArrayLike, C2: ArrayLike, y: ArrayLike, chunk: int = 4, threads: int | None = None,
            work: list[_Workspace] | None = None) -> tuple[np.ndarray, ...]:
    """:func:`exhaustive_pair_search`, plus the number of pairs re-evaluated exactly per voxel.

    Chunks of voxels go to ``threads`` worker threads, each running single-threaded BLAS and
    compiled kernels that release the GIL: threads meet once per chunk instead of at every matrix
    product, which keeps the speed when the cores are shared with other work.
    """
    C1, C2, y = _search_inputs(C1, C2, y)
    chunk = _positive_int(chunk, "chunk")
    one_core = threads is not None and _positive_int(threads, "threads") == 1
    threads = _available_cores() if threads is None else _positive_int(threads, "threads")
    V, M, N1 = C1.shape
    N2 = C2.shape[2]
    out = (np.zeros(V, np.int64), np.zeros(V, np.int64), np.zeros((V, 2)), np.zeros(V), np.zeros(V, np.int64))
    rank = _RANK if min(M, N1, N2) >= 4 * _RANK else 0  # small problems: plain float64 products
    sketches = (_sparse_sketch(N1, rank, _SEED), _sparse_sketch(N2, rank, _SEED + 1))
    starts = list(range(0, V, chunk))
    threads = max(1, min(threads, len(starts)))
    work = [] if work is None else work
    work.extend(_Workspace() for _ in range(threads - len(work)))
    if threads == 1:  # one chunk, or one thread asked for (then BLAS gets one too)
        with _single_threaded_blas() if one_core else contextlib.nullcontext():
            for start in starts:
                _search_chunk(C1, C2, y, slice(start, min(start + chunk, V)), rank, sketches, work[0], out)
        return out
    lock = threading.Lock()
    pending = iter(starts)
    errors: list[BaseException] = []

    def worker(workspace: _Workspace) -> None:
        while not errors:
            with lock:
                start = next(pending, None)
            if start is None:
                return
            try:
                _search_chunk(C1, C2, y, slice(start, min(start + chunk, V)), rank, sketches, workspace, out)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)

    with _single_threaded_blas():
        pool = [threading.Thread(target=worker, args=(work[t],), daemon=True) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    if errors:
        raise errors[0]
    return out


def _search_chunk(C1, C2, y, s, rank, sketches, work, out) -> None:
    """The search for the voxels ``s``, written into the output arrays ``out``."""
    c1, c2, yc = C1[s], C2[s], y[s]
    n, M, N1 = c1.shape
    N2 = c2.shape[2]
    (index1, sign1), (index2, sign2) = sketches
    aa, ay = work.take("aa", (n, N1)), work.take("ay", (n, N1))
    bb, by = work.take("bb", (n, N2)), work.take("by", (n, N2))
    sketch1, sketch2 = work.take("sketch1", (n, M, rank)), work.take("sketch2", (n, M, rank))
    peak1, peak2 = np.empty(n), np.empty(n)
    _column_statistics(c1, yc, index1, sign1, aa, ay, sketch1, peak1)
    _column_statistics(c2, yc, index2, sign2, bb, by, sketch2, peak2)
    yy = np.einsum("vm,vm->v", yc, yc)
    for name, value in (("C1", aa), ("C2", bb), ("y", yy)):
        if not np.isfinite(value).all():
            raise InputError(name, "contains NaN or Inf, or values whose squares overflow")
    if not (np.isfinite(ay).all() and np.isfinite(by).all()):
        raise InputError("C1, C2, y", "products of atoms and signals overflow")
    if rank and (peak1 * peak2).max() < 1e300:  # near the float64 range, rescaling could overflow
        G, G32, descale, rho1, rho2, c_res, c64 = _cross_products(c1, c2, aa, bb, peak1, peak2, sketch1, sketch2,
                                                                  work)
    else:
        G = np.matmul(c1.transpose(0, 2, 1), c2, out=work.take("G", (n, N1, N2)))
        G32, descale = work.take("G32-none", (n, 1, 1), np.float32), np.zeros(n)
        rho1, rho2, c_res = np.zeros((n, N1)), np.zeros((n, N2)), np.zeros(n)
        c64 = np.full(n, 2.0 * _gamma(M, _U64))
    j1, j2, weights, residual, n_candidates = out
    _select_pairs(G, G32, descale, aa, bb, ay, by, yy, rho1, rho2, c_res, c64, _COLLINEAR, _TIE_RTOL, c1, c2, yc,
                  j1[s], j2[s], weights[s], residual[s], n_candidates[s])


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(name, f"must be a positive integer, got {value!r}")
    return int(value)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


@functools.cache
def _blas_controller():
    # Built once: finding the loaded BLAS libraries takes tens of milliseconds.
    return ThreadpoolController() if ThreadpoolController else None


def _single_threaded_blas():
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller else contextlib.nullcontext()


def exhaustive_pair_search_bruteforce(C1: ArrayLike, C2: ArrayLike, y: ArrayLike
                                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference for :func:`exhaustive_pair_search`: one :func:`scipy.optimize.nnls` per pair.

    The seed's procedure (Rensonnet et al., ICML IMLH 2021, eq. 4): an active-set NNLS
    (Lawson & Hanson, *Solving Least Squares Problems*, 1974, ch. 23) on ``[C1[:, j1], C2[:, j2]]``
    for every pair, the pair of least squared residual kept. Slow by design (~N1·N2 solver calls
    per voxel); for tests and timing on a few voxels. Ties are treated as in
    :func:`exhaustive_pair_search`.

    Parameters
    ----------
    C1 : array_like, shape (V, M, N1)
    C2 : array_like, shape (V, M, N2)
    y : array_like, shape (V, M)

    Returns
    -------
    j1, j2, weights, residual
        As :func:`exhaustive_pair_search` (residual: ‖y − w₁a − w₂b‖², recomputed).

    Raises
    ------
    InputError
        As :func:`exhaustive_pair_search`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> C1, C2 = rng.random((1, 20, 6)), rng.random((1, 20, 5))
    >>> y = 0.7 * C1[:, :, 4] + 0.3 * C2[:, :, 1]
    >>> j1, j2, w, res = exhaustive_pair_search_bruteforce(C1, C2, y)
    >>> int(j1[0]), int(j2[0]), w.round(6).tolist()
    (4, 1, [[0.7, 0.3]])
    """
    from scipy.optimize import nnls

    C1, C2, y = _search_inputs(C1, C2, y)
    for name, value in (("C1", C1), ("C2", C2), ("y", y)):
        if not np.isfinite(value).all():
            raise InputError(name, "contains NaN or Inf")
    V, M, N1 = C1.shape
    N2 = C2.shape[2]
    j1 = np.zeros(V, np.int64)
    j2 = np.zeros(V, np.int64)
    weights = np.zeros((V, 2))
    residual = np.zeros(V)
    pair = np.empty((M, 2))
    objective = np.empty(N1 * N2)
    solutions = np.empty((N1 * N2, 2))
    for v in range(V):
        for j in range(N1):
            pair[:, 0] = C1[v, :, j]
            for k in range(N2):
                pair[:, 1] = C2[v, :, k]
                w, rnorm = nnls(pair, y[v])
                objective[j * N2 + k] = rnorm * rnorm
                solutions[j * N2 + k] = w
        best = int(np.flatnonzero(objective <= objective.min() + _TIE_RTOL * float(y[v] @ y[v]))[0])
        j1[v], j2[v] = divmod(best, N2)
        weights[v] = solutions[best]
        fit = weights[v, 0] * C1[v, :, j1[v]] + weights[v, 1] * C2[v, :, j2[v]]
        residual[v] = float((y[v] - fit) @ (y[v] - fit))
    return j1, j2, weights, residual


# ---------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------


class Fingerprinting:
    """Exhaustive dictionary fingerprinting of two crossing populations (the seed's eq. 3–4).

    Each voxel's signal, divided by its mean b = 0 signal, is explained by one atom of the
    dictionary rotated to the first orientation and one rotated to the second, with non-negative
    weights (:func:`exhaustive_pair_search`); population k gets the radius and density of its atom
    and the signal fraction

    .. math::

        \\nu_k = \\frac{w_k}{w_1 + w_2}  \\qquad (\\nu_1 = \\nu_2 = 1/2 \\text{ if } w_1 = w_2 = 0).

    Nothing is learned: :meth:`fit` only checks that the dictionary covers the protocol.
    Reference: Rensonnet et al., NeuroImage 184:964 (2019); ICML IMLH workshop (2021), Sec. 3.2.

    Parameters
    ----------
    dictionary : FingerprintDictionary
        Fingerprints of single populations; must hold every shell of ``protocol``.
    protocol : PGSEProtocol
        The acquisition of the signals to analyse (with at least one G = 0 measurement).

    Attributes
    ----------
    dictionary_ : FingerprintDictionary
        After :meth:`fit`: the dictionary restricted to the protocol's shells.

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.crossing import Microstructure, crossing_signals
    >>> from bioinverse.dmri.dictionary import build_dictionary
    >>> from bioinverse.dmri.pgse import PGSEProtocol
    >>> from bioinverse.dmri.acquisition import electrostatic_directions
    >>> g = np.vstack([np.zeros((2, 3)), electrostatic_directions(30, seed=0)])
    >>> p = PGSEProtocol(np.vstack([g, g[2:]]), [0.0] * 2 + [70.0] * 30 + [150.0] * 30, 12.9, 21.8, 57.0)
    >>> d = build_dictionary(p, radius=[0.5, 1.5, 2.0, 0.5, 1.5, 2.0], density=[0.3, 0.3, 0.3, 0.6, 0.6, 0.6],
    ...                      n_angles=91, progress=False)
    >>> u = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    >>> truth = Microstructure([[0.6, 0.4]], [[2.0, 0.5]], [[0.6, 0.3]])
    >>> est = Fingerprinting(d, p).fit().predict(100.0 * crossing_signals(p, u, truth), u)
    >>> est.nu.round(2).tolist(), est.radius.tolist(), est.density.tolist()
    ([[0.6, 0.4]], [[2.0, 0.5]], [[0.6, 0.3]])
    """

    def __init__(self, dictionary: FingerprintDictionary, protocol: PGSEProtocol) -> None:
        if not isinstance(dictionary, FingerprintDictionary):
            raise InputError("dictionary", f"must be a FingerprintDictionary, got {type(dictionary).__name__}")
        if not isinstance(protocol, PGSEProtocol):
            raise InputError("protocol", f"must be a PGSEProtocol, got {type(protocol).__name__}")
        self.dictionary = dictionary
        self.protocol = protocol
        self.dictionary_: FingerprintDictionary | None = None

    def fit(self) -> Fingerprinting:
        """Check that the dictionary covers the protocol and keep the shells it uses.

        Returns
        -------
        Fingerprinting
            ``self``.

        Raises
        ------
        InputError
            A shell of the protocol missing from the dictionary, or no G = 0 measurement.
        """
        if not self.protocol.b0s_mask.any():
            raise InputError("protocol", "has no measurement without diffusion weighting (G = 0) to normalise by")
        self.dictionary_ = self.dictionary.for_protocol(self.protocol)
        return self

    def predict(self, signals: ArrayLike, orientations: ArrayLike, *, batch_size: int = 16,
                progress: bool = False) -> Microstructure:
        """Parameters of both populations of every voxel (fits first if :meth:`fit` was not called).

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Measurements in the protocol's order (any scale; divided by the mean b = 0 signal).
        orientations : array_like, shape (V, 2, 3)
            Fibre directions u₁, u₂ per voxel (true or estimated); population k is tied to u_k.
        batch_size : int, default 16
            Voxels whose rotated dictionaries (2 × M × N float64 each, 6.9 MB at M = 552,
            N = 782) are built at once.
        progress : bool, default False
            Show a progress bar on stderr.

        Returns
        -------
        Microstructure
            ν, radius (µm) and density per population.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, a voxel whose mean b = 0 signal is ≤ 0, or a zero orientation.
        """
        if self.dictionary_ is None:
            self.fit()
        dictionary = self.dictionary_
        y = normalise_b0(signals, self.protocol)
        u = real_finite_array(orientations, "orientations")
        if u.shape != (y.shape[0], 2, 3):
            raise InputError("orientations", f"must have shape ({y.shape[0]}, 2, 3) like the signals, got {u.shape}")
        batch_size = _positive_int(batch_size, "batch_size")
        V, M, N = y.shape[0], y.shape[1], dictionary.n_atoms
        j = np.zeros((V, 2), np.int64)
        weights = np.zeros((V, 2))
        size = min(batch_size, V)
        atoms1, atoms2 = np.empty((size, M, N)), np.empty((size, M, N))
        work: list[_Workspace] = []
        with progress_bar(progress) as bar:
            task = bar.add_task("fingerprinting", total=V)
            for start in range(0, V, batch_size):
                stop = min(start + batch_size, V)
                n = stop - start
                C1 = dictionary.atoms(self.protocol, u[start:stop, 0], out=atoms1[:n])
                C2 = dictionary.atoms(self.protocol, u[start:stop, 1], out=atoms2[:n])
                j1, j2, w, _, _ = _search(C1, C2, y[start:stop], work=work)
                j[start:stop, 0], j[start:stop, 1], weights[start:stop] = j1, j2, w
                bar.update(task, completed=stop)
        total = weights.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            nu = np.where(total > 0, weights / total, 0.5)
        return Microstructure(nu, dictionary.radius[j], dictionary.density[j])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the estimator (dictionary and protocol, with its digest) to one ``.npz``, atomically.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from bioinverse.dmri.dictionary import build_dictionary
        >>> from bioinverse.dmri.pgse import PGSEProtocol
        >>> p = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 70.0], 12.9, 21.8, 57.0)
        >>> d = build_dictionary(p, radius=[1.0, 2.0], density=[0.5, 0.5], n_angles=5, progress=False)
        >>> f = Fingerprinting(d, p).fit().save(pathlib.Path(tempfile.mkdtemp()) / "fp.npz")
        >>> Fingerprinting.load(f, p).dictionary_.n_atoms
        2
        """
        if self.dictionary_ is None:
            self.fit()
        d, p = self.dictionary_, self.protocol
        metadata = {"format": _FORMAT, "bioinverse_version": bioinverse.__version__,
                    "protocol_digest": p.digest(), "dictionary": d.metadata(),
                    "build_seconds": d.build_seconds}
        arrays = {f"protocol_{name}": np.asarray(getattr(p, name)) for name in _PROTOCOL_FIELDS}
        with atomic_open(path, "wb") as fh:
            np.savez(fh, radius=d.radius, density=d.density, shells=d.shells, angles=d.angles, signals=d.signals,
                     metadata=np.array(json.dumps(metadata, allow_nan=False)), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, protocol: PGSEProtocol | None = None) -> Fingerprinting:
        """Read an estimator written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
        protocol : PGSEProtocol, optional
            The protocol of the data to analyse; refused unless it is the saved one (same digest).

        Returns
        -------
        Fingerprinting
            Fitted, with the saved protocol.

        Raises
        ------
        InputError
            Missing, foreign or corrupt file, or ``protocol`` differs from the saved one.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(path, f"is not a readable .npz file ({type(exc).__name__})") from None
        try:
            metadata = json.loads(str(arrays["metadata"]))
        except (KeyError, ValueError):
            metadata = None
        if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
            raise InputError(path, f"is not a saved fingerprinting estimator (no {_FORMAT!r} format tag)")
        try:
            saved = PGSEProtocol(**{name: arrays[f"protocol_{name}"] for name in _PROTOCOL_FIELDS})
            if saved.digest() != metadata["protocol_digest"]:
                raise ValueError("the stored protocol does not match its digest")
            stored = metadata["dictionary"]
            dictionary = FingerprintDictionary(arrays["radius"], arrays["density"], arrays["shells"],
                                               arrays["angles"], arrays["signals"], stored["generator"],
                                               stored["settings"], float(metadata.get("build_seconds", 0.0)))
            for key in ("shells_digest", "grid_digest"):
                if dictionary.metadata()[key] != stored[key]:
                    raise ValueError(f"the dictionary does not match its {key}")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(path, f"is a corrupt fingerprinting estimator ({type(exc).__name__}: {exc})") from None
        if protocol is not None:
            if not isinstance(protocol, PGSEProtocol):
                raise InputError("protocol", f"must be a PGSEProtocol, got {type(protocol).__name__}")
            if protocol.digest() != metadata["protocol_digest"]:
                raise InputError("protocol", f"differs from the protocol {path.name} was saved for (digest "
                                             f"{protocol.digest()[:12]}… vs {metadata['protocol_digest'][:12]}…); "
                                             "build or restrict a dictionary for it instead")
        return cls(dictionary, saved).fit()
