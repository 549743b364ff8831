"""Diffusion kurtosis imaging (DKI): a vectorised, constrained weighted linear least-squares fit.

The model (Jensen et al. 2005) is linear in 22 parameters once the signal is log-transformed,

.. math::

    \\log S(b, \\mathbf g) = \\log S_0 - b \\sum_{ij} g_i g_j D_{ij}
        + \\frac{b^2}{6} \\sum_{ijkl} g_i g_j g_k g_l \\tilde W_{ijkl},
    \\qquad \\tilde W = \\mathrm{MD}^2\\, W ,

so every voxel is a small weighted least-squares problem ``A x ≈ log S`` with one design matrix
``A`` (n × 22). :class:`DKIModel` solves all voxels at once: batched normal equations (one matrix
product for all Gram matrices, one batched inversion), with dipy's two-step WLS (weights = squared
signal predicted by an OLS fit; Veraart et al. 2013). Voxels whose estimate violates the physical
constraints of Tabesh et al. (2011) are re-solved, again batched, as a quadratic program (see
:class:`DKIModel`).

Scalar measures (:func:`kurtosis_measures`) follow dipy's definitions and defaults: analytical mean,
radial and axial kurtosis (Tabesh et al. 2011) and kurtosis fractional anisotropy (Glenn et al. 2015).

References
----------
Jensen JH, Helpern JA, Ramani A, Lu H, Kaczynski K (2005). Diffusional kurtosis imaging. Magn Reson
Med 53:1432–1440.

Tabesh A, Jensen JH, Ardekani BA, Helpern JA (2011). Estimation of tensors and tensor-derived
measures in diffusional kurtosis imaging. Magn Reson Med 65:823–836.

Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B (2013). Weighted linear least squares
estimation of diffusion MRI parameters: strengths, limitations, and pitfalls. NeuroImage 81:335–346.

Glenn GR, Helpern JA, Tabesh A, Jensen JH (2015). Quantitative assessment of diffusional kurtosis
anisotropy. NMR Biomed 28:448–459.

Lawson CL, Hanson RJ (1974). Solving Least Squares Problems. Prentice-Hall, ch. 23.

Henriques RN, Correia MM, Marrale M, et al. (2021). Diffusional kurtosis imaging in the diffusion
imaging in Python project. Front Hum Neurosci 15:675433 (dipy's implementation).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import scipy.optimize
from numpy.typing import ArrayLike

from bioinverse._progress import progress_bar
from bioinverse.dmri.signal import (
    _D_FULL,
    _W_FULL,
    _gradients,
    _kurtosis,
    _leading_s0,
    _quadratic_basis,
    _quartic_basis,
    _tensor,
    dki_signal,
    kurtosis_elements,
    tensor_elements,
)
from bioinverse.errors import InputError

try:  # installed with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = ["DKIFit", "DKIModel", "design_matrix", "kurtosis_measures"]

#: Keys of :func:`kurtosis_measures` (and scalar properties of :class:`DKIFit`).
MEASURES = ("md", "fa", "ad", "rd", "mk", "ak", "rk", "kfa")

_N_PARAMS = 22
_CHUNK_BYTES = 64 * 2**20
# dipy's thresholds: eigenvalues at or below this (mm²/s) make the kurtosis measures 0, and two
# eigenvalues within this relative distance use the equal-eigenvalue limits of Tabesh et al.
_POSITIVE_EVAL = 2e-7
_EQUAL_EVALS = 2.5e-2
# Measurements predicted more than ~10^7.5 times below a voxel's largest signal get this relative
# WLS weight at least, so that the weighted Gram matrix stays invertible.
_MIN_RELATIVE_WEIGHT = 1e-15
# Position of each entry of a symmetric 22×22 matrix in its row-major upper triangle.
_SYMMETRIC_FILL = np.zeros((22, 22), dtype=np.intp)
_SYMMETRIC_FILL[np.triu_indices(22)] = np.arange(22 * 23 // 2)
_SYMMETRIC_FILL = np.maximum(_SYMMETRIC_FILL, _SYMMETRIC_FILL.T)


def design_matrix(gtab) -> np.ndarray:
    """The DKI design matrix.

    Row ``k`` (volume with b-value :math:`b` and direction :math:`\\mathbf g`) is

    .. math::

        A_k = \\big(1,\\; -b\\, m_{ij} g_i g_j \\;(6),\\; \\tfrac{b^2}{6}\\, m_{ijkl} g_i g_j g_k g_l \\;(15)\\big)

    for the parameters :math:`x = (\\log S_0, D_{xx}, D_{xy}, D_{yy}, D_{xz}, D_{yz}, D_{zz},
    \\tilde W_{xxxx}, \\ldots, \\tilde W_{xyzz})` in dipy's element orders, where :math:`m` counts
    the index permutations of each unique element and :math:`\\tilde W = \\mathrm{MD}^2 W`, so that
    :math:`\\log S = A x` (Jensen et al. 2005).

    Parameters
    ----------
    gtab : GradientTable
        ``n`` b-values (s/mm²) and unit directions.

    Returns
    -------
    A : ndarray, shape (n, 22)

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.io import GradientTable
    >>> gtab = GradientTable(np.array([0.0, 1000.0]), np.array([[0, 0, 0], [0.6, 0.8, 0.0]]))
    >>> A = design_matrix(gtab)
    >>> A.shape, A[1, :4].round(3).tolist()
    ((2, 22), [1.0, -360.0, -960.0, -640.0])
    """
    bvals, bvecs = _gradients(gtab)
    return np.concatenate(
        [
            np.ones((bvals.size, 1)),
            -bvals[:, None] * _quadratic_basis(bvecs),
            (bvals**2 / 6)[:, None] * _quartic_basis(bvecs),
        ],
        axis=1,
    )


def _hemisphere_directions(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the hemisphere z ≥ 0 (Fibonacci lattice, equal-area)."""
    i = np.arange(n) + 0.5
    z = 1 - i / n
    r = np.sqrt(1 - z**2)
    phi = i * np.pi * (3 - np.sqrt(5))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


# ==================================================================================================
# scalar measures


