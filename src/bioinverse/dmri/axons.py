"""Analytic signal of a population of parallel axons: restricted cylinders in a hindered medium.

The fast alternative to the Monte Carlo simulator (:mod:`bioinverse.dmri.montecarlo`) for the
fingerprints of a white-matter population with axon radius :math:`r` and fibre (intra-axonal
volume) density :math:`f`:

* inside the axons, diffusion restricted by impermeable cylinders, in the Gaussian phase
  approximation of Van Gelderen et al. (J. Magn. Reson. B 103:255, 1994) across the axis and free
  along it;
* outside, a zeppelin whose perpendicular diffusivity follows the first-order tortuosity model
  :math:`D_\\perp = (1 - f) D` (Szafer et al., Magn. Reson. Med. 33:697, 1995), free along the axis.

Units: lengths in µm, times in ms, diffusivities in µm²/ms, gradient amplitudes in mT/m; the
gyromagnetic ratio is :data:`bioinverse.dmri.pgse.GAMMA_UM`. Every function broadcasts its
arguments with NumPy rules, so one call evaluates a whole (atoms × shells × angles) dictionary.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.special
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.dmri.pgse import GAMMA_UM
from bioinverse.errors import InputError

__all__ = ["DIFFUSIVITY", "axon_population_signal", "cylinder_perpendicular_signal"]

#: Free diffusivity (µm²/ms) of water inside and outside the axons, the default everywhere.
DIFFUSIVITY = 2.0

# Roots x_m of J1'(x) = 0 used by the Van Gelderen sum: at least _MIN_ROOTS, more for cylinders
# wide enough that the low modes are not yet attenuated during a pulse (see _n_roots).
_MIN_ROOTS = 60
_MAX_ROOTS = 20000
# Below this value of a(Δ + δ), a = Dα², the exponentials of the Van Gelderen numerator cancel to
# third order and the numerator is summed as its Taylor series instead.
_SERIES_THRESHOLD = 0.5
_SERIES_TERMS = 24
# cos θ may exceed 1 by rounding when it comes from a dot product of unit vectors.
_COS_TOLERANCE = 1e-9


@functools.lru_cache(maxsize=8)
def _bessel_roots(n_roots: int) -> np.ndarray:
    """The first ``n_roots`` positive roots of J1'(x) (1.8412, 5.3314, …), read-only."""
    roots = scipy.special.jnp_zeros(1, n_roots)
    roots.flags.writeable = False
    return roots


def _n_roots(radius: np.ndarray, small_delta: np.ndarray, diffusivity: np.ndarray) -> int:
    """Roots needed so that the modes left out are damped within a pulse (a δ = D x² δ / r² ≫ 1).

    Their contribution is then :math:`2δr^4/(D x^6)` per mode, whose tail beyond the 60th root is
    below 1e-11 of the sum; the modes of a wide cylinder (slow modes) need x ≳ r/√(Dδ).
    """
    ratio = float(np.max(radius / np.sqrt(diffusivity * small_delta), initial=0.0))
    return int(min(_MAX_ROOTS, max(_MIN_ROOTS, np.ceil(_MIN_ROOTS + 4.0 * ratio))))


def _gpd_numerator(a: np.ndarray, small_delta: np.ndarray, big_delta: np.ndarray) -> np.ndarray:
    """2aδ − 2 + 2e^{−aδ} + 2e^{−aΔ} − e^{−a(Δ−δ)} − e^{−a(Δ+δ)}, accurate for small a too.

    The constant, linear and quadratic terms in a cancel exactly; for a(Δ + δ) below
    ``_SERIES_THRESHOLD`` the Taylor series from the cubic term, a³δ²(Δ − δ/3) + …, replaces the
    direct sum, which would lose all digits to cancellation.
    """
    x_small, x_big = a * small_delta, a * big_delta
    direct = (2.0 * x_small + 2.0 * np.expm1(-x_small) + 2.0 * np.expm1(-x_big)
              - np.expm1(-(x_big - x_small)) - np.expm1(-(x_big + x_small)))
    use_series = (x_big + x_small) < _SERIES_THRESHOLD
    if not use_series.any():
        return direct
    a_s, d_s, D_s = a[use_series], small_delta[use_series], big_delta[use_series]
    series = np.zeros_like(a_s)
    factorial = 6.0
    for k in range(3, _SERIES_TERMS + 3):
        if k > 3:
            factorial *= k
        c_k = 2.0 * d_s**k + 2.0 * D_s**k - (D_s - d_s) ** k - (D_s + d_s) ** k
        series += (-a_s) ** k * c_k / factorial
    direct[use_series] = series
    return direct


