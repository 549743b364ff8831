"""Rotations in RELION's conventions: ZYZ Euler angles (rot, tilt, psi) in degrees and their matrices.

A particle's orientation is the matrix :math:`A` of :func:`euler_to_matrix`, which is RELION's
``Euler_angles2matrix`` (inherited from Xmipp; Sorzano et al. 2004, J. Struct. Biol. 148,
194–204). With :math:`a` = rot, :math:`b` = tilt, :math:`g` = psi,

.. math::

    A = R_z(g)\\, R_y(b)\\, R_z(a), \\qquad
    R_z(\\phi) = \\begin{pmatrix} \\cos\\phi & \\sin\\phi & 0 \\\\ -\\sin\\phi & \\cos\\phi & 0
                 \\\\ 0 & 0 & 1 \\end{pmatrix}, \\quad
    R_y(\\phi) = \\begin{pmatrix} \\cos\\phi & 0 & -\\sin\\phi \\\\ 0 & 1 & 0
                 \\\\ \\sin\\phi & 0 & \\cos\\phi \\end{pmatrix}.

:math:`A` maps map coordinates :math:`r = (x, y, z)` to image-frame coordinates :math:`A r`; the
projection image is :math:`p(u, v) = \\sum_w m(A^T (u, v, w))` (checked against ``relion_project``
in ``tests/cryoem/test_projection.py``), so the beam runs along the third row of :math:`A`,
:func:`viewing_direction`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.errors import InputError

__all__ = [
    "angular_distance",
    "euler_to_matrix",
    "matrix_to_euler",
    "random_rotations",
    "viewing_direction",
]

# RELION (Xmipp) compares against single-precision epsilon even in double-precision builds.
_FLT_EPSILON = float(np.finfo(np.float32).eps)


def euler_to_matrix(rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike) -> np.ndarray:
    """RELION's rotation matrix of ZYZ Euler angles (``Euler_angles2matrix``).

    Parameters
    ----------
    rot, tilt, psi : array_like
        Euler angles in degrees; any shapes that broadcast together.

    Returns
    -------
    ndarray, shape (..., 3, 3), float64
        With :math:`a, b, g` = rot, tilt, psi, :math:`c_c = \\cos b \\cos a`,
        :math:`c_s = \\cos b \\sin a`, :math:`s_c = \\sin b \\cos a`, :math:`s_s = \\sin b \\sin a`:

    .. math::

        A = \\begin{pmatrix}
        \\cos g\\, c_c - \\sin g \\sin a & \\cos g\\, c_s + \\sin g \\cos a & -\\cos g \\sin b \\\\
        -\\sin g\\, c_c - \\cos g \\sin a & -\\sin g\\, c_s + \\cos g \\cos a & \\sin g \\sin b \\\\
        s_c & s_s & \\cos b
        \\end{pmatrix}

    Source: RELION ``src/euler.cpp`` (Scheres 2012, J. Struct. Biol. 180, 519–530), after Xmipp.

    Examples
    --------
    >>> euler_to_matrix(90.0, 0.0, 0.0).round(6) + 0.0
    array([[ 0.,  1.,  0.],
           [-1.,  0.,  0.],
           [ 0.,  0.,  1.]])
    >>> euler_to_matrix([0.0, 10.0], 20.0, 30.0).shape
    (2, 3, 3)
    """
    a, b, g = np.broadcast_arrays(
        np.deg2rad(real_finite_array(rot, "rot")),
        np.deg2rad(real_finite_array(tilt, "tilt")),
        np.deg2rad(real_finite_array(psi, "psi")),
    )
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = (
        (cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb),
        (-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb),
        (sc, ss, cb),
    )
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def _rotation_matrices(A: ArrayLike, name: str) -> np.ndarray:
    m = real_finite_array(A, name)
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise InputError(name, f"must have shape (..., 3, 3), got {m.shape}")
    return m


def matrix_to_euler(A: ArrayLike) -> np.ndarray:
    """ZYZ Euler angles (rot, tilt, psi) of rotation matrices, as RELION's ``Euler_matrix2angles``.

    Parameters
    ----------
    A : array_like, shape (..., 3, 3)
        Rotation matrices in the convention of :func:`euler_to_matrix`.

    Returns
    -------
    ndarray, shape (..., 3), float64
        (rot, tilt, psi) in degrees; rot and psi in (−180, 180], tilt in [0, 180].

    Notes
    -----
    With :math:`|\\sin b| = \\sqrt{A_{02}^2 + A_{12}^2}`:

    .. math::

        \\psi = \\operatorname{atan2}(A_{12}, -A_{02}), \\quad
        \\mathrm{rot} = \\operatorname{atan2}(A_{21}, A_{20}), \\quad
        \\mathrm{tilt} = \\operatorname{atan2}(|\\sin b|, A_{22}).

    Gimbal lock (RELION's rule, kept here): when :math:`|\\sin b| \\le 16\\,\\epsilon_{32}`
    (:math:`\\epsilon_{32} \\approx 1.19 \\cdot 10^{-7}`) only rot + psi (tilt = 0) or psi − rot
    (tilt = 180) is defined; **rot is set to 0** and psi carries the whole in-plane angle:
    psi = atan2(−A₁₀, A₀₀) for tilt = 0 and psi = atan2(A₁₀, −A₀₀) for tilt = 180.
    Matrices there are reproduced to about 1e-6 (the size of the neglected :math:`\\sin b`),
    elsewhere to machine precision.

    Source: RELION ``src/euler.cpp``, ``Euler_matrix2angles``.

    Examples
    --------
    >>> matrix_to_euler(euler_to_matrix(30.0, 40.0, -50.0)).round(6)
    array([ 30.,  40., -50.])
    >>> matrix_to_euler(euler_to_matrix(30.0, 0.0, 20.0)).round(6) + 0.0  # gimbal lock: rot = 0
    array([ 0.,  0., 50.])
    """
    m = _rotation_matrices(A, "A")
    abs_sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = abs_sb > 16 * _FLT_EPSILON
    psi = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    rot = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    sin_psi, cos_psi = np.sin(psi), np.cos(psi)
    # Xmipp's SGN(x) is +1 for x >= 0.
    safe_cos = np.where(cos_psi == 0, 1.0, cos_psi)
    sign_a12 = np.where(m[..., 1, 2] >= 0, 1.0, -1.0)
    sign_sb = np.where(
        np.abs(sin_psi) < _FLT_EPSILON,
        np.where(-m[..., 0, 2] / safe_cos >= 0, 1.0, -1.0),
        np.where(sin_psi > 0, sign_a12, -sign_a12),
    )
    tilt = np.arctan2(sign_sb * abs_sb, m[..., 2, 2])

    upright = m[..., 2, 2] >= 0
    locked_psi = np.where(
        upright,
        np.arctan2(-m[..., 1, 0], m[..., 0, 0]),
        np.arctan2(m[..., 1, 0], -m[..., 0, 0]),
    )
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(upright, 0.0, np.pi))
    psi = np.where(regular, psi, locked_psi)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def random_rotations(n: int, seed: int | None = None) -> np.ndarray:
    """Euler angles of ``n`` rotations drawn uniformly (Haar measure) from SO(3).

    rot and psi are uniform in [−180, 180); :math:`\\cos(\\mathrm{tilt})` is uniform in [−1, 1],
    because the Haar measure in ZYZ Euler angles is
    :math:`\\mathrm{d}\\mu \\propto \\sin b\\, \\mathrm{d}a\\, \\mathrm{d}b\\, \\mathrm{d}g`
    (Miles 1965, Biometrika 52, 636–639).

    Parameters
    ----------
    n : int
        Number of rotations (≥ 0).
    seed : int or None
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    ndarray, shape (n, 3), float64
        (rot, tilt, psi) in degrees.

    Examples
    --------
    >>> angles = random_rotations(20000, seed=0)
    >>> bool(np.abs(euler_to_matrix(*angles.T).mean(axis=0)).max() < 0.02)
    True
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError("n", f"must be a non-negative integer, got {n!r}")
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=-1)