def _carlson_rf(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Carlson's symmetric elliptic integral R_F by duplication (Carlson 1995), vectorised.

    All elements iterate together until the slowest has converged; extra duplication steps are
    exact, so the faster ones only gain accuracy. Truncation error < errtol⁶/4 ≈ 2.5e-19.
    """
    errtol = 1e-15
    A = (x + y + z) / 3
    Q = (3 * errtol) ** (-1 / 6) * np.max(np.abs([A - x, A - y, A - z]), axis=0)
    scale = 1.0
    while (Q * scale > np.abs(A)).any():
        sx, sy, sz = np.sqrt(x), np.sqrt(y), np.sqrt(z)
        lam = sx * (sy + sz) + sy * sz
        x, y, z, A = (x + lam) / 4, (y + lam) / 4, (z + lam) / 4, (A + lam) / 4
        scale /= 4
    X = 1 - x / A
    Y = 1 - y / A
    Z = -X - Y
    E2 = X * Y - Z * Z
    E3 = X * Y * Z
    return (1 - E2 / 10 + E3 / 14 + E2 * E2 / 24 - 3 * E2 * E3 / 44) / np.sqrt(A)


def _carlson_rd(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Carlson's elliptic integral of the second kind R_D by duplication (Carlson 1995), vectorised."""
    errtol = 1e-15
    x0, y0 = x, y
    A0 = (x + y + 3 * z) / 5
    A = A0
    Q = (errtol / 4) ** (-1 / 6) * np.max(np.abs([A - x, A - y, A - z]), axis=0)
    total = np.zeros_like(A)
    scale = 1.0
    while (Q * scale > np.abs(A)).any():
        sx, sy, sz = np.sqrt(x), np.sqrt(y), np.sqrt(z)
        lam = sx * (sy + sz) + sy * sz
        total = total + scale / (sz * (z + lam))
        x, y, z, A = (x + lam) / 4, (y + lam) / 4, (z + lam) / 4, (A + lam) / 4
        scale /= 4
    X = (A0 - x0) * scale / A
    Y = (A0 - y0) * scale / A
    Z = -(X + Y) / 3
    E2 = X * Y - 6 * Z * Z
    E3 = (3 * X * Y - 8 * Z * Z) * Z
    E4 = 3 * (X * Y - Z * Z) * Z * Z
    E5 = X * Y * Z**3
    series = 1 - 3 * E2 / 14 + E3 / 6 + 9 * E2 * E2 / 88 - 3 * E4 / 22 - 9 * E2 * E3 / 52 + 3 * E5 / 26
    return scale * A**-1.5 * series + 3 * total


def _close(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(a - b) < ref * _EQUAL_EVALS


def _f2_axial(l1: np.ndarray, l3: np.ndarray) -> np.ndarray:
    """Tabesh's F2(λ1, λ3, λ3): the limit of F2 for two equal eigenvalues (λ1 ≠ λ3)."""
    x = 1 - l1 / l3
    root = np.sqrt(np.abs(x))
    prolate = x > 0
    alpha = np.empty_like(x)
    alpha[prolate] = np.arctanh(root[prolate]) / root[prolate]
    alpha[~prolate] = np.arctan(root[~prolate]) / root[~prolate]
    return 6 * (l1 + 2 * l3) ** 2 / (144 * l3**2 * (l1 - l3) ** 2) * (l3 * (l1 + 2 * l3) + l1 * (l1 - 4 * l3) * alpha)


def _f2_limit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """F2(a, b, b) with dipy's isotropic cut-off."""
    out = np.full(a.shape, 6 / 15)
    k = ~_close(a, b, b)
    out[k] = _f2_axial(a[k], b[k])
    return out


def _f1(a, b, c, rf, rd):
    """Tabesh's F1(a, b, c); ``rf``, ``rd`` = R_F, R_D(a/b, a/c, 1). Branches as dipy's."""
    ab, ac = _close(a, b, a), _close(a, c, a)
    out = np.full(a.shape, 1 / 5)
    k = ab & ~ac
    out[k] = _f2_limit(c[k], (a[k] + b[k]) / 2) / 2
    k = ac & ~ab
    out[k] = _f2_limit(b[k], (a[k] + c[k]) / 2) / 2
    k = ~ab & ~ac
    a, b, c, rf, rd = a[k], b[k], c[k], rf[k], rd[k]
    sbc = np.sqrt(b * c)
    out[k] = (a + b + c) ** 2 / (18 * (a - b) * (a - c)) * (
        sbc / a * rf + (3 * a**2 - a * b - a * c - b * c) / (3 * a * sbc) * rd - 1
    )
    return out


def _f2(a, b, c, rf, rd):
    """Tabesh's F2(a, b, c); ``rf``, ``rd`` = R_F, R_D(a/b, a/c, 1). Branches as dipy's."""
    bc = _close(b, c, b)
    out = np.empty(a.shape)
    out[bc] = _f2_limit(a[bc], (b[bc] + c[bc]) / 2)
    # dipy compares |a − b| with b (not with the mean of b and c) for the isotropic cut-off.
    out[bc & _close(a, b, b)] = 6 / 15
    k = ~bc
    a, b, c, rf, rd = a[k], b[k], c[k], rf[k], rd[k]
    sbc = np.sqrt(b * c)
    out[k] = (a + b + c) ** 2 / (3 * (b - c) ** 2) * ((b + c) / sbc * rf + (2 * a - b - c) / (3 * sbc) * rd - 2)
    return out


def _g1(a, b, c):
    """Tabesh's G1(a, b, c) for the radial kurtosis."""
    out = (a + 2 * b) ** 2 / (24 * b**2)
    k = ~_close(b, c, b)
    a, b, c = a[k], b[k], c[k]
    out[k] = (a + b + c) ** 2 / (18 * b * (b - c) ** 2) * (2 * b + (c**2 - 3 * b * c) / np.sqrt(b * c))
    return out


def _g2(a, b, c):
    """Tabesh's G2(a, b, c) for the radial kurtosis."""
    out = (a + 2 * b) ** 2 / (12 * b**2)
    k = ~_close(b, c, b)
    a, b, c = a[k], b[k], c[k]
    out[k] = (a + b + c) ** 2 / (3 * (b - c) ** 2) * ((b + c) / np.sqrt(b * c) - 2)
    return out


def _measures_flat(d6: np.ndarray, w15: np.ndarray, min_kurtosis: float, max_kurtosis: float) -> dict:
    """The scalar measures of (N,) voxels given their tensor elements (N, 6), (N, 15)."""
    evals, evecs = np.linalg.eigh(d6[:, _D_FULL])
    evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]
    lam = np.maximum(evals, 0.0)
    l1, l2, l3 = lam.T
    md = lam.mean(axis=1)
    sq = (lam**2).sum(axis=1)
    spread = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
    fa = np.sqrt(0.5 * spread / np.where(sq > 0, sq, 1.0))
    out = {"md": md, "fa": fa, "ad": l1.copy(), "rd": (l2 + l3) / 2}

    W = w15[:, _W_FULL].reshape(-1, 9, 9)
    # Rotated elements Ŵ_aabb = Σ W_ijkl V_ia V_ja V_kb V_lb in the eigenbasis of D.
    proj = (evecs.transpose(0, 2, 1)[:, :, :, None] * evecs.transpose(0, 2, 1)[:, :, None, :]).reshape(-1, 3, 9)
    rot = proj @ (W @ proj.transpose(0, 2, 1))

    mk, ak, rk = (np.zeros(len(md)) for _ in range(3))
    pos = (lam > _POSITIVE_EVAL).all(axis=1)
    if pos.any():
        a, b, c, r, m = l1[pos], l2[pos], l3[pos], rot[pos], md[pos]
        args = ((a, b, c), (b, a, c), (c, b, a))
        ells = [(_carlson_rf(p / q, p / s, np.ones_like(p)), _carlson_rd(p / q, p / s, np.ones_like(p))) for p, q, s in args]
        F1 = [_f1(*arg, *ell) for arg, ell in zip(args, ells)]
        F2 = [_f2(*arg, *ell) for arg, ell in zip(args, ells)]
        mk[pos] = (
            F1[0] * r[:, 0, 0] + F1[1] * r[:, 1, 1] + F1[2] * r[:, 2, 2]
            + F2[0] * r[:, 1, 2] + F2[1] * r[:, 0, 2] + F2[2] * r[:, 0, 1]
        )  # fmt: skip
        ak[pos] = r[:, 0, 0] * m**2 / a**2
        rk[pos] = _g1(a, b, c) * r[:, 1, 1] + _g1(a, c, b) * r[:, 2, 2] + _g2(a, b, c) * r[:, 1, 2]
        for k in (mk, ak, rk):
            k[pos] = np.clip(k[pos], min_kurtosis, max_kurtosis)
    out.update(mk=mk, ak=ak, rk=rk)

    flat = W.reshape(-1, 81)
    mkt = np.einsum("niijj->n", W.reshape(-1, 3, 3, 3, 3)) / 5
    iso = np.zeros((3, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            iso[i, i, j, j] += 1 / 3
            iso[i, j, i, j] += 1 / 3
            iso[i, j, j, i] += 1 / 3
    norm2 = (flat**2).sum(axis=1)
    excess2 = ((flat - mkt[:, None] * iso.ravel()) ** 2).sum(axis=1)
    ok = (norm2 > 0) & (mkt > 1e-8)
    out["kfa"] = np.sqrt(np.divide(excess2, norm2, out=np.zeros_like(norm2), where=ok))
    return out


def kurtosis_measures(
    D: ArrayLike, W: ArrayLike, min_kurtosis: float = -3.0 / 7, max_kurtosis: float = 10.0
) -> dict[str, np.ndarray]:
    """Scalar diffusion and kurtosis measures of DKI tensors, with dipy's definitions and defaults.

    With :math:`\\lambda_1 \\ge \\lambda_2 \\ge \\lambda_3` the eigenvalues of ``D`` (clipped at 0),
    :math:`\\mathbf e_k` its eigenvectors and :math:`\\hat W_{ijkl}` the kurtosis tensor in that
    eigenbasis:

    .. math::

        \\mathrm{MD} = \\tfrac{1}{3}\\textstyle\\sum_k \\lambda_k, \\quad
        \\mathrm{FA} = \\sqrt{\\tfrac{1}{2}\\tfrac{(\\lambda_1-\\lambda_2)^2 + (\\lambda_2-\\lambda_3)^2
            + (\\lambda_3-\\lambda_1)^2}{\\lambda_1^2+\\lambda_2^2+\\lambda_3^2}}, \\quad
        \\mathrm{AD} = \\lambda_1, \\quad \\mathrm{RD} = \\tfrac{\\lambda_2+\\lambda_3}{2}

        \\mathrm{MK} = \\frac{1}{4\\pi}\\oint K(\\mathbf n)\\, d\\Omega
           = \\sum_{i} F_1(\\lambda_i, \\lambda_j, \\lambda_k) \\hat W_{iiii}
             + \\sum_{i} F_2(\\lambda_i, \\lambda_j, \\lambda_k) \\hat W_{jjkk}

        \\mathrm{AK} = K(\\mathbf e_1) = \\hat W_{1111}\\, \\mathrm{MD}^2 / \\lambda_1^2, \\qquad
        \\mathrm{RK} = G_1(\\lambda_1, \\lambda_2, \\lambda_3) \\hat W_{2222} + G_1(\\lambda_1, \\lambda_3, \\lambda_2) \\hat W_{3333}
            + G_2(\\lambda_1, \\lambda_2, \\lambda_3) \\hat W_{2233}

        \\mathrm{KFA} = \\frac{\\lVert W - \\overline W\\, I^{(4)} \\rVert_F}{\\lVert W \\rVert_F}, \\qquad
        \\overline W = \\tfrac{1}{5} \\textstyle\\sum_{ij} W_{iijj}, \\quad
        I^{(4)}_{ijkl} = \\tfrac{1}{3}(\\delta_{ij}\\delta_{kl} + \\delta_{ik}\\delta_{jl} + \\delta_{il}\\delta_{jk})

    where :math:`F_{1,2}` use Carlson's elliptic integrals :math:`R_F, R_D` and :math:`G_{1,2}` are
    closed forms (Tabesh et al. 2011, MRM 65:823, Appendix); KFA is from Glenn et al. (2015) and
    Hansen & Jespersen (2016, Sci Rep 6:33236).

    As in dipy (``DiffusionKurtosisFit.mk/ak/rk(analytical=True)`` and ``.kfa``): eigenvalues whose
    relative difference is below 2.5 % use the equal-eigenvalue limits of :math:`F_{1,2}, G_{1,2}`;
    MK, AK and RK are 0 where an eigenvalue is ≤ 2e-7 mm²/s and otherwise clipped to
    ``[min_kurtosis, max_kurtosis]``; KFA is 0 where :math:`\\overline W \\le 10^{-8}`.

    Parameters
    ----------
    D : array_like, shape (..., 3, 3)
        Diffusion tensors, mm²/s.
    W : array_like, shape (..., 3, 3, 3, 3)
        Kurtosis tensors (dimensionless), same leading shape as ``D``.
    min_kurtosis, max_kurtosis : float
        Clipping range of MK, AK and RK (dipy's defaults: -3/7, the limit for water confined to
        spherical pores, and 10).

    Returns
    -------
    dict
        ``md``, ``ad``, ``rd`` (mm²/s), ``fa``, ``mk``, ``ak``, ``rk``, ``kfa`` (dimensionless):
        arrays with the leading shape.

    Examples
    --------
    An isotropic voxel with kurtosis 1 in every direction:

    >>> import numpy as np
    >>> from bioinverse.dmri.signal import kurtosis_from_elements
    >>> W = kurtosis_from_elements([1, 1, 1, 0, 0, 0, 0, 0, 0, 1/3, 1/3, 1/3, 0, 0, 0])
    >>> m = kurtosis_measures(np.eye(3) * 1e-3, W)
    >>> {k: round(float(v), 6) for k, v in m.items()}
    {'md': 0.001, 'fa': 0.0, 'ad': 0.001, 'rd': 0.001, 'mk': 1.0, 'ak': 1.0, 'rk': 1.0, 'kfa': 0.0}
    """
    D = _tensor(D)
    W = _kurtosis(W)
    if D.shape[:-2] != W.shape[:-4]:
        raise InputError("W", f"leading shape {W.shape[:-4]} differs from D's {D.shape[:-2]}")
    lo, hi = _clip_range(min_kurtosis, max_kurtosis)
    leading = D.shape[:-2]
    d6 = tensor_elements(D).reshape(-1, 6)
    w15 = kurtosis_elements(W).reshape(-1, 15)
    flat = _measures_chunked(d6, w15, lo, hi)
    return {k: v.reshape(leading) for k, v in flat.items()}


def _clip_range(min_kurtosis: float, max_kurtosis: float) -> tuple[float, float]:
    lo, hi = float(min_kurtosis), float(max_kurtosis)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise InputError("min_kurtosis", f"need finite min_kurtosis ≤ max_kurtosis, got {lo:g} and {hi:g}")
    return lo, hi


def _measures_chunked(d6: np.ndarray, w15: np.ndarray, lo: float, hi: float) -> dict:
    out = {k: np.zeros(len(d6)) for k in MEASURES}
    step = 65536
    for start in range(0, len(d6), step):
        part = _measures_flat(d6[start : start + step], w15[start : start + step], lo, hi)
        for k, v in part.items():
            out[k][start : start + step] = v
    return out


# ==================================================================================================
# fitting


def _solve(H: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Batched ``H⁻¹ r`` (H: (N, p, p), r: (N, p)); pseudo-inverse if a matrix is singular."""
    try:
        return np.linalg.solve(H, r[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(H) @ r[..., None])[..., 0]


class _ActiveSets:
    """Lawson–Hanson state of a batch of cone projections (see :func:`_project_onto_cone`).

    Per voxel: the active constraints in ``slots`` (−1 = free slot), their rows ``Crows[:, s] = C_j``,
    ``U[:, s] = H⁻¹ C_jᵀ`` and ``q[:, s] = C_j x*`` for the constraint ``j`` in slot ``s`` (zero at
    free slots), the inverse ``Kinv`` of ``K_PP = C_P H⁻¹ C_Pᵀ`` embedded with zeros at free slots,
    and the multipliers ``lam``.
    """

    def __init__(self, Hinv: np.ndarray, x_star: np.ndarray, C: np.ndarray, tol: np.ndarray, capacity: int):
        n, p = x_star.shape
        self.C = C
        self.index = np.arange(n)
        # Constraints found dependent on the current active set: skipped until the set changes.
        self.blocked = np.zeros((n, len(C)), dtype=bool)
        self.any_blocked = False
        self.Hinv, self.x_star, self.tol = Hinv, x_star, tol
        self.x = x_star.copy()
        self.slots = np.full((n, capacity), -1, dtype=np.intp)
        self.Crows = np.zeros((n, capacity, p))
        self.U = np.zeros((n, capacity, p))
        self.q = np.zeros((n, capacity))
        self.Kinv = np.zeros((n, capacity, capacity))
        self.lam = np.zeros((n, capacity))

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, rows: np.ndarray) -> None:
        for name in ("index", "Hinv", "x_star", "tol", "x", "slots", "Crows", "U", "q", "Kinv", "lam", "blocked"):
            setattr(self, name, getattr(self, name)[rows])

    def width(self, rows=slice(None)) -> int:
        occupied = self.slots[rows] >= 0
        return int(occupied.shape[1] - np.argmax(occupied[:, ::-1].any(axis=0))) if occupied.any() else 0

    def refresh(self, rows: np.ndarray) -> None:
        """Recompute ``Kinv`` of voxels ``rows`` from scratch (when the updates lost accuracy)."""
        w = self.width(rows)
        if w == 0:
            return
        valid = self.slots[rows, :w] >= 0
        K = self.Crows[rows, :w] @ self.U[rows, :w].transpose(0, 2, 1) + np.eye(w) * ~valid[:, None, :]
        try:
            Kinv = np.linalg.inv(K)
        except np.linalg.LinAlgError:
            Kinv = np.linalg.pinv(K)
        self.Kinv[rows] = 0.0
        self.Kinv[rows, :w, :w] = Kinv * (valid[:, :, None] & valid[:, None, :])

    def add(self, rows: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Put constraint ``j[r]`` into the first free slot of voxel ``rows[r]`` (bordered inverse).

        Returns the slot used, or −1 where the constraint is numerically dependent on the active ones.
        """
        C = self.C
        slot = np.argmax(self.slots[rows] < 0, axis=1)
        w = max(self.width(rows), int(slot.max()) + 1)
        Hinv = self.Hinv if len(rows) == len(self) else self.Hinv[rows]  # all rows, in order
        u = np.matmul(Hinv, C[j][:, :, None])[:, :, 0]
        border = np.matmul(self.Crows[rows, :w], u[:, :, None])[:, :, 0]
        corner = np.einsum("rp,rp->r", C[j], u)

        def schur_of(Kinv):
            Kb = np.einsum("rkl,rl->rk", Kinv, border)
            return Kb, corner - np.einsum("rk,rk->r", border, Kb)

        Kinv = self.Kinv[rows, :w, :w]
        Kb, schur = schur_of(Kinv)
        # The Schur complement is the squared distance of the new constraint from the span of the
        # active ones (H⁻¹ metric), ≥ 0 in exact arithmetic. A small or negative value means either
        # a dependent constraint or an updated inverse that has drifted: refactorise and look again.
        doubtful = schur <= 1e-8 * corner
        if doubtful.any():
            self.refresh(rows[doubtful])
            Kinv[doubtful] = self.Kinv[rows[doubtful], :w, :w]
            Kb, schur = schur_of(Kinv)
        ok = schur > 1e-12 * corner
        rows, j, slot, u, Kinv, Kb, schur = rows[ok], j[ok], slot[ok], u[ok], Kinv[ok], Kb[ok], schur[ok]
        r = np.arange(len(rows))
        Kinv += Kb[:, :, None] * Kb[:, None, :] / schur[:, None, None]
        Kinv[r, :, slot] = -Kb / schur[:, None]
        Kinv[r, slot, :] = -Kb / schur[:, None]
        Kinv[r, slot, slot] = 1 / schur
        self.Kinv[rows, :w, :w] = Kinv
        self.U[rows, slot] = u
        self.Crows[rows, slot] = C[j]
        self.q[rows, slot] = np.einsum("rp,rp->r", C[j], self.x_star[rows])
        self.slots[rows, slot] = j
        self.blocked[rows] = False
        out = np.full(len(ok), -1)
        out[ok] = slot
        return out

    def remove(self, rows: np.ndarray, slot: np.ndarray) -> None:
        """Drop the constraint in ``slot[r]`` of voxel ``rows[r]`` (Schur downdate of Kinv)."""
        r = np.arange(len(rows))
        w = self.width(rows)
        Kinv = self.Kinv[rows, :w, :w]
        col = Kinv[r, :, slot]
        Kinv -= col[:, :, None] * col[:, None, :] / col[r, slot][:, None, None]
        Kinv[r, slot, :] = 0.0
        Kinv[r, :, slot] = 0.0
        self.Kinv[rows, :w, :w] = Kinv
        self.slots[rows, slot] = -1
        self.blocked[rows] = False
        self.q[rows, slot] = 0.0
        self.U[rows, slot] = 0.0
        self.Crows[rows, slot] = 0.0
        self.lam[rows, slot] = 0.0

    def multipliers(self, rows: np.ndarray, w: int) -> np.ndarray:
        """Unconstrained minimiser on the active set: ``λ_P = −K_PP⁻¹ C_P x*``."""
        return -np.matmul(self.Kinv[rows, :w, :w], self.q[rows, :w, None])[:, :, 0]

    def update_x(self, rows: np.ndarray, w: int) -> None:
        self.x[rows] = self.x_star[rows] + np.matmul(self.lam[rows, None, :w], self.U[rows, :w])[:, 0]


def _project_onto_cone(
    Hinv: np.ndarray, x_star: np.ndarray, C: np.ndarray, tol: np.ndarray, max_outer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batched ``argmin_x ½ (x − x*)ᵀ H (x − x*)  s.t.  C x ≥ 0``.

    Lawson & Hanson's NNLS (1974, ch. 23) applied to the dual: the solution is
    ``x = x* + H⁻¹ C_Pᵀ λ_P`` with multipliers λ_P > 0 on an active set P. Each outer step adds the
    most violated constraint ``argmin_j C_j x``; the inner loop solves
    ``(C_P H⁻¹ C_Pᵀ) λ_P = −C_P x*`` and, while a multiplier is not positive, moves back to the
    feasible segment and drops the constraints whose multiplier reaches zero. The inverse of
    ``C_P H⁻¹ C_Pᵀ`` is kept up to date by bordering (add) and Schur downdates (drop), so a step
    is a few batched products over the voxels that are still iterating. Converged voxels are
    polished and certified by :func:`_polish`.

    Returns ``x`` (N, p) and a mask of voxels that were not certified (to be solved otherwise).
    """
    N, p = x_star.shape
    x = x_star.copy()
    failed = np.zeros(N, dtype=bool)
    st = _ActiveSets(Hinv, x_star, C, tol, capacity=p)
    converged = np.zeros(N, dtype=bool)
    for _ in range(max_outer):
        todo = np.flatnonzero(~converged[st.index])
        if todo.size == 0:
            break
        if todo.size < len(st) // 2:
            _polish(st, np.flatnonzero(converged[st.index]), C, x, failed)
            st.keep(todo)
            todo = np.arange(len(st))
        # Active constraints hold with equality (to round-off, far below tol), so they are not
        # picked again; skipped ones are masked out.
        values = st.x[todo] @ C.T
        if st.any_blocked:
            values[st.blocked[todo]] = np.inf
        j = np.argmin(values, axis=1)
        violated = values[np.arange(todo.size), j] < -st.tol[todo]
        converged[st.index[todo[~violated]]] = True
        todo, j = todo[violated], j[violated]
        full = (st.slots[todo] >= 0).all(axis=1)
        failed[st.index[todo[full]]] = True
        converged[st.index[todo[full]]] = True
        todo, j = todo[~full], j[~full]
        if todo.size == 0:
            continue
        new_slot = st.add(todo, j)
        # Lawson & Hanson's rule for a column that cannot enter: skip it and try the next one.
        dependent = new_slot < 0
        st.blocked[todo[dependent], j[dependent]] = True
        st.any_blocked |= bool(dependent.any())
        todo, new_slot = todo[~dependent], new_slot[~dependent]
        first = True
        while todo.size:
            w = st.width(todo)
            valid = st.slots[todo, :w] >= 0
            lam_new = st.multipliers(todo, w)
            bad = valid & (lam_new <= 0)
            ok = ~bad.any(axis=1)
            st.lam[todo[ok], :w] = lam_new[ok]
            st.update_x(todo[ok], w)
            if first:
                # In exact arithmetic the entering multiplier is positive (Lawson & Hanson, eq. 23.29);
                # if round-off says otherwise, refactorise, and if it persists skip the constraint.
                stuck = np.flatnonzero(bad[np.arange(todo.size), new_slot])
                if stuck.size:
                    st.refresh(todo[stuck])
                    again = st.multipliers(todo[stuck], w)
                    lam_new[stuck], bad[stuck] = again, valid[stuck] & (again <= 0)
                    still = bad[stuck, new_slot[stuck]]
                    rows, slot = todo[stuck[still]], new_slot[stuck[still]]
                    j_out = st.slots[rows, slot]
                    st.remove(rows, slot)
                    st.blocked[rows, j_out] = True
                    st.any_blocked |= bool(rows.size)
                    ok[stuck[still]] = True
                    fine = stuck[~still & ~bad[stuck].any(axis=1)]
                    st.lam[todo[fine], :w] = lam_new[fine]
                    st.update_x(todo[fine], w)
                    ok[fine] = True
                first = False
            todo, lam_new, bad, valid = todo[~ok], lam_new[~ok], bad[~ok], valid[~ok]
            if todo.size == 0:
                break
            lam_old = st.lam[todo, :w]
            denom = lam_old - lam_new
            ratio = np.full(lam_old.shape, np.inf)
            np.divide(lam_old, denom, out=ratio, where=bad & (denom > 0))
            ratio[bad & ~(denom > 0)] = 0.0
            alpha = ratio.min(axis=1, keepdims=True)
            step = lam_old + alpha * (lam_new - lam_old)
            drop = valid & (step <= 0)
            drop[np.arange(todo.size), ratio.argmin(axis=1)] = True
            st.lam[todo, :w] = np.where(drop, 0.0, step)
            rr, ss = np.nonzero(drop)
            # One Schur downdate per dropped constraint; a voxel rarely drops more than one at a time.
            while rr.size:
                first_of_row = np.r_[True, rr[1:] != rr[:-1]]
                st.remove(todo[rr[first_of_row]], ss[first_of_row])
                rr, ss = rr[~first_of_row], ss[~first_of_row]
    failed[st.index[~converged[st.index]]] = True
    _polish(st, np.arange(len(st)), C, x, failed)
    return x, failed


def _polish(st: _ActiveSets, rows: np.ndarray, C: np.ndarray, x: np.ndarray, failed: np.ndarray) -> None:
    """Write the solutions of ``rows`` into ``x`` and flag those that fail the KKT check.

    The multipliers get two steps of iterative refinement against the exact ``K_PP = C_P U_P`` (the
    updated inverse has accumulated round-off); certified means λ ≥ 0 and ``C x ≥ −tol``.
    """
    x[st.index[rows]] = st.x[rows]
    rows = rows[(st.slots[rows] >= 0).any(axis=1) & ~failed[st.index[rows]]]
    if rows.size == 0:
        return
    w = st.width(rows)
    K = st.Crows[rows, :w] @ st.U[rows, :w].transpose(0, 2, 1)
    Kinv = st.Kinv[rows, :w, :w]
    lam = st.lam[rows, :w]
    for _ in range(2):  # iterative refinement of K_PP λ = −C_P x* with the updated inverse
        lam = lam + np.einsum("rkl,rl->rk", Kinv, -st.q[rows, :w] - np.einsum("rkl,rl->rk", K, lam))
    xp = st.x_star[rows] + np.matmul(lam[:, None, :], st.U[rows, :w])[:, 0]
    scale = np.abs(lam).max(axis=1, keepdims=True)
    certified = (lam >= -1e-8 * scale).all(axis=1) & ((xp @ C.T).min(axis=1) >= -st.tol[rows])
    x[st.index[rows]] = xp
    failed[st.index[rows[~certified]]] = True


def _cone_projection_exact(Hinv: np.ndarray, x_star: np.ndarray, C: np.ndarray) -> np.ndarray:
    """One voxel of :func:`_project_onto_cone` with scipy's NNLS (fallback for the rare failures).

    With ``H⁻¹ = F Fᵀ`` (F from the eigendecomposition) the problem is the projection of ``h = F⁻¹ x*`` onto the cone
    ``{z : C F z ≥ 0}``, whose dual is the NNLS ``min_{λ≥0} ‖Fᵀ Cᵀ λ + h‖``; then
    ``x = F (h + Fᵀ Cᵀ λ)``.
    """
    evals, evecs = np.linalg.eigh((Hinv + Hinv.T) / 2)
    F = evecs * np.sqrt(np.maximum(evals, evals.max() * 1e-15))
    h = np.linalg.solve(F, x_star)
    G = F.T @ C.T
    lam, _ = scipy.optimize.nnls(G, -h, maxiter=50 * G.shape[1])
    return F @ (h + G @ lam)


class DKIModel:
    """Diffusion kurtosis model, fitted by (constrained) weighted linear least squares.

    ``fit`` solves, per voxel, :math:`\\min_x \\lVert \\Omega^{1/2} (A x - \\log \\max(S, s_{min})) \\rVert^2`
    with the design matrix :math:`A` of :func:`design_matrix` and

    * ``"OLS"``: :math:`\\Omega = I`;
    * ``"WLS"`` (dipy's default): :math:`\\Omega = \\operatorname{diag}(\\hat S^2)` with
      :math:`\\hat S = \\exp(A x_{OLS})` the signal predicted by the OLS fit (Veraart et al. 2013).

    All voxels of a chunk (≈ 64 MiB of work arrays) are solved together through batched normal
    equations in float64 (columns of A scaled to unit size, Jacobi-preconditioned, one step of
    iterative refinement against the log-signal residual). Chunks run in parallel threads, one per
    available core, with single-threaded BLAS.

    With ``constrained=True`` the estimate must also satisfy, on a fixed set of 100 directions
    :math:`\\mathbf n` spread evenly over the hemisphere (``constraint_directions``), the
    physical conditions

    .. math::

        K(\\mathbf n) \\ge 0 \\iff \\tilde W(\\mathbf n) \\ge 0, \\qquad D(\\mathbf n) \\ge 0,

    (non-negative kurtosis and diffusivity; :math:`\\tilde W = \\mathrm{MD}^2 W`), and with
    ``monotonic=True`` instead of the second, the stronger bound of Tabesh et al. (2011)

    .. math::

        K(\\mathbf n) \\le \\frac{3}{b_{max} D(\\mathbf n)} \\iff
        D(\\mathbf n) - \\frac{b_{max}}{3} \\tilde W(\\mathbf n) \\ge 0,

    (a fitted signal that does not rise with b up to the largest b-value :math:`b_{max}`; with
    :math:`\\tilde W \\ge 0` it implies :math:`D \\ge 0`). Both sets are linear in :math:`x`:
    :math:`C x \\ge 0` with 200 rows. Voxels whose unconstrained estimate violates them
    (beyond round-off) are re-solved as the quadratic program

    .. math::

        \\min_x \\tfrac{1}{2} (x - x^*)^\\mathsf{T} H (x - x^*) \\quad \\text{s.t.}\\quad C x \\ge 0,
        \\qquad H = A^\\mathsf{T} \\Omega A,

    (equivalent to the constrained weighted least-squares problem, :math:`x^*` being its
    unconstrained solution) by Lawson–Hanson's active-set NNLS on the dual (Lawson & Hanson 1974,
    ch. 23), batched over the violating voxels: one constraint enters per step, the inverse of
    :math:`C_P H^{-1} C_P^\\mathsf{T}` is updated by bordering and Schur downdates, and each result
    is certified by the KKT conditions (multipliers ≥ 0, all 200 constraints met to within 1e-9
    relative). A voxel that is not certified (rare: seen only for strongly non-physical tensors
    with ~20 active constraints) is solved by ``scipy.optimize.nnls`` on the same dual. This
    is the constrained linear least squares of Tabesh et al. (2011) on a finite direction set; Dela
    Haije et al. (2020, NeuroImage 209:116405) enforce the same conditions for all directions by
    semidefinite programming (dipy's ``CWLS``), at a far higher cost. Where the unconstrained
    estimate satisfies the constraints, both fits are identical to the last bit.

    The monotonicity bound is off by default: at b_max = 3000 s/mm² the second-order cumulant
    expansion no longer holds for brain tissue, and the exact cumulant tensors of white matter
    usually violate it, so it would be active in most voxels and bias the fit towards a
    monotonic signal.

    Parameters
    ----------
    gtab : GradientTable
        At least 22 volumes and two non-zero b-values (shells).
    fit_method : {"WLS", "OLS"}
        Weighted (default) or ordinary linear least squares.
    constrained : bool
        Enforce the constraints above (default True); ``False`` reproduces dipy's WLS fit.
    monotonic : bool
        With ``constrained``, replace D(n) ≥ 0 by Tabesh's bound K(n) ≤ 3/(b_max D(n)).
    min_signal : float
        Signals are clipped at this positive value before the logarithm.

    Attributes
    ----------
    gtab, fit_method, constrained, monotonic, min_signal
        As given (``fit_method`` upper-cased).
    design_matrix : ndarray, shape (n, 22)
        :func:`design_matrix` of ``gtab``.
    b_max : float
        Largest b-value (s/mm²), used by the upper kurtosis bound.
    constraint_directions : ndarray, shape (100, 3)
        Unit directions where the constraints are enforced (see :meth:`constraint_matrix`).

    Examples
    --------
    Noise-free signals of an isotropic voxel with MD = 1 µm²/ms and kurtosis 1:

    >>> import numpy as np
    >>> from bioinverse.dmri.io import GradientTable
    >>> from bioinverse.dmri.signal import dki_signal, kurtosis_from_elements
    >>> g = np.random.default_rng(0).normal(size=(30, 3))
    >>> g /= np.linalg.norm(g, axis=1, keepdims=True)
    >>> gtab = GradientTable(np.r_[0.0, np.full(30, 1000.0), np.full(30, 2000.0)], np.r_[np.zeros((1, 3)), g, g])
    >>> W = kurtosis_from_elements([1, 1, 1, 0, 0, 0, 0, 0, 0, 1/3, 1/3, 1/3, 0, 0, 0])
    >>> fit = DKIModel(gtab).fit(dki_signal(gtab, np.eye(3) * 1e-3, W, S0=100.0))
    >>> round(float(fit.S0), 6), round(float(fit.md * 1e3), 6), round(float(fit.mk), 6), round(float(fit.fa), 6)
    (100.0, 1.0, 1.0, 0.0)
    """

    def __init__(self, gtab, fit_method: str = "WLS", constrained: bool = True, min_signal: float = 1e-6,
                 monotonic: bool = False):
        bvals, _ = _gradients(gtab)
        method = str(fit_method).upper()
        if method not in ("WLS", "OLS"):
            raise InputError("fit_method", f"must be 'WLS' or 'OLS', got {fit_method!r}")
        try:
            min_signal = float(min_signal)
        except (TypeError, ValueError):
            raise InputError("min_signal", f"must be a positive number, got {min_signal!r}") from None
        if not (np.isfinite(min_signal) and min_signal > 0):
            raise InputError("min_signal", f"must be a positive number, got {min_signal!r}")
        threshold = float(getattr(gtab, "b0_threshold", 50.0))
        if bvals.size < _N_PARAMS or _count_shells(bvals[bvals > threshold]) < 2:
            raise InputError("gtab", "a DKI fit needs at least 22 volumes and two non-zero b-values")
        A = design_matrix(gtab)
        scale = np.abs(A).max(axis=0)
        rank = np.linalg.matrix_rank(A / scale)
        if rank < _N_PARAMS:
            raise InputError(
                "gtab",
                f"the gradient directions determine only {rank} of the 22 DKI parameters "
                "(use at least 15 non-collinear directions spread over the shells)",
            )
        self.gtab = gtab
        self.fit_method = method
        self.constrained = bool(constrained)
        self.monotonic = bool(monotonic)
        self.min_signal = min_signal
        self.design_matrix = A
        self.b_max = float(bvals.max())
        self.constraint_directions = _hemisphere_directions(100)
        self._scale = scale

    def constraint_matrix(self) -> np.ndarray:
        """The constraints as rows of ``C x ≥ 0`` on ``x = (log S0, D (6), W̃ (15))``, shape (200, 22).

        Rows 0–99: :math:`\\tilde W(\\mathbf n) \\ge 0`; rows 100–199: :math:`D(\\mathbf n) \\ge 0`, or
        with ``monotonic`` :math:`D(\\mathbf n) - b_{max} \\tilde W(\\mathbf n) / 3 \\ge 0`, for
        ``constraint_directions``.
        """
        n = self.constraint_directions
        quad, quart = _quadratic_basis(n), _quartic_basis(n)
        zeros = np.zeros((len(n), 1))
        kurt = np.concatenate([zeros, np.zeros_like(quad), quart], axis=1)
        bound = self.b_max / 3 if self.monotonic else 0.0
        diffusion = np.concatenate([zeros, quad, -bound * quart], axis=1)
        return np.concatenate([kurt, diffusion], axis=0)

    def fit(self, data: ArrayLike, mask: ArrayLike | None = None, progress: bool = False) -> DKIFit:
        """Fit every voxel of ``data``.

        Parameters
        ----------
        data : array_like, shape (..., n)
            Signals, measurement axis last (``n = len(gtab)``); any leading shape.
        mask : array_like of bool, shape (...), optional
            Voxels to fit (default: all); the others get zeros.
        progress : bool
            Report progress on stderr.

        Returns
        -------
        DKIFit
        """
        data = np.asarray(data)
        if data.dtype == object or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise InputError("data", f"must be a numeric array, got dtype {data.dtype}")
        if np.iscomplexobj(data):
            raise InputError("data", "must be real-valued (magnitude signals)")
        n = len(self.design_matrix)
        if data.ndim < 1 or data.shape[-1] != n:
            raise InputError("data", f"last axis must hold the {n} volumes of the gradient table, got shape {data.shape}")
        leading = data.shape[:-1]
        if mask is None:
            mask = np.ones(leading, dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.shape != leading:
                raise InputError("mask", f"shape {mask.shape} does not match the data's voxel shape {leading}")
            if mask.dtype != bool:
                if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
                    raise InputError("mask", "must be boolean (or 0/1)")
                mask = mask.astype(bool)
        voxels = data[mask]
        if not np.isfinite(voxels).all():
            raise InputError("data", "contains NaN or Inf inside the mask")

        params = np.zeros((len(voxels), _N_PARAMS))
        chunk = max(256, _CHUNK_BYTES // (8 * (4 * n + 4 * _N_PARAMS**2 + 2 * 200)))
        starts = range(0, len(voxels), chunk)
        workers = min(len(starts), _available_cores())

        def work(start: int) -> int:
            params[start : start + chunk] = self._fit_chunk(voxels[start : start + chunk])
            return min(start + chunk, len(voxels))

        # Chunks are independent: they run in parallel threads (NumPy releases the GIL), each with
        # single-threaded BLAS; the per-voxel problems are too small for threaded BLAS to pay off.
        with _single_threaded_blas(), ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool, \
                progress_bar(progress) as bar:
            task = bar.add_task("DKI fit (voxels)", total=len(voxels))
            done = 0
            for finished in pool.map(work, starts) if pool else map(work, starts):
                done = max(done, finished)
                bar.update(task, completed=done)
        full = np.zeros(leading + (_N_PARAMS,))
        full[mask] = params
        return DKIFit(self, full, mask)

    def _fit_chunk(self, signals: np.ndarray) -> np.ndarray:
        """(N, n) signals → (N, 22) parameters in physical units."""
        A = self.design_matrix / self._scale
        y = np.log(np.maximum(signals.astype(np.float64), self.min_signal))
        x = y @ np.linalg.pinv(A).T
        if self.fit_method == "OLS":
            if self.constrained:
                Hinv = np.broadcast_to(np.linalg.inv(A.T @ A), (len(y), _N_PARAMS, _N_PARAMS))
                x = self._constrain(x, Hinv)
            return x / self._scale
        eta = x @ A.T
        weights = np.exp(2 * (eta - eta.max(axis=1, keepdims=True)))
        np.maximum(weights, _MIN_RELATIVE_WEIGHT, out=weights)
        # Weighted Gram matrices AᵀΩA of all voxels in one product (upper triangles only).
        upper = np.triu_indices(_N_PARAMS)
        H = (weights @ (A[:, upper[0]] * A[:, upper[1]]))[:, _SYMMETRIC_FILL]
        d = np.sqrt(np.einsum("nii->ni", H))
        dd = d[:, :, None] * d[:, None, :]
        H /= dd
        # The inverse serves both the unconstrained solution and the constrained re-solve (and
        # keeps constrained and unconstrained fits bit-identical where the constraints hold).
        try:
            Hinv = np.linalg.inv(H) / dd
        except np.linalg.LinAlgError:
            Hinv = np.linalg.pinv(H, hermitian=True) / dd
        x = np.einsum("npq,nq->np", Hinv, (weights * y) @ A)
        # One step of iterative refinement recovers the accuracy lost to the normal equations.
        x += np.einsum("npq,nq->np", Hinv, (weights * (y - x @ A.T)) @ A)
        if self.constrained:
            x = self._constrain(x, Hinv)
        return x / self._scale

    def _constrain(self, x: np.ndarray, Hinv: np.ndarray) -> np.ndarray:
        """Re-solve the voxels of ``x`` (scaled parameters) that violate the constraints."""
        C = self.constraint_matrix() / self._scale
        C /= np.linalg.norm(C, axis=1, keepdims=True)
        tol = 1e-9 * np.maximum(np.linalg.norm(x[:, 1:], axis=1), 1e-12)
        violating = np.flatnonzero((x @ C.T).min(axis=1) < -tol)
        if violating.size == 0:
            return x
        Hv = Hinv[violating]
        xv, failed = _project_onto_cone(Hv, x[violating], C, tol[violating], max_outer=10 * _N_PARAMS)
        for i in np.flatnonzero(failed):
            xv[i] = _cone_projection_exact(Hv[i], x[violating[i]], C)
        x = x.copy()
        x[violating] = xv
        return x


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _single_threaded_blas():
    return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


def _count_shells(bvals: np.ndarray, tolerance: float = 100.0) -> int:
    """Number of b-value groups (consecutive sorted values within ``tolerance`` of a group's first)."""
    count, first = 0, -np.inf
    for b in np.sort(bvals):
        if b - first > tolerance:
            count, first = count + 1, b
    return count


class DKIFit:
    """Result of :meth:`DKIModel.fit`: tensors and scalar maps with the data's voxel shape.

    Every property is computed on first access and cached; voxels outside the mask hold zeros.

    Attributes
    ----------
    model : DKIModel
    params : ndarray, shape (..., 22)
        ``(log S0, Dxx, Dxy, Dyy, Dxz, Dyz, Dzz, W̃ (15, dipy's order))`` with
        :math:`\\tilde W = \\mathrm{MD}^2 W` in mm⁴/s².
    mask : ndarray of bool, shape (...)
    """

    def __init__(self, model: DKIModel, params: np.ndarray, mask: np.ndarray):
        self.model = model
        self.params = params
        self.mask = mask

    @property
    def shape(self) -> tuple[int, ...]:
        """Voxel (leading) shape."""
        return self.mask.shape

    @cached_property
    def S0(self) -> np.ndarray:
        """Fitted unweighted signal :math:`S_0`, shape (...)."""
        return np.where(self.mask, np.exp(np.where(self.mask, self.params[..., 0], 0.0)), 0.0)

    @cached_property
    def diffusion_tensor(self) -> np.ndarray:
        """Diffusion tensor D in mm²/s, shape (..., 3, 3)."""
        return self.params[..., 1:7][..., _D_FULL]

    @cached_property
    def _w15(self) -> np.ndarray:
        md = (self.params[..., 1] + self.params[..., 3] + self.params[..., 6]) / 3
        md2 = md**2
        inv = np.divide(1.0, md2, out=np.zeros_like(md2), where=md2 > 0)
        return self.params[..., 7:] * inv[..., None]

    @cached_property
    def kurtosis_tensor(self) -> np.ndarray:
        """Kurtosis tensor W (dimensionless; :math:`W = \\tilde W / \\mathrm{MD}^2`, 0 where MD = 0), shape (..., 3, 3, 3, 3)."""
        return self._w15[..., _W_FULL]

    @cached_property
    def _eig(self) -> tuple[np.ndarray, np.ndarray]:
        evals, evecs = np.linalg.eigh(self.diffusion_tensor)
        return evals[..., ::-1], evecs[..., ::-1]

    @property
    def evals(self) -> np.ndarray:
        """Eigenvalues of D, descending, mm²/s, shape (..., 3) (not clipped; the measures clip at 0)."""
        return self._eig[0]

    @property
    def evecs(self) -> np.ndarray:
        """Eigenvectors of D as columns (``evecs[..., :, k]`` for ``evals[..., k]``), shape (..., 3, 3)."""
        return self._eig[1]

    @cached_property
    def _measures(self) -> dict[str, np.ndarray]:
        flat = _measures_chunked(self.params[self.mask][:, 1:7], self._w15[self.mask], -3.0 / 7, 10.0)
        out = {}
        for k, v in flat.items():
            full = np.zeros(self.shape)
            full[self.mask] = v
            out[k] = full
        return out

    @property
    def md(self) -> np.ndarray:
        """Mean diffusivity, mm²/s."""
        return self._measures["md"]

    @property
    def fa(self) -> np.ndarray:
        """Fractional anisotropy."""
        return self._measures["fa"]

    @property
    def ad(self) -> np.ndarray:
        """Axial diffusivity λ1, mm²/s."""
        return self._measures["ad"]

    @property
    def rd(self) -> np.ndarray:
        """Radial diffusivity (λ2 + λ3)/2, mm²/s."""
        return self._measures["rd"]

    @property
    def mk(self) -> np.ndarray:
        """Mean kurtosis (analytical, clipped to [-3/7, 10]; see :func:`kurtosis_measures`)."""
        return self._measures["mk"]

    @property
    def ak(self) -> np.ndarray:
        """Axial kurtosis K(e1)."""
        return self._measures["ak"]

    @property
    def rk(self) -> np.ndarray:
        """Radial kurtosis (analytical)."""
        return self._measures["rk"]

    @property
    def kfa(self) -> np.ndarray:
        """Kurtosis fractional anisotropy."""
        return self._measures["kfa"]

    def predict(self, gtab, S0: ArrayLike | None = None) -> np.ndarray:
        """Signals of the fitted tensors on ``gtab`` (:func:`bioinverse.dmri.signal.dki_signal`).

        Parameters
        ----------
        gtab : GradientTable
        S0 : float or array_like broadcastable to the voxel shape, optional
            Default: the fitted :attr:`S0` (so voxels outside the mask predict 0).

        Returns
        -------
        ndarray, shape (..., len(gtab))
        """
        S0 = self.S0 if S0 is None else _leading_s0(S0, self.shape)
        return dki_signal(gtab, self.diffusion_tensor, self.kurtosis_tensor, S0)