def _broadcast(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return list(np.broadcast_arrays(*arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{name} {value.shape}" for name, value in arrays.items())
        raise InputError(", ".join(arrays), f"shapes do not broadcast together: {shapes}") from None


def _check_timing(small_delta: ArrayLike, big_delta: ArrayLike, diffusivity: ArrayLike) -> tuple[np.ndarray, ...]:
    small = real_finite_array(small_delta, "small_delta")
    big = real_finite_array(big_delta, "big_delta")
    diff = real_finite_array(diffusivity, "diffusivity")
    if (small <= 0).any():
        raise InputError("small_delta", "must be > 0 ms")
    if (diff <= 0).any():
        raise InputError("diffusivity", "must be > 0 µm²/ms")
    return small, big, diff


def _perpendicular_exponent(small_delta: np.ndarray, big_delta: np.ndarray, radius: np.ndarray,
                            diffusivity: np.ndarray) -> np.ndarray:
    """K = Σ_m N_m / (D² α_m⁶ (r²α_m² − 1)), so that ln E = −2γ²G²K; broadcast of the four inputs."""
    small, big, r, diff = _broadcast({"small_delta": small_delta, "big_delta": big_delta, "radius": radius,
                                      "diffusivity": diffusivity})
    if (big < small).any():
        raise InputError("big_delta", "must be ≥ small_delta (Δ ≥ δ)")
    roots = _bessel_roots(_n_roots(r, small, diff))
    shape = r.shape
    r, small, big, diff = (v.reshape(-1, 1) for v in (r, small, big, diff))
    wide = r > 0  # a cylinder of radius 0 has no transverse displacement: K = 0
    safe_r = np.where(wide, r, 1.0)
    a = diff * roots**2 / safe_r**2
    numerator = _gpd_numerator(a, np.broadcast_to(small, a.shape), np.broadcast_to(big, a.shape))
    # N / (D² α⁶ (r²α² − 1)) with α = x/r, written to stay finite for any r > 0
    terms = numerator * (safe_r / roots) ** 6 / (diff**2 * (roots**2 - 1.0))
    return np.where(wide[:, 0], terms.sum(axis=1), 0.0).reshape(shape)


def cylinder_perpendicular_signal(G: ArrayLike, small_delta: ArrayLike, big_delta: ArrayLike, radius: ArrayLike,
                                  diffusivity: ArrayLike = DIFFUSIVITY) -> np.ndarray:
    """Signal attenuation of diffusion restricted inside an impermeable cylinder, gradient ⟂ axis.

    The Gaussian phase approximation for rectangular PGSE pulses (Van Gelderen et al., J. Magn.
    Reson. B 103:255, 1994; Neuman, J. Chem. Phys. 60:4508, 1974):

    .. math::

        \\ln E = -2\\gamma^2 G^2 \\sum_{m\\ge1}
        \\frac{2D\\alpha_m^2\\delta - 2 + 2e^{-D\\alpha_m^2\\delta} + 2e^{-D\\alpha_m^2\\Delta}
              - e^{-D\\alpha_m^2(\\Delta-\\delta)} - e^{-D\\alpha_m^2(\\Delta+\\delta)}}
             {D^2\\alpha_m^6\\,(r^2\\alpha_m^2 - 1)},

    with :math:`\\alpha_m r` the roots of :math:`J_1'(x) = 0`. It tends to 1 as r → 0, to free
    diffusion :math:`e^{-bD}` as r → ∞, and to Neuman's motional-narrowing limit
    :math:`\\ln E \\approx -\\tfrac{7}{48}\\gamma^2G^2\\delta r^4/D` when δ, Δ ≫ r²/D. Enough roots are
    summed for a relative truncation error below 1e-10, and the numerator is evaluated by its
    Taylor series where its terms would cancel.

    Parameters
    ----------
    G : array_like
        Component of the gradient amplitude perpendicular to the cylinder axis, mT/m (its sign is
        irrelevant).
    small_delta, big_delta : array_like
        Pulse duration δ > 0 and separation Δ ≥ δ, ms.
    radius : array_like
        Cylinder radius r ≥ 0, µm.
    diffusivity : array_like, optional
        Intrinsic diffusivity D > 0, µm²/ms (default :data:`DIFFUSIVITY`).

    Returns
    -------
    ndarray
        E in (0, 1], float64, with the broadcast shape of the arguments.

    Raises
    ------
    InputError
        NaN/Inf, shapes that do not broadcast, r < 0, δ ≤ 0, Δ < δ or D ≤ 0 (the source names the
        argument).

    Examples
    --------
    >>> float(cylinder_perpendicular_signal(219.0, 12.9, 21.8, radius=2.0)).__round__(4)
    0.9519
    >>> cylinder_perpendicular_signal(219.0, 12.9, 21.8, radius=[0.0, 1.0, 4.0]).round(4).tolist()
    [1.0, 0.9968, 0.5094]
    """
    G = real_finite_array(G, "G")
    r = real_finite_array(radius, "radius")
    if (r < 0).any():
        raise InputError("radius", "must be ≥ 0 µm")
    small, big, diff = _check_timing(small_delta, big_delta, diffusivity)
    exponent = _perpendicular_exponent(small, big, r, diff)
    G, exponent = _broadcast({"G": G, "small_delta, big_delta, radius, diffusivity": exponent})
    return np.exp(-2.0 * GAMMA_UM**2 * G**2 * exponent)


def axon_population_signal(radius: ArrayLike, density: ArrayLike, G: ArrayLike, small_delta: ArrayLike,
                           big_delta: ArrayLike, cos_theta: ArrayLike,
                           diffusivity: ArrayLike = DIFFUSIVITY) -> np.ndarray:
    """Normalised PGSE signal of parallel axons of radius r at fibre density f.

    An intra-axonal restricted cylinder (:func:`cylinder_perpendicular_signal` for the gradient
    component :math:`G\\sin\\theta` across the axis, free diffusion along it) plus an extra-axonal
    zeppelin with the tortuosity limit :math:`D_\\perp = (1 - f)D` (Szafer et al., 1995), the
    "CylinderZeppelin" model of Panagiotaki et al. (NeuroImage 59:2241, 2012):

    .. math::

        S = f\\,E_\\perp(G\\sin\\theta)\\,e^{-bD\\cos^2\\theta}
          + (1 - f)\\,e^{-bD\\cos^2\\theta - bD(1 - f)\\sin^2\\theta},
        \\qquad b = \\gamma^2G^2\\delta^2(\\Delta - \\delta/3),

    with θ the angle between the gradient and the fibre axis; S = 1 when G = 0.

    Parameters
    ----------
    radius : array_like
        Axon radius r ≥ 0, µm.
    density : array_like
        Fibre density f in [0, 1] (intra-axonal signal fraction).
    G : array_like
        Gradient amplitude, mT/m.
    small_delta, big_delta : array_like
        Pulse duration δ > 0 and separation Δ ≥ δ, ms.
    cos_theta : array_like
        Cosine of the angle between gradient and axis, in [−1, 1] (θ and π − θ give the same
        signal).
    diffusivity : array_like, optional
        Free diffusivity D > 0 inside and outside the axons, µm²/ms.

    Returns
    -------
    ndarray
        S, float64, with the broadcast shape of the arguments.

    Raises
    ------
    InputError
        NaN/Inf, shapes that do not broadcast, or a value out of its range (the source names the
        argument).

    Examples
    --------
    >>> import numpy as np
    >>> cos = np.cos(np.deg2rad([0.0, 45.0, 90.0]))
    >>> axon_population_signal(1.0, 0.6, 69.3, 12.9, 21.8, cos).round(4).tolist()  # b = 1000 s/mm²
    [0.1351, 0.319, 0.7794]
    """
    f = real_finite_array(density, "density")
    if ((f < 0) | (f > 1)).any():
        raise InputError("density", "must lie in [0, 1]")
    cos = real_finite_array(cos_theta, "cos_theta")
    if (np.abs(cos) > 1.0 + _COS_TOLERANCE).any():
        raise InputError("cos_theta", "must lie in [-1, 1]")
    cos2 = np.minimum(cos**2, 1.0)
    G = real_finite_array(G, "G")
    small, big, diff = _check_timing(small_delta, big_delta, diffusivity)
    sin2 = 1.0 - cos2
    intra_perp = cylinder_perpendicular_signal(G * np.sqrt(sin2), small, big, radius, diff)
    bD = GAMMA_UM**2 * G**2 * small**2 * (big - small / 3.0) * diff
    parallel = np.exp(-bD * cos2)
    try:
        return f * intra_perp * parallel + (1.0 - f) * parallel * np.exp(-bD * (1.0 - f) * sin2)
    except ValueError:
        raise InputError("radius, density, G, small_delta, big_delta, cos_theta, diffusivity",
                         "shapes do not broadcast together") from None