def angular_distance(A: ArrayLike, B: ArrayLike) -> np.ndarray:
    """Geodesic angle between rotations: the rotation angle of :math:`A^T B`, in degrees.

    .. math::

        \\theta = \\operatorname{atan2}\\big(\\lVert v \\rVert,\\; \\operatorname{tr} R - 1\\big),
        \\quad R = A^T B, \\quad v = (R_{21} - R_{12},\\, R_{02} - R_{20},\\, R_{10} - R_{01}),

    since :math:`\\operatorname{tr} R = 1 + 2\\cos\\theta` and :math:`\\lVert v \\rVert = 2\\sin\\theta`.
    Unlike :math:`\\arccos((\\operatorname{tr} R - 1)/2)` this is accurate near 0 and 180 degrees
    and never leaves the domain through round-off.

    Parameters
    ----------
    A, B : array_like, shape (..., 3, 3)
        Rotation matrices; leading shapes broadcast.

    Returns
    -------
    ndarray, shape (...), float64
        Angles in [0, 180] degrees.

    Examples
    --------
    >>> float(angular_distance(euler_to_matrix(10, 20, 30), euler_to_matrix(10, 20, 35)).round(6))
    5.0
    """
    a = _rotation_matrices(A, "A")
    b = _rotation_matrices(B, "B")
    r = np.einsum("...ji,...jk->...ik", a, b)
    v = np.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], axis=-1
    )
    trace = np.trace(r, axis1=-2, axis2=-1)
    return np.rad2deg(np.arctan2(np.linalg.norm(v, axis=-1), trace - 1.0))


def viewing_direction(angles: ArrayLike) -> np.ndarray:
    """Projection direction of Euler angles: the third row of :math:`A`, a unit vector in map frame.

    .. math::

        d = (\\sin b \\cos a,\\; \\sin b \\sin a,\\; \\cos b),
        \\qquad a = \\mathrm{rot},\\; b = \\mathrm{tilt}.

    The image is the sum of the map along :math:`d` (psi only turns the image in its plane).

    Parameters
    ----------
    angles : array_like, shape (..., 3)
        (rot, tilt, psi) in degrees.

    Returns
    -------
    ndarray, shape (..., 3), float64

    Examples
    --------
    >>> viewing_direction([0.0, 90.0, 0.0]).round(6) + 0.0
    array([1., 0., 0.])
    """
    ang = real_finite_array(angles, "angles")
    if ang.ndim < 1 or ang.shape[-1] != 3:
        raise InputError("angles", f"must have shape (..., 3), got {ang.shape}")
    a, b = np.deg2rad(ang[..., 0]), np.deg2rad(ang[..., 1])
    return np.stack([np.sin(b) * np.cos(a), np.sin(b) * np.sin(a), np.cos(b)], axis=-1)
