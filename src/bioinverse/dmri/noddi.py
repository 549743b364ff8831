"""NODDI: neurite orientation dispersion and density imaging (Zhang et al., NeuroImage 2012).

A voxel holds three non-exchanging compartments. With ``ν_ic`` the intra-cellular (neurite)
volume fraction of the tissue, ``ν_iso`` the free-water (CSF) fraction of the voxel and
``E = S / S0`` the normalised signal,

.. math::

    E = (1 - \\nu_{iso}) \\left[ \\nu_{ic} E_{ic} + (1 - \\nu_{ic}) E_{ec} \\right]
        + \\nu_{iso} e^{-b d_{iso}},

* ``E_ic``: sticks (diffusivity ``d_par`` along the stick, none across) whose orientations follow
  a Watson distribution of mean axis ``μ`` and concentration ``κ``;
* ``E_ec``: one Gaussian compartment, the zeppelin ``d_perp I + (d_par - d_perp) n nᵀ`` averaged
  over the same Watson distribution, with the tortuosity constraint
  ``d_perp = d_par (1 - ν_ic)``;
* free water with diffusivity ``d_iso``.

The orientation dispersion index is ``ODI = (2/π) arctan(1/κ)`` (0: parallel sticks, 1: isotropic).

Numerics
--------
The Watson-averaged stick signal is evaluated through its Legendre series (Zhang 2012, appendix)

.. math::

    E_{ic}(b, g) = \\sum_{l\\ \\mathrm{even}} (2l + 1)\\, L_l(b d_{par})\\, a_l(\\kappa)\\,
                   P_l(g \\cdot \\mu),

with the Watson's Legendre coefficients ``a_l(κ) = ⟨P_l(μ·n)⟩`` and the Legendre–Gaussian
integrals ``L_l(x) = ∫₀¹ exp(-x t²) P_l(t) dt``. Both are moments of the same kind,
``I_l(k) = ∫₀¹ P_l(t) exp(k t²) dt`` (``k = κ`` and ``k = -x``), which satisfy the three-term
recurrence (integration by parts with ``(2l+1) P_l = P'_{l+1} - P'_{l-1}``)

.. math::

    \\frac{2k(l+2)}{2l+3} I_{l+2}
    + (2l+1)\\left[1 - \\frac{2k}{(2l+3)(2l-1)}\\right] I_l
    - \\frac{2k(l-1)}{2l-1} I_{l-2} = 0 .

``a_l`` and ``L_l`` are the recurrence's minimal solutions, so they are computed by backward
recurrence of the ratios ``I_l / I_{l-2}`` (a continued fraction, stable for every ``k`` and
``l``, and free of the cancellation that ruins the closed Dawson/erf forms at small ``κ`` or ``x``)
and normalised by ``a_0 = 1`` and ``L_0(x) = √π erf(√x) / (2√x)``. For ``κ > 1000`` (and
``κ = ∞``) the Watson coefficients come from a 64-node Gauss–Laguerre rule in
``s = κ (1 - μ·n)`` instead, where the recurrence would need too many steps (its length grows
like √κ).

Because ``|a_l| ≤ 1`` and ``|P_l| ≤ 1``, ``Σ_{l > l_max} (2l+1) |L_l(x)|`` bounds the truncation
error for every ``κ`` (``κ = ∞`` included). The series is cut at the smallest even ``l_max`` that
makes this bound < 1e-9 for the largest ``x = b d_par`` of the table: ``l_max`` = 16 for
``x ≤ 1``, 26 for ``x ≤ 5``, 34 for ``x ≤ 10``. (Stopping at ``l = 12``, as the NODDI toolbox
does, leaves errors of 2e-4 at ``b d_par ≈ 5`` and ``κ = 64``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import dawsn, erf, roots_laguerre

from bioinverse._progress import progress_bar
from bioinverse.dmri.io import GradientTable
from bioinverse.errors import InputError

__all__ = [
    "NODDIFit",
    "NODDIModel",
    "kappa_to_odi",
    "neurite_signal",
    "noddi_moments",
    "noddi_signal",
    "odi_to_kappa",
    "stick_signal_watson",
    "watson_moments",
]

D_PAR = 1.7e-3
D_ISO = 3.0e-3

_SERIES_TOLERANCE = 1e-9
_KAPPA_QUADRATURE = 1000.0
_LAGUERRE_NODES, _LAGUERRE_WEIGHTS = roots_laguerre(64)
_SMALL_KAPPA = 1.0
# Elements per temporary array in the voxel-block loops: ~0.8 MB, so the blocks stay in cache.
_CACHE_ELEMENTS = 100_000
# Concentration bound of the fit (ODI ≥ 0.005, far less dispersion than white matter shows): a
# bound keeps the ODI → κ map and its derivative finite.
_FIT_KAPPA_MAX = 128.0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _array(value: ArrayLike, name: str, *, low: float | None = None, high: float | None = None,
           allow_inf: bool = False, allow_nan: bool = False) -> np.ndarray:
    try:
        a = np.asarray(value)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise TypeError
        if np.iscomplexobj(a):
            raise InputError(name, f"must be real-valued, got dtype {a.dtype}")
        a = a.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(name, "must be a numeric array") from None
    if a.size == 0:
        raise InputError(name, "is empty")
    if (not allow_nan and np.isnan(a).any()) or (not allow_inf and np.isinf(a).any()):
        raise InputError(name, "contains NaN or Inf" if not allow_inf else "contains NaN")
    if low is not None and (a < low).any():
        raise InputError(name, f"must be ≥ {low:g}, got {a.min():g}")
    if high is not None and (a > high).any():
        raise InputError(name, f"must be ≤ {high:g}, got {a.max():g}")
    return a


def _positive(value: float, name: str) -> float:
    a = _array(value, name)
    if a.ndim != 0 or not a > 0:
        raise InputError(name, f"must be one positive number in mm²/s, got {value!r}")
    return float(a)


def _unit_vectors(mu: ArrayLike, name: str = "mu") -> np.ndarray:
    m = _array(mu, name)
    if m.ndim == 0 or m.shape[-1] != 3:
        raise InputError(name, f"must have shape (..., 3), got {m.shape}")
    norm = np.linalg.norm(m, axis=-1, keepdims=True)
    if (norm < 1e-12).any():
        raise InputError(name, "contains a zero vector; a direction needs a non-zero norm")
    return m / norm


def _check_gtab(gtab: GradientTable) -> GradientTable:
    if not isinstance(gtab, GradientTable):
        raise InputError("gtab", f"must be a GradientTable, got {type(gtab).__name__}")
    bvals, bvecs = np.asarray(gtab.bvals), np.asarray(gtab.bvecs)
    if bvals.ndim != 1 or bvecs.shape != (bvals.size, 3):
        raise InputError("gtab", f"needs bvals (n,) and bvecs (n, 3), got {bvals.shape} and {bvecs.shape}")
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()) or (bvals < 0).any():
        raise InputError("gtab", "has negative, NaN or Inf b-values or directions")
    return gtab


# --------------------------------------------------------------------------------------------
# Legendre machinery
# --------------------------------------------------------------------------------------------


def _legendre_moment_ratios(k: np.ndarray, l_max: int) -> np.ndarray:
    """``I_l(k) / I_0(k)`` for ``l = 0, 2, ..., l_max``, shape ``k.shape + (l_max // 2 + 1,)``.

    ``I_l(k) = ∫₀¹ P_l(t) exp(k t²) dt``; ratios come from the continued fraction of the recurrence
    in the module docstring, started where it has forgotten its start value: the start error is
    damped by ~exp(-(L² - l²) / (2|k|)), so L² ≥ 80 |k| + l_max² leaves < 1e-16.
    """
    k = np.asarray(k, dtype=np.float64)
    start = l_max + 10 + math.ceil(math.sqrt(80.0 * float(np.max(np.abs(k), initial=0.0)) + l_max**2))
    start += start % 2
    ratio = np.zeros_like(k)
    ratios = [None] * (l_max // 2 + 1)
    for l in range(start, 1, -2):
        up = 2.0 * k * (l + 2) / (2 * l + 3)
        diag = (2 * l + 1) * (1.0 - 2.0 * k / ((2 * l + 3) * (2 * l - 1)))
        down = -2.0 * k * (l - 1) / (2 * l - 1)
        # The denominator is the ratio's own continued fraction: positive for k ≥ 0, and for k < 0
        # every term of ``up * ratio`` is positive too (the I_l alternate in sign), so no pole.
        ratio = -down / (diag + up * ratio)
        if l <= l_max:
            ratios[l // 2] = ratio
    out = np.empty(k.shape + (l_max // 2 + 1,))
    out[..., 0] = 1.0
    for i in range(1, l_max // 2 + 1):
        out[..., i] = out[..., i - 1] * ratios[i]
    return out


def _even_legendre(t: np.ndarray, l_max: int) -> np.ndarray:
    """``P_l(t)`` for ``l = 0, 2, ..., l_max``, stacked on a new last axis."""
    out = np.empty(np.shape(t) + (l_max // 2 + 1,))
    out[..., 0] = 1.0
    if l_max >= 2:
        t2 = t * t
        previous = np.zeros_like(t2)
        current = np.ones_like(t2)
        for i in range(l_max // 2):
            alpha, beta, gamma = _t2_coefficients(2 * i)
            current, previous = ((t2 - beta) * current - gamma * previous) / alpha, current
            out[..., i + 1] = current
    return out


def _t2_coefficients(l: int) -> tuple[float, float, float]:
    """``t² P_l = α P_{l+2} + β P_l + γ P_{l-2}`` (two applications of Bonnet's recurrence)."""
    alpha = (l + 1) * (l + 2) / ((2 * l + 1) * (2 * l + 3))
    beta = ((l + 1) ** 2 / (2 * l + 3) + (l * l / (2 * l - 1) if l else 0.0)) / (2 * l + 1)
    gamma = l * (l - 1) / ((2 * l + 1) * (2 * l - 1)) if l else 0.0
    return alpha, beta, gamma


def _watson_coefficients(kappa: np.ndarray, l_max: int) -> np.ndarray:
    """Watson coefficients ``a_l(κ) = ⟨P_l(μ·n)⟩``, ``l = 0, 2, ..., l_max``, for ``κ ∈ [0, ∞]``."""
    kappa = np.asarray(kappa, dtype=np.float64)
    out = np.empty(kappa.shape + (l_max // 2 + 1,))
    high = kappa > _KAPPA_QUADRATURE
    if (~high).any():
        out[~high] = _legendre_moment_ratios(kappa[~high], l_max)
    if high.any():
        # t = 1 - s/κ turns exp(κ t²) into exp(κ) exp(-2s + s²/κ): a Laguerre weight times a
        # smooth factor; the nodes (s ≤ 120) stay far from t = 0 since κ > 1000.
        inverse = 1.0 / kappa[high][:, None]
        s = 0.5 * _LAGUERRE_NODES[None, :]
        weight = _LAGUERRE_WEIGHTS * np.exp(s * s * inverse)
        legendre = _even_legendre(1.0 - s * inverse, l_max)
        out[high] = np.einsum("vq,vql->vl", weight, legendre) / weight.sum(axis=1)[:, None]
    return out


def _watson_coefficient_derivatives(a: np.ndarray) -> np.ndarray:
    """``da_l/dκ = ⟨t² P_l⟩ - ⟨t²⟩ a_l`` to order ``l_max``, from ``a`` to order ``l_max + 2``."""
    m2 = (1.0 + 2.0 * a[..., 1]) / 3.0
    out = np.empty(a.shape[:-1] + (a.shape[-1] - 1,))
    for i in range(a.shape[-1] - 1):
        alpha, beta, gamma = _t2_coefficients(2 * i)
        lower = a[..., i - 1] if i else 0.0
        out[..., i] = alpha * a[..., i + 1] + (beta - m2) * a[..., i] + gamma * lower
    return out


def _gaussian_l0(x: np.ndarray) -> np.ndarray:
    """``∫₀¹ exp(-x t²) dt``; a series below x = 1e-3 where erf(√x)/√x is 0/0."""
    x = np.asarray(x, dtype=np.float64)
    small = x < 1e-3
    root = np.sqrt(np.where(small, 1.0, x))
    closed = 0.5 * math.sqrt(math.pi) * erf(root) / root
    series = 1.0 - x / 3.0 + x * x / 10.0 - x**3 / 42.0
    return np.where(small, series, closed)


def _legendre_gaussian_integrals(x: np.ndarray, l_max: int) -> np.ndarray:
    """``L_l(x) = ∫₀¹ exp(-x t²) P_l(t) dt`` for ``l = 0, 2, ..., l_max``; ``x ≥ 0``."""
    x = np.asarray(x, dtype=np.float64)
    return _gaussian_l0(x)[..., None] * _legendre_moment_ratios(-x, l_max)


def _series_order(x_max: float, tolerance: float = _SERIES_TOLERANCE) -> int:
    """Smallest even ``l_max`` with ``Σ_{l > l_max} (2l+1)|L_l(x)| < tolerance`` for all ``x ≤ x_max``.

    The tail is taken as the largest over eight ``x`` up to ``x_max`` rather than at ``x_max``
    alone, which would assume it grows monotonically with ``x``.
    """
    x_max = max(float(x_max), 0.0)
    top = 20 + 12 * math.ceil(math.sqrt(x_max))
    xs = np.linspace(0.0, x_max, 9)[1:] if x_max > 0 else np.zeros(1)
    orders = np.arange(0, top + 1, 2)
    terms = (2 * orders + 1) * np.abs(_legendre_gaussian_integrals(xs, top))
    tails = np.cumsum(terms[:, ::-1], axis=1)[:, ::-1].max(axis=0)
    below = np.flatnonzero(tails < tolerance)
    if below.size == 0:
        return top
    return max(int(orders[below[0]]) - 2, 0)


# --------------------------------------------------------------------------------------------
# Watson distribution and ODI
# --------------------------------------------------------------------------------------------


def odi_to_kappa(odi: ArrayLike) -> np.ndarray:
    """Watson concentration ``κ`` of an orientation dispersion index.

    Parameters
    ----------
    odi : array_like
        ODI in [0, 1] (0: parallel orientations, 1: isotropic).

    Returns
    -------
    ndarray
        ``κ = 1 / tan(π ODI / 2)`` (``∞`` at ODI = 0), same shape as ``odi``.

    Notes
    -----
    .. math:: \\kappa = \\cot(\\pi\\, \\mathrm{ODI} / 2)

    Zhang et al., NeuroImage 61 (2012) 1000–1016.

    Examples
    --------
    >>> print(np.round(odi_to_kappa([0.5, 1.0]), 6))
    [1. 0.]
    """
    odi = _array(odi, "odi", low=0.0, high=1.0)
    half_angle = 0.5 * np.pi * odi
    with np.errstate(divide="ignore"):
        kappa = np.where(odi == 0, np.inf, np.cos(half_angle) / np.sin(half_angle))
    return np.where(odi == 1, 0.0, kappa)[()]


def kappa_to_odi(kappa: ArrayLike) -> np.ndarray:
    """Orientation dispersion index of a Watson concentration.

    Parameters
    ----------
    kappa : array_like
        Watson concentration ``κ ≥ 0`` (``∞`` allowed).

    Returns
    -------
    ndarray
        ``ODI = (2/π) arctan(1/κ)`` in [0, 1], same shape as ``kappa``.

    Notes
    -----
    .. math:: \\mathrm{ODI} = \\frac{2}{\\pi} \\arctan(1/\\kappa)

    Zhang et al., NeuroImage 61 (2012) 1000–1016.

    Examples
    --------
    >>> print(np.round(kappa_to_odi([0.0, 1.0, 64.0, np.inf]), 4))
    [1.     0.5    0.0099 0.    ]
    """
    kappa = _array(kappa, "kappa", low=0.0, allow_inf=True)
    return (2.0 / np.pi * np.arctan2(1.0, kappa))[()]


def watson_moments(kappa: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Second and fourth moments of ``cos θ = μ·n`` under a Watson distribution.

    Parameters
    ----------
    kappa : array_like
        Concentration ``κ ≥ 0`` (``∞`` allowed: all orientations along ``μ``).

    Returns
    -------
    m2, m4 : ndarray
        ``⟨(μ·n)²⟩`` and ``⟨(μ·n)⁴⟩``, same shape as ``kappa``.

    Notes
    -----
    With ``Z(κ) = ∫₀¹ exp(κt²) dt = exp(κ) F(√κ) / √κ`` (``F`` the Dawson function) and
    ``A = exp(κ) / (2κ Z) = 1 / (2√κ F(√κ))``, integration by parts gives

    .. math::

        m_2 = A - \\frac{1}{2\\kappa}, \\qquad m_4 = A - \\frac{3 m_2}{2\\kappa}.

    Both differences cancel for small ``κ``; there (``κ < 1``) the moments are ratios of the
    series ``Σ_k κ^k / (k! (2k + 2j + 1))``. Watson's distribution: Mardia & Jupp, *Directional
    Statistics* (2000); its use in NODDI: Zhang et al. (2012).

    Examples
    --------
    >>> m2, m4 = watson_moments([0.0, 8.0, np.inf])
    >>> print(np.round(m2, 4), np.round(m4, 4))
    [0.3333 0.8621 1.    ] [0.2    0.7629 1.    ]
    """
    kappa = _array(kappa, "kappa", low=0.0, allow_inf=True)
    m2 = np.ones_like(kappa)
    m4 = np.ones_like(kappa)
    small = kappa < _SMALL_KAPPA
    if small.any():
        k = kappa[small]
        term = np.ones_like(k)
        sums = np.zeros((3,) + k.shape)
        for n in range(30):
            if n:
                term = term * k / n
            sums += term / (2 * n + 1 + 2 * np.arange(3))[:, None]
        m2[small] = sums[1] / sums[0]
        m4[small] = sums[2] / sums[0]
    finite = ~small & np.isfinite(kappa)
    if finite.any():
        k = kappa[finite]
        root = np.sqrt(k)
        a = 0.5 / (root * dawsn(root))
        m2[finite] = a - 0.5 / k
        m4[finite] = a - 1.5 * m2[finite] / k
    return m2[()], m4[()]


def _watson_fourth_coefficients(m2: np.ndarray, m4: np.ndarray) -> tuple[np.ndarray, ...]:
    """Coefficients (A, B, C) of ``⟨n⊗n⊗n⊗n⟩ = A S(δδ) + B S(δμμ) + C μ⊗μ⊗μ⊗μ``.

    With ``c = g·μ`` an axially symmetric distribution has
    ``⟨(g·n)⁴⟩ = c⁴ m4 + 3 c² (1-c²)(m2 - m4) + (3/8)(1-c²)² (1 - 2 m2 + m4)``; matching the
    powers of ``c²`` with ``3A + 6B c² + C c⁴`` (the quartic form of the tensor combination) gives
    them.
    """
    transverse = 1.0 - 2.0 * m2 + m4
    a = transverse / 8.0
    b = 0.5 * (m2 - m4) - transverse / 8.0
    c = m4 - 3.0 * (m2 - m4) + 0.375 * transverse
    return a, b, c


# --------------------------------------------------------------------------------------------
# Forward models
# --------------------------------------------------------------------------------------------


def _stick_signal(x: np.ndarray, cosine: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """Legendre series of the Watson-averaged stick.

    ``x = b d_par`` is (n,) or (..., n), ``cosine = g·μ`` (..., n), ``kappa`` (...). Voxels go in
    cache-sized blocks and the orders are summed as they are generated, so memory stays O(voxels × n).
    """
    shape = np.broadcast_shapes(x.shape, cosine.shape, kappa.shape + (1,))
    n = shape[-1]
    l_max = _series_order(float(np.max(x, initial=0.0)))
    shared = x.ndim == 1
    if shared:
        gaussian = _legendre_gaussian_integrals(x, l_max) * (4 * np.arange(l_max // 2 + 1) + 1)
    else:
        x = np.broadcast_to(x, shape).reshape(-1, n)
    cosine = np.broadcast_to(cosine, shape).reshape(-1, n)
    kappa = np.broadcast_to(kappa, shape[:-1]).reshape(-1)
    out = np.empty(cosine.shape)
    step = max(1, _CACHE_ELEMENTS // n)
    for start in range(0, out.shape[0], step):
        part = slice(start, start + step)
        if not shared:
            gaussian = _legendre_gaussian_integrals(x[part], l_max) * (4 * np.arange(l_max // 2 + 1) + 1)
        watson = _watson_coefficients(kappa[part], l_max)[:, None, :]
        c2 = cosine[part] ** 2
        legendre, previous = np.ones_like(c2), np.zeros_like(c2)
        total = np.zeros_like(c2)
        for i in range(l_max // 2 + 1):
            total += (gaussian[..., i] * watson[..., i]) * legendre
            if i < l_max // 2:
                alpha, beta, gamma = _t2_coefficients(2 * i)
                legendre, previous = ((c2 - beta) * legendre - gamma * previous) / alpha, legendre
        out[part] = total
    return out.reshape(shape)


def _zeppelin_exponent(x: np.ndarray, cosine: np.ndarray, icvf: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """``b gᵀ D_ec g`` with ``x = b d_par``, tortuosity ``d_perp = d_par (1 - ν_ic)``."""
    along = m2 * cosine**2 + 0.5 * (1.0 - m2) * (1.0 - cosine**2)
    return x * (1.0 - icvf * (1.0 - along))


def _broadcast(*shapes: tuple[int, ...], name: str = "parameters") -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise InputError(name, f"shapes do not broadcast: {shapes}") from None


def stick_signal_watson(gtab: GradientTable, kappa: ArrayLike, mu: ArrayLike,
                        d_par: ArrayLike = D_PAR) -> np.ndarray:
    """Signal of sticks whose orientations follow a Watson distribution.

    Parameters
    ----------
    gtab : GradientTable
        ``n`` volumes.
    kappa : array_like, shape (...)
        Watson concentration ``κ ≥ 0`` (``∞``: all sticks along ``mu``).
    mu : array_like, shape (..., 3)
        Mean orientation (normalised here).
    d_par : float or array_like, shape (...)
        Diffusivity along the sticks in mm²/s.

    Returns
    -------
    ndarray, shape (..., n)
        ``E_ic``, 1 at b = 0.

    Notes
    -----
    .. math::

        E_{ic}(b, g) = \\int_{S^2} f(n)\\, e^{-b d_{par} (g\\cdot n)^2}\\, dn
        = \\sum_{l\\ \\mathrm{even}} (2l+1)\\, L_l(b d_{par})\\, a_l(\\kappa)\\, P_l(g\\cdot\\mu),

    ``f(n) = exp(κ (μ·n)²) / (4π M(1/2, 3/2, κ))``; the Funk–Hecke theorem turns the spherical
    convolution into the product of Legendre coefficients. Zhang et al., NeuroImage 61 (2012),
    appendix; see the module docstring for how ``a_l``, ``L_l`` and the truncation are computed.

    Examples
    --------
    >>> gtab = GradientTable(np.array([0.0, 3000.0, 3000.0]), np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0.]]))
    >>> print(np.round(stick_signal_watson(gtab, 16.0, [0, 0, 1]), 4))
    [1.     0.0091 0.8669]
    """
    gtab = _check_gtab(gtab)
    kappa = _array(kappa, "kappa", low=0.0, allow_inf=True)
    mu = _unit_vectors(mu)
    d_par = _array(d_par, "d_par", low=0.0)
    shape = _broadcast(kappa.shape, mu.shape[:-1], d_par.shape)
    x = np.asarray(gtab.bvals, dtype=np.float64) * np.broadcast_to(d_par, shape)[..., None]
    cosine = np.broadcast_to(mu, shape + (3,)) @ np.asarray(gtab.bvecs, dtype=np.float64).T
    return _stick_signal(x, cosine, np.broadcast_to(kappa, shape))


def neurite_signal(gtab: GradientTable, icvf: ArrayLike, kappa: ArrayLike, mu: ArrayLike,
                   d_par: float = D_PAR) -> np.ndarray:
    """Signal of one dispersed neurite bundle: Watson sticks plus their tortuous zeppelin.

    Parameters
    ----------
    gtab : GradientTable
        ``n`` volumes.
    icvf : array_like, shape (...)
        Intra-cellular volume fraction ``ν_ic`` in [0, 1].
    kappa : array_like, shape (...)
        Watson concentration ``κ ≥ 0``.
    mu : array_like, shape (..., 3)
        Mean orientation.
    d_par : float
        Intrinsic parallel diffusivity in mm²/s.

    Returns
    -------
    ndarray, shape (..., n)
        ``ν_ic E_ic + (1 - ν_ic) E_ec``.

    Notes
    -----
    .. math::

        E_{ec} = \\exp(-b\\, g^T D_{ec}\\, g), \\quad
        D_{ec} = d_\\perp I + (d_{par} - d_\\perp) \\langle n n^T \\rangle, \\quad
        d_\\perp = d_{par} (1 - \\nu_{ic}),

    with ``⟨n nᵀ⟩ = m2 μμᵀ + (1 - m2)/2 (I - μμᵀ)`` (:func:`watson_moments`). Zhang et al.,
    NeuroImage 61 (2012) 1000–1016.

    Examples
    --------
    >>> gtab = GradientTable(np.array([0.0, 1000.0, 1000.0]), np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0.]]))
    >>> print(np.round(neurite_signal(gtab, 0.6, 1e9, [0, 0, 1]), 4))
    [1.     0.1827 0.8026]
    """
    gtab = _check_gtab(gtab)
    icvf = _array(icvf, "icvf", low=0.0, high=1.0)
    kappa = _array(kappa, "kappa", low=0.0, allow_inf=True)
    mu = _unit_vectors(mu)
    d_par = _positive(d_par, "d_par")
    shape = _broadcast(icvf.shape, kappa.shape, mu.shape[:-1])
    kappa = np.broadcast_to(kappa, shape)
    icvf = np.broadcast_to(icvf, shape)[..., None]
    x = np.asarray(gtab.bvals, dtype=np.float64) * d_par
    cosine = np.broadcast_to(mu, shape + (3,)) @ np.asarray(gtab.bvecs, dtype=np.float64).T
    m2 = watson_moments(kappa)[0]
    stick = _stick_signal(x, cosine, kappa)
    zeppelin = np.exp(-_zeppelin_exponent(x, cosine, icvf, np.asarray(m2)[..., None]))
    return icvf * stick + (1.0 - icvf) * zeppelin


def noddi_signal(gtab: GradientTable, icvf: ArrayLike, odi: ArrayLike, isovf: ArrayLike, mu: ArrayLike,
                 d_par: float = D_PAR, d_iso: float = D_ISO, S0: ArrayLike = 1.0) -> np.ndarray:
    """NODDI signal: dispersed neurites plus free water.

    Parameters
    ----------
    gtab : GradientTable
        ``n`` volumes.
    icvf : array_like, shape (...)
        Intra-cellular volume fraction of the tissue (non-CSF) part, in [0, 1].
    odi : array_like, shape (...)
        Orientation dispersion index in [0, 1].
    isovf : array_like, shape (...)
        Isotropic (CSF) volume fraction of the voxel, in [0, 1].
    mu : array_like, shape (..., 3)
        Mean neurite orientation.
    d_par : float
        Intrinsic parallel diffusivity in mm²/s.
    d_iso : float
        Free-water diffusivity in mm²/s.
    S0 : array_like, shape (...)
        Signal at b = 0.

    Returns
    -------
    ndarray, shape (..., n)

    Notes
    -----
    .. math::

        S = S_0 \\left\\{ (1 - \\nu_{iso}) \\left[ \\nu_{ic} E_{ic} + (1 - \\nu_{ic}) E_{ec} \\right]
            + \\nu_{iso} e^{-b d_{iso}} \\right\\}

    Zhang et al., NeuroImage 61 (2012) 1000–1016; ``κ`` from ``odi`` by
    :func:`odi_to_kappa`.

    Examples
    --------
    >>> gtab = GradientTable(np.array([0.0, 700.0, 2800.0]), np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1.]]))
    >>> print(np.round(noddi_signal(gtab, 0.5, 0.2, 0.1, [0, 0, 1], S0=100.0), 2))
    [100.    60.76   7.4 ]
    """
    gtab = _check_gtab(gtab)
    icvf = _array(icvf, "icvf", low=0.0, high=1.0)
    isovf = _array(isovf, "isovf", low=0.0, high=1.0)
    kappa = odi_to_kappa(odi)
    d_iso = _positive(d_iso, "d_iso")
    S0 = _array(S0, "S0")
    mu = _unit_vectors(mu)
    shape = _broadcast(icvf.shape, np.shape(kappa), isovf.shape, S0.shape, mu.shape[:-1])
    neurite = neurite_signal(gtab, np.broadcast_to(icvf, shape), np.broadcast_to(kappa, shape),
                             np.broadcast_to(mu, shape + (3,)), d_par)
    free = np.exp(-np.asarray(gtab.bvals, dtype=np.float64) * d_iso)
    isovf = np.broadcast_to(isovf, shape)[..., None]
    return np.broadcast_to(S0, shape)[..., None] * ((1.0 - isovf) * neurite + isovf * free)


def noddi_moments(icvf: ArrayLike, odi: ArrayLike, isovf: ArrayLike, mu: ArrayLike, d_par: float = D_PAR,
                  d_iso: float = D_ISO, weight: ArrayLike = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """First two moments of the compartment diffusion-tensor distribution of a NODDI voxel.

    Every NODDI compartment is Gaussian: sticks ``d_par n nᵀ`` with ``n`` Watson-distributed, the
    zeppelin ``D_ec`` and free water ``d_iso I``. Their moments give the voxel's exact cumulant
    (DTI/DKI) tensors: ``D = M1``, ``W = 3/MD² (S(M2) - S(D⊗D))``.

    Parameters
    ----------
    icvf, odi, isovf : array_like, shape (...)
        As in :func:`noddi_signal`.
    mu : array_like, shape (..., 3)
        Mean neurite orientation.
    d_par, d_iso : float
        Diffusivities in mm²/s.
    weight : array_like, shape (...)
        Multiplies both moments: the signal fraction of this NODDI component when it is one part
        of a larger mixture (moments of a mixture are the weighted sums of its parts' moments).

    Returns
    -------
    M1 : ndarray, shape (..., 3, 3)
        ``E[D_c]`` in mm²/s.
    M2 : ndarray, shape (..., 3, 3, 3, 3)
        ``E[D_c ⊗ D_c]`` in mm⁴/s².

    Notes
    -----
    With the fractions ``f_ic = (1-ν_iso) ν_ic``, ``f_ec = (1-ν_iso)(1-ν_ic)``, ``f_iso = ν_iso``:

    .. math::

        M_1 = f_{ic} d_{par} \\langle n n^T \\rangle + f_{ec} D_{ec} + f_{iso} d_{iso} I, \\qquad
        M_2 = f_{ic} d_{par}^2 \\langle n^{\\otimes 4} \\rangle + f_{ec} D_{ec}^{\\otimes 2}
              + f_{iso} d_{iso}^2 I^{\\otimes 2},

    and, for the axially symmetric Watson (``m2``, ``m4`` from :func:`watson_moments`),

    .. math::

        \\langle n_i n_j n_k n_l \\rangle = A\\, (\\delta_{ij}\\delta_{kl} + \\delta_{ik}\\delta_{jl}
        + \\delta_{il}\\delta_{jk}) + B\\, (\\delta_{ij}\\mu_k\\mu_l + 5\\ \\mathrm{perm.})
        + C\\, \\mu_i\\mu_j\\mu_k\\mu_l,

    ``A = (1 - 2m2 + m4)/8``, ``B = (m2 - m4)/2 - A``, ``C = m4 - 3(m2 - m4) + 3A``, from matching
    ``⟨(g·n)⁴⟩`` as a polynomial in ``(g·μ)²``. The cumulant relation is that of any mixture of
    Gaussian compartments (Jensen & Helpern, NMR Biomed 23 (2010) 698–710; DKI normalisation of
    Jensen et al., MRM 53 (2005) 1432–1440).

    Examples
    --------
    >>> M1, M2 = noddi_moments(0.5, 0.2, 0.0, [0, 0, 1])
    >>> print(np.round(np.diag(M1) * 1e3, 4), round(np.trace(M1) * 1e3 / 3, 4))
    [0.659 0.659 1.232] 0.85
    """
    icvf = _array(icvf, "icvf", low=0.0, high=1.0)
    isovf = _array(isovf, "isovf", low=0.0, high=1.0)
    kappa = odi_to_kappa(odi)
    mu = _unit_vectors(mu)
    weight = _array(weight, "weight", low=0.0)
    d_par = _positive(d_par, "d_par")
    d_iso = _positive(d_iso, "d_iso")
    shape = _broadcast(icvf.shape, np.shape(kappa), isovf.shape, weight.shape, mu.shape[:-1])
    m2, m4 = (np.broadcast_to(m, shape) for m in watson_moments(np.broadcast_to(kappa, shape)))
    icvf, isovf, weight = (np.broadcast_to(v, shape) for v in (icvf, isovf, weight))
    mu = np.broadcast_to(mu, shape + (3,))

    eye = np.eye(3)
    mumu = mu[..., :, None] * mu[..., None, :]
    scatter = m2[..., None, None] * mumu + (0.5 * (1.0 - m2))[..., None, None] * (eye - mumu)
    d_perp = d_par * (1.0 - icvf)
    zeppelin = d_perp[..., None, None] * eye + (d_par - d_perp)[..., None, None] * scatter

    a, b, c = _watson_fourth_coefficients(m2, m4)
    dd = np.einsum("ij,kl->ijkl", eye, eye)
    pairings = dd + np.einsum("ik,jl->ijkl", eye, eye) + np.einsum("il,jk->ijkl", eye, eye)
    six = sum(np.einsum(f"{p},...{q}->...ijkl", eye, mumu)
              for p, q in (("ij", "kl"), ("ik", "jl"), ("il", "jk"),
                           ("jk", "il"), ("jl", "ik"), ("kl", "ij")))
    fourth = (a[..., None, None, None, None] * pairings + b[..., None, None, None, None] * six
              + c[..., None, None, None, None] * np.einsum("...ij,...kl->...ijkl", mumu, mumu))

    f_ic = (1.0 - isovf) * icvf
    f_ec = (1.0 - isovf) * (1.0 - icvf)
    m1 = (f_ic * d_par)[..., None, None] * scatter + f_ec[..., None, None] * zeppelin \
        + (isovf * d_iso)[..., None, None] * eye
    m2_tensor = (f_ic * d_par**2)[..., None, None, None, None] * fourth \
        + f_ec[..., None, None, None, None] * np.einsum("...ij,...kl->...ijkl", zeppelin, zeppelin) \
        + (isovf * d_iso**2)[..., None, None, None, None] * dd
    return weight[..., None, None] * m1, weight[..., None, None, None, None] * m2_tensor


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------

_GRID_ICVF = np.linspace(0.05, 0.95, 10)
_GRID_ODI = np.linspace(0.03, 0.93, 10)
# Voxel chunks of the grid search: the (voxels, grid points, volumes) arrays stay within ~2 MiB,
# small enough for the CPU caches (and far below the 64 MiB a chunk may take).
_GRID_CHUNK_BYTES = 2 * 2**20
# Voxels per Levenberg–Marquardt batch: 2**20 signal values (~10,000 voxels of 99 volumes),
# which bounds the Jacobian at 40 MiB.
_BLOCK_ELEMENTS = 2**20
_MAX_ITERATIONS = 50
_ODI_MIN = float(2.0 / np.pi * np.arctan(1.0 / _FIT_KAPPA_MAX))


@dataclass(frozen=True)
class _Protocol:
    """What the fit needs from a gradient table, computed once."""

    bvals: np.ndarray        # (n,) s/mm²
    bvecs: np.ndarray        # (n, 3)
    x: np.ndarray            # (n,) b d_par
    free: np.ndarray         # (n,) exp(-b d_iso)
    gaussian: np.ndarray     # (n, l_max/2 + 1): (2l+1) L_l(b d_par)
    l_max: int

    @classmethod
    def build(cls, gtab: GradientTable, d_par: float, d_iso: float) -> _Protocol:
        bvals = np.asarray(gtab.bvals, dtype=np.float64)
        x = bvals * d_par
        l_max = _series_order(float(x.max()))
        gaussian = _legendre_gaussian_integrals(x, l_max) * (4 * np.arange(l_max // 2 + 1) + 1)
        bvecs = np.asarray(gtab.bvecs, dtype=np.float64)
        return cls(bvals, bvecs, x, np.exp(-bvals * d_iso), gaussian, l_max)


def _evaluate(protocol: _Protocol, params: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised NODDI signal (N, n) and its Jacobian (N, n, 5) at ``params = (ν_ic, ODI, ν_iso)``.

    The last two Jacobian columns are the derivatives along the tangent directions ``e1, e2`` of
    :func:`_tangent_basis` (rotations of ``mu`` by a small angle).
    """
    signal = np.empty((params.shape[0], protocol.x.size))
    jacobian = np.empty(signal.shape + (5,))
    # Blocks whose temporaries stay in the CPU caches run ~3× faster than whole arrays.
    step = max(1, _CACHE_ELEMENTS // protocol.x.size)
    for start in range(0, params.shape[0], step):
        part = slice(start, start + step)
        signal[part], jacobian[part] = _evaluate_block(protocol, params[part], mu[part])
    return signal, jacobian


def _evaluate_block(protocol: _Protocol, params: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    icvf, isovf = params[:, 0:1], params[:, 2:3]
    half_angle = 0.5 * np.pi * params[:, 1]
    kappa = np.cos(half_angle) / np.sin(half_angle)
    dkappa_dodi = -0.5 * np.pi / np.sin(half_angle) ** 2
    extended = _legendre_moment_ratios(kappa, protocol.l_max + 2)
    watson = extended[:, :-1]
    dwatson = _watson_coefficient_derivatives(extended)
    m2, m4 = watson_moments(kappa)
    m2, dm2_dkappa = np.atleast_1d(m2)[:, None], np.atleast_1d(m4 - m2 * m2)[:, None]

    cosine = mu @ protocol.bvecs.T
    c2 = cosine * cosine
    stick = np.zeros_like(cosine)
    dstick_dkappa = np.zeros_like(cosine)
    dstick_dcos = np.zeros_like(cosine)
    legendre, previous = np.ones_like(cosine), np.zeros_like(cosine)
    dlegendre, dprevious = np.zeros_like(cosine), np.zeros_like(cosine)
    for i in range(protocol.l_max // 2 + 1):
        term = legendre * protocol.gaussian[:, i]
        stick += watson[:, i : i + 1] * term
        dstick_dkappa += dwatson[:, i : i + 1] * term
        if i:
            dstick_dcos += watson[:, i : i + 1] * (dlegendre * protocol.gaussian[:, i])
        if i < protocol.l_max // 2:
            alpha, beta, gamma = _t2_coefficients(2 * i)
            shifted = c2 - beta
            derivative = (2.0 * cosine * legendre + shifted * dlegendre - gamma * dprevious) / alpha
            dlegendre, dprevious = derivative, dlegendre
            legendre, previous = (shifted * legendre - gamma * previous) / alpha, legendre

    x = protocol.x
    along = m2 * c2 + 0.5 * (1.0 - m2) * (1.0 - c2)
    zeppelin = np.exp(-x * (1.0 - icvf * (1.0 - along)))
    neurite = icvf * stick + (1.0 - icvf) * zeppelin
    signal = (1.0 - isovf) * neurite + isovf * protocol.free

    zeppelin_slope = -x * icvf * zeppelin
    jacobian = np.empty(signal.shape + (5,))
    jacobian[..., 0] = (1.0 - isovf) * (stick - zeppelin + (1.0 - icvf) * zeppelin * x * (1.0 - along))
    jacobian[..., 1] = (1.0 - isovf) * dkappa_dodi[:, None] * (
        icvf * dstick_dkappa + (1.0 - icvf) * zeppelin_slope * 0.5 * (3.0 * c2 - 1.0) * dm2_dkappa)
    jacobian[..., 2] = protocol.free - neurite
    dzeppelin_dcos = zeppelin_slope * (3.0 * m2 - 1.0) * cosine
    dsignal_dcos = (1.0 - isovf) * (icvf * dstick_dcos + (1.0 - icvf) * dzeppelin_dcos)
    e1, e2 = _tangent_basis(mu)
    jacobian[..., 3] = dsignal_dcos * (e1 @ protocol.bvecs.T)
    jacobian[..., 4] = dsignal_dcos * (e2 @ protocol.bvecs.T)
    return signal, jacobian


def _tangent_basis(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing each row of ``mu`` to an orthonormal basis."""
    helper = np.zeros_like(mu)
    helper[np.arange(mu.shape[0]), np.argmin(np.abs(mu), axis=1)] = 1.0
    e1 = np.cross(mu, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(mu, e1)


def _dti_directions(protocol: _Protocol, signal: np.ndarray) -> np.ndarray:
    """Principal eigenvectors of a log-linear least-squares tensor fit, shape (N, 3)."""
    b, g = protocol.bvals, protocol.bvecs
    gx, gy, gz = g.T
    design = np.column_stack([np.ones_like(b), -b * gx * gx, -b * gy * gy, -b * gz * gz,
                              -2 * b * gx * gy, -2 * b * gx * gz, -2 * b * gy * gz])
    # Clipping keeps the log finite where noise drives the high-b signal to or below zero.
    coefficients = np.log(np.clip(signal, 1e-3, None)) @ np.linalg.pinv(design).T
    xx, yy, zz, xy, xz, yz = coefficients[:, 1:].T
    tensor = np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1),
                       np.stack([xz, yz, zz], -1)], -2)
    return np.linalg.eigh(tensor)[1][..., -1]


def _grid_search(protocol: _Protocol, signal: np.ndarray, mu: np.ndarray, advance) -> np.ndarray:
    """Best ``(ν_ic, ODI, ν_iso)`` per voxel on the (ν_ic, ODI) grid, ``ν_iso`` profiled exactly.

    For fixed ``(ν_ic, ODI)`` the signal is linear in ``ν_iso``, ``(1 - ν_iso) E_n + ν_iso E_iso``,
    so the least-squares cost is a parabola in ``ν_iso`` whose minimiser on [0, 1] is the
    clipped vertex ``((y - E_n)·(E_iso - E_n)) / ||E_iso - E_n||²``. The dot products of
    ``E_n = ν_ic E_ic + (1 - ν_ic) E_ec`` are expanded so that only the zeppelin needs the full
    (voxel, ODI, ICVF, volume) array.
    """
    kappa = np.cos(0.5 * np.pi * _GRID_ODI) / np.sin(0.5 * np.pi * _GRID_ODI)
    watson = _watson_coefficients(kappa, protocol.l_max)                        # (K, L)
    m2 = watson_moments(kappa)[0][:, None]                                      # (K, 1)
    icvf = _GRID_ICVF
    free, x = protocol.free, protocol.x
    free_free = free @ free
    chunk = _grid_chunk(signal.shape[1])
    best = np.empty((signal.shape[0], 3))
    for start in range(0, signal.shape[0], chunk):
        y = signal[start : start + chunk]
        cosine = mu[start : start + chunk] @ protocol.bvecs.T                   # (V, n)
        c2 = (cosine * cosine)[:, None, :]
        terms = _even_legendre(cosine, protocol.l_max) * protocol.gaussian      # (V, n, L)
        stick = np.matmul(watson, terms.transpose(0, 2, 1))                     # (V, K, n)
        # b gᵀD_ec g = x (1 - ν_ic (1 - h)), h = m2 c² + (1 - m2)(1 - c²)/2
        gain = x * (1.0 - 0.5 * (1.0 - m2) - c2 * (1.5 * m2 - 0.5))             # x (1 - h), (V, K, n)
        zeppelin = np.exp(icvf[:, None] * gain[:, :, None, :] - x)              # (V, K, I, n)
        y_s = (stick @ y[:, :, None])[:, :, None, 0]
        y_z = (zeppelin @ y[:, None, :, None])[..., 0]
        s_s = np.einsum("vkj,vkj->vk", stick, stick)[:, :, None]
        s_z = np.einsum("vkij,vkj->vki", zeppelin, stick)
        z_z = np.einsum("vkij,vkij->vki", zeppelin, zeppelin)
        s_f = (stick @ free)[:, :, None]
        z_f = zeppelin @ free
        y_n = icvf * y_s + (1.0 - icvf) * y_z
        n_n = icvf**2 * s_s + 2.0 * icvf * (1.0 - icvf) * s_z + (1.0 - icvf) ** 2 * z_z
        n_f = icvf * s_f + (1.0 - icvf) * z_f
        y_f = (y @ free)[:, None, None]
        curvature = n_n - 2.0 * n_f + free_free
        with np.errstate(divide="ignore", invalid="ignore"):
            isovf = np.clip(np.where(curvature > 0, (y_f - y_n - n_f + n_n) / curvature, 0.0), 0.0, 1.0)
        cost = -2.0 * ((1.0 - isovf) * y_n + isovf * y_f) + (1.0 - isovf) ** 2 * n_n \
            + 2.0 * isovf * (1.0 - isovf) * n_f + isovf**2 * free_free
        flat = cost.reshape(len(y), -1).argmin(axis=1)
        k, i = np.unravel_index(flat, cost.shape[1:])
        best[start : start + chunk] = np.column_stack(
            [icvf[i], _GRID_ODI[k], isovf.reshape(len(y), -1)[np.arange(len(y)), flat]])
        advance()
    return best


def _grid_chunk(n: int) -> int:
    return max(1, _GRID_CHUNK_BYTES // (8 * n * _GRID_ICVF.size * _GRID_ODI.size))


def _levenberg_marquardt(protocol: _Protocol, signal: np.ndarray, params: np.ndarray, mu: np.ndarray,
                         advance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine ``params`` (N, 3) and ``mu`` (N, 3) of all voxels at once; returns them and the cost."""
    lower = np.array([0.0, _ODI_MIN, 0.0])
    upper = np.ones(3)
    params = np.clip(params, lower, upper)
    model, jacobian = _evaluate(protocol, params, mu)
    residual = signal - model
    cost = np.einsum("vj,vj->v", residual, residual)
    damping = np.full(signal.shape[0], 1e-3)
    active = np.ones(signal.shape[0], dtype=bool)
    for _ in range(_MAX_ITERATIONS):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        jac = jacobian[idx]
        gradient = np.einsum("vjp,vj->vp", jac, residual[idx])
        hessian = np.matmul(jac.transpose(0, 2, 1), jac)
        p = params[idx]
        # Projected Levenberg–Marquardt: a parameter on a bound whose descent direction leaves
        # the box is held there for this step (its row and column leave the system).
        frozen = np.zeros((idx.size, 5), dtype=bool)
        frozen[:, :3] = ((p <= lower) & (gradient[:, :3] < 0)) | ((p >= upper) & (gradient[:, :3] > 0))
        keep = ~frozen
        hessian *= keep[:, :, None] & keep[:, None, :]
        gradient *= keep
        diagonal = np.diagonal(hessian, axis1=1, axis2=2)
        # Marquardt's scaling, with a floor for directions the data do not constrain (the
        # orientation of an isotropic voxel) so the system stays regular.
        scale = diagonal + 1e-9 * diagonal.max(axis=1, keepdims=True) + 1e-30
        system = hessian + (damping[idx, None] * scale + frozen)[:, :, None] * np.eye(5)
        step = np.linalg.solve(system, gradient[..., None])[..., 0]
        trial = np.clip(p + step[:, :3], lower, upper)
        e1, e2 = _tangent_basis(mu[idx])
        trial_mu = mu[idx] + step[:, 3:4] * e1 + step[:, 4:5] * e2
        trial_mu /= np.linalg.norm(trial_mu, axis=1, keepdims=True)
        trial_model, trial_jacobian = _evaluate(protocol, trial, trial_mu)
        trial_residual = signal[idx] - trial_model
        trial_cost = np.einsum("vj,vj->v", trial_residual, trial_residual)
        better = trial_cost < cost[idx]
        decrease = cost[idx] - trial_cost
        accepted = idx[better]
        params[accepted], mu[accepted] = trial[better], trial_mu[better]
        residual[accepted], jacobian[accepted] = trial_residual[better], trial_jacobian[better]
        cost[accepted] = trial_cost[better]
        damping[idx] = np.where(better, np.maximum(damping[idx] / 3.0, 1e-12), damping[idx] * 4.0)
        converged = (better & ((decrease <= 1e-10 * (cost[idx] + decrease)) | (cost[idx] < 1e-24))) \
            | (~better & (damping[idx] > 1e10)) | (np.abs(step).max(axis=1) < 1e-12)
        active[idx[converged]] = False
        advance()
    return params, mu, cost


class NODDIModel:
    """NODDI model of a gradient table; :meth:`fit` estimates ODI, ICVF, ISOVF and orientation.

    Parameters
    ----------
    gtab : GradientTable
        At least one b = 0 volume and two non-zero shells.
    d_par : float
        Intrinsic parallel diffusivity in mm²/s (fixed, as in the NODDI toolbox).
    d_iso : float
        Free-water diffusivity in mm²/s (fixed).

    Notes
    -----
    The fit minimises the squared error of the normalised signal ``S / S0`` (``S0`` the mean of
    the b = 0 volumes), i.e. the Gaussian-noise maximum-likelihood estimate. The NODDI toolbox
    maximises a Rician likelihood instead, which matters where the signal nears the noise floor
    (high b, low SNR): the floor raises the mean of weak magnitude signals and least squares reads
    it as slower decay (at SNR 30 on the 99-volume NODDI protocol, ICVF and ISOVF come out about
    0.02 too high on average).

    1. Orientation: principal eigenvector of a log-linear least-squares tensor fit.
    2. Initialisation: grid search over ν_ic ∈ {0.05, 0.15, ..., 0.95} × ODI ∈ {0.03, 0.13, ...,
       0.93} with the orientation fixed, ν_iso profiled out exactly (the cost is a parabola in
       it), evaluated for all voxels at once in voxel chunks whose (voxels × grid points ×
       volumes) arrays take ~2 MiB.
    3. Refinement: Levenberg–Marquardt on all voxels at once over (ν_ic, ODI, ν_iso) and two
       small rotation angles of the orientation (tangent-plane coordinates re-centred every
       step, free of the poles of (θ, φ)), with an analytic Jacobian, Marquardt scaling and a
       damping factor per voxel (÷3 after an accepted step, ×4 after a rejected one). The box
       ν_ic, ν_iso ∈ [0, 1], ODI ∈ [0.005, 1] (κ ≤ 128) is enforced by projection, holding a
       parameter on its bound while the descent direction points outside. A voxel stops when
       an accepted step lowers its cost by less than 1e-10 relative, after 50 iterations, or
       when its damping exceeds 1e10.

    Zhang et al., NeuroImage 61 (2012) 1000–1016.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> g = rng.standard_normal((60, 3)); g /= np.linalg.norm(g, axis=1, keepdims=True)
    >>> bvals = np.r_[0.0, 0.0, np.full(30, 700.0), np.full(30, 2800.0)]
    >>> gtab = GradientTable(bvals, np.r_[np.zeros((2, 3)), g])
    >>> data = noddi_signal(gtab, [0.6, 0.3], [0.1, 0.4], [0.0, 0.2], [[1, 0, 0], [0, 0.6, 0.8]], S0=100.0)
    >>> fit = NODDIModel(gtab).fit(data)
    >>> print(np.round(fit.icvf, 3), np.round(fit.odi, 3), np.round(fit.isovf, 3))
    [0.6 0.3] [0.1 0.4] [0.  0.2]
    """

    def __init__(self, gtab: GradientTable, d_par: float = D_PAR, d_iso: float = D_ISO):
        self.gtab = _check_gtab(gtab)
        self.d_par = _positive(d_par, "d_par")
        self.d_iso = _positive(d_iso, "d_iso")
        bvals = np.asarray(gtab.bvals, dtype=np.float64)
        if not gtab.b0s_mask.any():
            raise InputError("gtab", "has no b = 0 volume to normalise the signal by")
        dw = ~gtab.b0s_mask
        weighted = GradientTable(bvals[dw], np.asarray(gtab.bvecs)[dw], gtab.b0_threshold)
        shells = weighted.shells() if len(weighted) else []
        if len(shells) < 2:
            raise InputError("gtab", f"has {len(shells)} non-zero shell(s); NODDI needs at least 2")

    def fit(self, data: ArrayLike, mask: ArrayLike | None = None, progress: bool = False) -> NODDIFit:
        """Fit every voxel of ``data``.

        Parameters
        ----------
        data : array_like, shape (..., n)
            Signals, the measurement axis last (``n = len(gtab)``).
        mask : array_like of bool, shape (...), optional
            Voxels to fit; the others (and voxels whose mean b = 0 signal is not positive) get
            zeros in every map.
        progress : bool
            Show a progress bar (on stderr) over the grid-search chunks and the iterations.

        Returns
        -------
        NODDIFit
        """
        signal = _array(data, "data", allow_inf=True, allow_nan=True)
        n = len(self.gtab)
        if signal.ndim == 0 or signal.shape[-1] != n:
            raise InputError("data", f"last axis must have the gradient table's {n} volumes, "
                                     f"got shape {signal.shape}")
        shape = signal.shape[:-1]
        if mask is None:
            mask = np.ones(shape, dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.shape != shape:
                raise InputError("mask", f"has shape {mask.shape} but the data's voxels have shape {shape}")
            binary = np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()
            if not (mask.dtype == bool or binary):
                raise InputError("mask", "must be boolean (or 0/1)")
            mask = mask.astype(bool)
        voxels = signal[mask]
        if not np.isfinite(voxels).all():
            bad = int((~np.isfinite(voxels)).any(axis=1).sum())
            raise InputError("data", f"contains NaN or Inf in {bad} voxel(s) inside the mask")
        S0 = np.zeros(shape)
        S0[mask] = voxels[:, self.gtab.b0s_mask].mean(axis=1)
        usable = S0[mask] > 0
        mask[mask] = usable
        voxels = voxels[usable] / S0[mask][:, None]
        params, mu, cost = self._fit_voxels(voxels, progress)
        maps = {"icvf": params[:, 0], "odi": params[:, 1], "isovf": params[:, 2],
                "residual": np.sqrt(cost / n), "S0": S0[mask]}
        full = {}
        for name, values in maps.items():
            full[name] = np.zeros(shape)
            full[name][mask] = values
        full["direction"] = np.zeros(shape + (3,))
        full["direction"][mask] = mu * np.where(mu[:, 2:] < 0, -1.0, 1.0)
        return NODDIFit(self, mask, full)

    def _fit_voxels(self, voxels: np.ndarray, progress: bool):
        protocol = _Protocol.build(self.gtab, self.d_par, self.d_iso)
        count, n = voxels.shape
        block = max(1, _BLOCK_ELEMENTS // n)
        blocks = [slice(s, min(s + block, count)) for s in range(0, count, block)]
        grid_chunk = _grid_chunk(n)
        params, mu, cost = np.zeros((count, 3)), np.zeros((count, 3)), np.zeros(count)
        bar = progress_bar(progress)
        with bar:
            chunks = sum(-(-(b.stop - b.start) // grid_chunk) for b in blocks)
            grid_task = bar.add_task("NODDI grid search", total=chunks)
            lm_task = bar.add_task("NODDI Levenberg–Marquardt", total=len(blocks) * _MAX_ITERATIONS)
            for number, part in enumerate(blocks):
                y = voxels[part]
                direction = _dti_directions(protocol, y)
                start = _grid_search(protocol, y, direction, lambda: bar.advance(grid_task))
                params[part], mu[part], cost[part] = _levenberg_marquardt(
                    protocol, y, start, direction, lambda: bar.advance(lm_task))
                bar.update(lm_task, completed=(number + 1) * _MAX_ITERATIONS)
        return params, mu, cost


class NODDIFit:
    """Parameter maps of a :class:`NODDIModel` fit; zeros outside the fitted voxels.

    Attributes
    ----------
    model : NODDIModel
    mask : ndarray of bool, shape (...)
        The voxels that were fitted.
    """

    def __init__(self, model: NODDIModel, mask: np.ndarray, maps: dict[str, np.ndarray]):
        self.model = model
        self.mask = mask
        self._maps = maps

    @property
    def icvf(self) -> np.ndarray:
        """Intra-cellular volume fraction of the tissue, shape (...)."""
        return self._maps["icvf"]

    @property
    def odi(self) -> np.ndarray:
        """Orientation dispersion index, shape (...)."""
        return self._maps["odi"]

    @property
    def isovf(self) -> np.ndarray:
        """Isotropic (free-water) volume fraction, shape (...)."""
        return self._maps["isovf"]

    @property
    def kappa(self) -> np.ndarray:
        """Watson concentration ``κ = cot(π ODI / 2)``, shape (...)."""
        kappa = np.zeros(self.mask.shape)
        kappa[self.mask] = odi_to_kappa(self.odi[self.mask])
        return kappa

    @property
    def direction(self) -> np.ndarray:
        """Mean neurite orientation (unit, z ≥ 0), shape (..., 3)."""
        return self._maps["direction"]

    @property
    def S0(self) -> np.ndarray:
        """Mean b = 0 signal, shape (...)."""
        return self._maps["S0"]

    @property
    def residual(self) -> np.ndarray:
        """Root-mean-square residual of the normalised signal ``S / S0`` over the volumes, shape (...)."""
        return self._maps["residual"]

    def predict(self, gtab: GradientTable, S0: ArrayLike | None = None) -> np.ndarray:
        """Signals of the fitted parameters for ``gtab``, shape (..., len(gtab)); zeros outside the mask.

        Parameters
        ----------
        gtab : GradientTable
        S0 : array_like, shape (...), optional
            b = 0 signal; the fitted ``S0`` by default.
        """
        gtab = _check_gtab(gtab)
        if S0 is None:
            S0 = self.S0
        else:
            S0 = _array(S0, "S0")
            S0 = np.broadcast_to(S0, _broadcast(S0.shape, self.mask.shape, name="S0"))
            if S0.shape != self.mask.shape:
                raise InputError("S0", f"has shape {S0.shape}, expected the fit's {self.mask.shape}")
        out = np.zeros(self.mask.shape + (len(gtab),))
        if self.mask.any():
            m = self.mask
            out[m] = noddi_signal(gtab, self.icvf[m], self.odi[m], self.isovf[m], self.direction[m],
                                  self.model.d_par, self.model.d_iso, S0[m])
        return out
