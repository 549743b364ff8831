"""Orientation and translation grids for exhaustive and local searches, as RELION's ``HealpixSampling``.

RELION (``src/healpix_sampling.cpp``) samples 3-D orientations as the product of

* viewing directions at the centres of the HEALPix pixels of order ``o`` (``N_side = 2^o``,
  ``12 · 4^o`` directions; Górski et al. 2005, ApJ 622, 759), with
  ``rot = φ`` (wrapped to (−180°, 180°]) and ``tilt = θ`` (colatitude), and
* in-plane angles ``psi = 0, Δ, 2Δ, …`` with ``Δ = 360° / (6 · 2^o)`` (``6 · 2^o`` values),

so order 0 → 60°, 2 → 15°, 3 → 7.5°, 4 → 3.75°. The viewing direction of ``(rot, tilt, psi)`` is
``(sin tilt cos rot, sin tilt sin rot, cos tilt)`` (RELION's ``Euler_angles2direction``); it is the
third row of the rotation matrix of :mod:`bioinverse.cryoem` (``Euler_angles2matrix``).

Only C1 symmetry is handled: every HEALPix direction is kept (RELION removes symmetry-equivalent
directions for other point groups). RELION numbers the directions in HEALPix's NEST scheme; this
module uses the RING scheme (rings of constant ``z`` from north to south, ``φ`` increasing within a
ring). The two are the same set of directions in another order. Orientation index ``i`` of
:func:`orientation_grid` is ``i = direction · n_psi + psi_index``, RELION's ordering of
``(idir, ipsi)``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from bioinverse._checks import positive_number, real_finite_array
from bioinverse.errors import InputError

__all__ = [
    "angular_step",
    "healpix_pixel_centres",
    "local_orientations",
    "nearest_orientation",
    "orientation_grid",
    "translation_grid",
    "viewing_directions",
]

_MAX_ORDER = 10  # 12.6 million directions (0.06°): finer than any search grid


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 0 <= order <= _MAX_ORDER:
        raise InputError("order", f"must be an integer HEALPix order in [0, {_MAX_ORDER}], got {order!r}")
    return int(order)


def _ring_of_cap_pixel(p: np.ndarray) -> np.ndarray:
    """Ring index i ≥ 1 (counted from the pole) of polar-cap pixel p, i.e. 2i(i−1) ≤ p < 2i(i+1)."""
    i = ((1 + np.floor(np.sqrt(1.0 + 2.0 * p))) // 2).astype(np.int64)
    # Guard the float square root against an off-by-one at exact squares.
    i += 2 * i * (i + 1) <= p
    i -= 2 * i * (i - 1) > p
    return i


def healpix_pixel_centres(order: int) -> np.ndarray:
    """Centres of the HEALPix pixels of ``N_side = 2**order``, RING scheme, in radians.

    Closed forms of Górski et al. (2005), ApJ 622, 759, §4 (ring index ``i``, pixel-in-ring index
    ``j ≥ 1``), with the azimuthal phase of the HEALPix library's ``pix2ang_ring``:

    .. math::

        \\text{polar caps } (i < N_\\mathrm{side}):\\quad
        z = \\pm\\Big(1 - \\frac{i^2}{3 N_\\mathrm{side}^2}\\Big), \\quad
        \\phi = \\frac{\\pi}{2i}\\Big(j - \\frac12\\Big),\\ j = 1 \\dots 4i;

        \\text{equatorial belt}:\\quad
        z = \\frac43 - \\frac{2i}{3 N_\\mathrm{side}}, \\quad
        \\phi = \\frac{\\pi}{2 N_\\mathrm{side}}\\Big(j - 1 + \\frac{s}{2}\\Big),\\
        s = (i - N_\\mathrm{side} + 1) \\bmod 2,\\ j = 1 \\dots 4N_\\mathrm{side},

    for rings ``i = N_side … 3 N_side`` of the belt (``i`` counted from the north pole), and
    :math:`\\theta = \\arccos z`. (Górski et al. write the belt's :math:`\\phi` with ``j − s/2``; the
    ``j − 1`` used here starts each ring at the same pixel as the HEALPix library and RELION.)

    Parameters
    ----------
    order : int
        HEALPix order, ``N_side = 2**order`` (0 … 10).

    Returns
    -------
    ndarray, shape (12 · 4**order, 2), float64
        ``(theta, phi)``: colatitude in [0, π] and longitude in [0, 2π), pixel ``p`` in row ``p``.

    Examples
    --------
    >>> c = healpix_pixel_centres(0)
    >>> print(np.round(3 * np.cos(c[:, 0])).astype(int))
    [ 2  2  2  2  0  0  0  0 -2 -2 -2 -2]
    >>> print(np.round(np.degrees(c[:8, 1])))
    [ 45. 135. 225. 315.   0.  90. 180. 270.]
    """
    order = _check_order(order)
    nside = 1 << order
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    p = np.arange(npix, dtype=np.int64)
    z = np.empty(npix)
    phi = np.empty(npix)

    north = p < ncap
    south = p >= npix - ncap
    belt = ~(north | south)

    i = _ring_of_cap_pixel(p[north])
    j = p[north] + 1 - 2 * i * (i - 1)
    z[north] = 1.0 - i * i / (3.0 * nside * nside)
    phi[north] = (j - 0.5) * (0.5 * math.pi / i)

    q = p[belt] - ncap
    i = q // (4 * nside) + nside
    j = q % (4 * nside) + 1
    half_offset = np.where((i + nside) % 2 == 1, 1.0, 0.5)
    z[belt] = (2 * nside - i) * (2.0 / (3.0 * nside))
    phi[belt] = (j - half_offset) * (math.pi / (2 * nside))

    q = npix - 1 - p[south]  # mirror image in the north cap: same ring index, counted from the south pole
    i = _ring_of_cap_pixel(q)
    j = p[south] - (npix - 2 * i * (i + 1)) + 1
    z[south] = -1.0 + i * i / (3.0 * nside * nside)
    phi[south] = (j - 0.5) * (0.5 * math.pi / i)

    return np.column_stack([np.arccos(np.clip(z, -1.0, 1.0)), phi])


def angular_step(order: int) -> float:
    """RELION's angular sampling of HEALPix order ``order``, in degrees: ``360 / (6 · 2**order)``.

    ``HealpixSampling::getAngularSampling`` (``src/healpix_sampling.cpp``); also the in-plane (psi)
    step of :func:`orientation_grid`.

    .. math:: \\Delta = \\frac{360^\\circ}{6 \\cdot 2^{o}}

    Parameters
    ----------
    order : int
        HEALPix order (0 … 10).

    Returns
    -------
    float
        Degrees.

    Examples
    --------
    >>> [angular_step(o) for o in (0, 2, 3, 4)]
    [60.0, 15.0, 7.5, 3.75]
    """
    return 360.0 / (6 * 2 ** _check_order(order))


def _direction_angles(order: int) -> np.ndarray:
    """(rot, tilt) in degrees of the HEALPix directions, RELION's ``getDirectionFromHealPix``."""
    centres = healpix_pixel_centres(order)
    rot = np.degrees(centres[:, 1])
    rot = np.where(rot > 180.0, rot - 360.0, rot)  # RELION's checkDirection: rot in (-180, 180]
    return np.column_stack([rot, np.degrees(centres[:, 0])])


def orientation_grid(order: int) -> np.ndarray:
    """All orientations of RELION's 3-D sampling at HEALPix order ``order`` (C1 symmetry).

    Every HEALPix direction (:func:`healpix_pixel_centres`, RING order), as ``rot = φ`` wrapped to
    (−180°, 180°] and ``tilt = θ`` in degrees (RELION's ``HealpixSampling::getDirectionFromHealPix``),
    combined with every ``psi = k · Δ``, ``k = 0 … 6·2**order − 1``, ``Δ =`` :func:`angular_step`
    (``HealpixSampling::setOrientations``).

    .. math:: n = 12 \\cdot 4^{o} \\times 6 \\cdot 2^{o}

    Parameters
    ----------
    order : int
        HEALPix order (0 … 10; order 3 gives 768 × 48 = 36 864 orientations).

    Returns
    -------
    ndarray, shape (n, 3), float64
        ``(rot, tilt, psi)`` in degrees; row ``direction · n_psi + psi_index``.

    Examples
    --------
    >>> g = orientation_grid(1)
    >>> g.shape
    (576, 3)
    >>> print(np.round(g[[0, 1, 12]], 3))
    [[ 45.     23.556   0.   ]
     [ 45.     23.556  30.   ]
     [135.     23.556   0.   ]]
    """
    order = _check_order(order)
    dirs = _direction_angles(order)
    n_psi = 6 * 2**order
    psi = np.arange(n_psi) * angular_step(order)
    grid = np.empty((dirs.shape[0], n_psi, 3))
    grid[:, :, :2] = dirs[:, None, :]
    grid[:, :, 2] = psi[None, :]
    return grid.reshape(-1, 3)


def viewing_directions(angles: ArrayLike) -> np.ndarray:
    """Unit viewing directions of Euler angles ``(rot, tilt[, psi])`` in degrees.

    RELION's ``Euler_angles2direction`` (``src/euler.cpp``):

    .. math:: \\mathbf{d} = (\\sin\\beta \\cos\\alpha,\\ \\sin\\beta \\sin\\alpha,\\ \\cos\\beta),
              \\quad \\alpha = \\mathrm{rot},\\ \\beta = \\mathrm{tilt}.

    Parameters
    ----------
    angles : array_like, shape (m, 2) or (m, 3)
        Degrees; a third column (psi) is ignored.

    Returns
    -------
    ndarray, shape (m, 3), float64

    Examples
    --------
    >>> print(np.round(viewing_directions([[0, 90, 0], [90, 90, 0], [30, 0, 10]]), 6) + 0.0)
    [[1. 0. 0.]
     [0. 1. 0.]
     [0. 0. 1.]]
    """
    a = _check_angles(angles, min_columns=2)
    rot, tilt = np.radians(a[:, 0]), np.radians(a[:, 1])
    return np.column_stack([np.sin(tilt) * np.cos(rot), np.sin(tilt) * np.sin(rot), np.cos(tilt)])


def _check_angles(angles: ArrayLike, min_columns: int = 3) -> np.ndarray:
    a = real_finite_array(angles, "angles")
    if a.ndim == 1 and a.size in (2, 3) and min_columns <= a.size:
        a = a[None, :]
    if a.ndim != 2 or not min_columns <= a.shape[1] <= 3:
        want = "(m, 3) (rot, tilt, psi)" if min_columns == 3 else "(m, 2) or (m, 3)"
        raise InputError("angles", f"must have shape {want} in degrees, got {a.shape}")
    return a


def translation_grid(max_shift: float, step: float) -> np.ndarray:
    """In-plane offsets of RELION's translational search, in pixels.

    ``HealpixSampling::setTranslations`` (``src/healpix_sampling.cpp``, 2-D case): the square lattice
    ``(ix · step, iy · step)``, ``|ix|, |iy| ≤ ceil(max_shift / step)``, restricted to the disc

    .. math:: x^2 + y^2 < r^2 + 0.001, \\qquad r = \\texttt{max\\_shift},

    in RELION's order (``x`` outer, ``y`` inner). ``(0, 0)`` is always included.

    Parameters
    ----------
    max_shift : float
        Search radius r, pixels (≥ 0; RELION's ``offset_range``).
    step : float
        Lattice spacing, pixels (> 0; RELION's ``offset_step``).

    Returns
    -------
    ndarray, shape (n, 2), float64
        ``(x, y)`` offsets in pixels.

    Examples
    --------
    >>> t = translation_grid(2.0, 1.0)
    >>> len(t), bool(((t == 0).all(axis=1)).any())
    (13, True)
    >>> print(translation_grid(1.0, 1.0))
    [[-1.  0.]
     [ 0. -1.]
     [ 0.  0.]
     [ 0.  1.]
     [ 1.  0.]]
    """
    r = positive_number(max_shift, "max_shift", unit="pixels", allow_zero=True)
    d = positive_number(step, "step", unit="pixels")
    half = math.ceil(r / d)
    if half > 10_000:
        raise InputError("max_shift", f"over step gives {2 * half + 1}² lattice points; use a coarser step")
    idx = np.arange(-half, half + 1, dtype=np.float64) * d
    x, y = np.meshgrid(idx, idx, indexing="ij")  # x outer, y inner, as RELION's loops
    keep = x * x + y * y < r * r + 0.001
    return np.column_stack([x[keep], y[keep]])


# ----------------------------------------------------------------------------------------------
# Local searches
# ----------------------------------------------------------------------------------------------

_PSI_MODES = ("aligned", "prior")
_NEAREST_CANDIDATES = 8


def _rotation_matrices(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (ZYZ, Xmipp) for arrays of angles in degrees: (m, 3, 3)."""
    a, b, g = np.radians(rot), np.radians(tilt), np.radians(psi)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def _aligned_psi(dir_angles: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """In-plane angle (degrees) that brings direction ``dir_angles`` (k, 2) closest to ``pose`` (k, 3).

    With A(ψ) = R_z(ψ) B, B = R_y(tilt) R_z(rot), the rotation distance to P is smallest where
    trace(Pᵀ A(ψ)) = cos ψ (M₀₀ + M₁₁) + sin ψ (M₁₀ − M₀₁) + M₂₂ is largest, M = B Pᵀ.
    """
    zero = np.zeros(dir_angles.shape[0])
    b = _rotation_matrices(dir_angles[:, 0], dir_angles[:, 1], zero)
    p = _rotation_matrices(pose[:, 0], pose[:, 1], pose[:, 2])
    m = b @ np.swapaxes(p, -1, -2)
    return np.degrees(np.arctan2(m[:, 1, 0] - m[:, 0, 1], m[:, 0, 0] + m[:, 1, 1]))


def _psi_reference(mode: str, dir_angles: np.ndarray, pose: np.ndarray) -> np.ndarray:
    if mode == "prior":
        return pose[:, 2]
    return _aligned_psi(dir_angles, pose)


def _check_psi_mode(psi_mode: str) -> str:
    if psi_mode not in _PSI_MODES:
        raise InputError("psi_mode", f"must be one of {_PSI_MODES}, got {psi_mode!r}")
    return psi_mode


def nearest_orientation(order: int, angles: ArrayLike, psi_mode: str = "aligned") -> np.ndarray:
    """Index into :func:`orientation_grid` of the grid orientation nearest to each pose.

    The direction is the grid direction of largest :math:`\\mathbf{d}_g \\cdot \\mathbf{d}`; the
    in-plane angle is the grid ``psi`` nearest (circularly) to the reference angle :math:`\\psi_0`:

    * ``psi_mode="aligned"`` (default): :math:`\\psi_0` minimises the rotation angle between the pose
      and the grid direction's rotation :math:`R_z(\\psi) R_y(\\mathrm{tilt}_g) R_z(\\mathrm{rot}_g)`,
      :math:`\\psi_0 = \\operatorname{atan2}(M_{10} - M_{01}, M_{00} + M_{11})`,
      :math:`M = R_y R_z P^T`. This accounts for rot–psi coupling (exact near the poles, where
      ``rot`` and ``psi`` of a pose are nearly interchangeable).
    * ``psi_mode="prior"``: :math:`\\psi_0` is the pose's own ``psi`` (RELION's psi prior).

    Parameters
    ----------
    order : int
        HEALPix order of the grid.
    angles : array_like, shape (m, 3)
        Poses ``(rot, tilt, psi)`` in degrees.
    psi_mode : {"aligned", "prior"}, optional

    Returns
    -------
    ndarray, shape (m,), int64

    Examples
    --------
    Near the south pole ``psi − rot`` is what matters, so the aligned in-plane angle differs from
    the pose's own ``psi``:

    >>> g = orientation_grid(2)
    >>> poses = [[12.0, 41.0, 100.0], [-170.0, 179.0, 3.0]]
    >>> print(np.round(g[nearest_orientation(2, poses)], 2))
    [[  11.25   48.19  105.  ]
     [-135.    168.28   45.  ]]
    >>> print(np.round(g[nearest_orientation(2, poses, psi_mode="prior")], 2))
    [[  15.     35.66  105.  ]
     [-135.    168.28    0.  ]]
    """
    order = _check_order(order)
    psi_mode = _check_psi_mode(psi_mode)
    pose = _check_angles(angles)
    dirs = _direction_angles(order)
    tree = cKDTree(viewing_directions(dirs))
    step = angular_step(order)
    n_psi = 6 * 2**order
    if psi_mode == "prior":
        _, idir = tree.query(viewing_directions(pose), k=1)
        idir = np.asarray(idir, dtype=np.int64)
        ipsi = np.rint(np.mod(pose[:, 2], 360.0) / step).astype(np.int64) % n_psi
        return idir * n_psi + ipsi
    # The nearest rotation need not have the nearest direction: try the closest few directions,
    # each with its best grid psi, and keep the smallest rotation angle (largest trace).
    k = min(_NEAREST_CANDIDATES, dirs.shape[0])
    _, cand = tree.query(viewing_directions(pose), k=k)
    cand = np.asarray(cand, dtype=np.int64).reshape(pose.shape[0], k)
    flat_pose = np.repeat(pose, k, axis=0)
    psi0 = _aligned_psi(dirs[cand.ravel()], flat_pose)
    ipsi = np.rint(np.mod(psi0, 360.0) / step).astype(np.int64) % n_psi
    cand_rot = _rotation_matrices(dirs[cand.ravel(), 0], dirs[cand.ravel(), 1], ipsi * step)
    pose_rot = _rotation_matrices(flat_pose[:, 0], flat_pose[:, 1], flat_pose[:, 2])
    trace = np.einsum("nij,nij->n", cand_rot, pose_rot).reshape(-1, k)
    best = np.argmax(trace, axis=1)
    rows = np.arange(pose.shape[0])
    return cand[rows, best] * n_psi + ipsi.reshape(-1, k)[rows, best]


def local_orientations(
    order: int, angles: ArrayLike, max_angle: float, psi_mode: str = "aligned"
) -> list[np.ndarray]:
    """Grid orientations near each of ``m`` poses, for local angular searches.

    For pose ``(rot, tilt, psi)`` with viewing direction :math:`\\mathbf{d}`, grid orientation
    ``(rot_g, tilt_g, psi_g)`` is kept when

    .. math::

        \\arccos(\\mathbf{d}_g \\cdot \\mathbf{d}) \\le \\theta_\\max
        \\quad\\text{and}\\quad |\\psi_g - \\psi_0|_{360^\\circ} \\le \\theta_\\max ,

    with :math:`|\\cdot|_{360^\\circ}` the circular distance and :math:`\\psi_0` as in
    :func:`nearest_orientation`: with ``"aligned"`` (default) the in-plane angle that best matches the
    pose for that grid direction, so the result holds every grid orientation within a rotation angle
    of ``max_angle`` of the pose (and, fallbacks aside, none farther than twice that); with ``"prior"`` the pose's own
    ``psi``, as RELION's ``HealpixSampling::selectOrientationsWithNonZeroPriorProbability`` with a hard
    cut-off (which misses in-plane angles where rot and psi couple, near the poles). As in RELION, if
    no grid direction (or no psi) is within range, the nearest one is used (the direction of
    :func:`nearest_orientation`), so no list is empty. A tolerance of 10⁻⁹° keeps grid points lying
    exactly at ``max_angle``.

    Directions are found with a k-d tree on unit vectors (chord ``2 sin(θ_max / 2)``); psi windows and
    index assembly are vectorised over all (pose, direction) pairs. A list of arrays (not a padded
    array) is returned because the number of orientations varies from pose to pose.

    Parameters
    ----------
    order : int
        HEALPix order of the grid.
    angles : array_like, shape (m, 3)
        Previous poses ``(rot, tilt, psi)``, degrees.
    max_angle : float
        Half-width of the search, degrees (> 0).
    psi_mode : {"aligned", "prior"}, optional

    Returns
    -------
    list of m ndarrays (int64)
        Sorted indices into :func:`orientation_grid` (``direction · n_psi + psi_index``).

    Examples
    --------
    >>> idx = local_orientations(2, [[30.0, 60.0, 90.0]], max_angle=15.0)
    >>> print(np.round(orientation_grid(2)[idx[0]], 2))
    [[ 33.75  48.19  75.  ]
     [ 33.75  48.19  90.  ]
     [ 22.5   60.    90.  ]
     [ 22.5   60.   105.  ]
     [ 45.    60.    75.  ]
     [ 45.    60.    90.  ]
     [ 33.75  70.53  75.  ]
     [ 33.75  70.53  90.  ]]
    """
    order = _check_order(order)
    psi_mode = _check_psi_mode(psi_mode)
    pose = _check_angles(angles)
    limit = positive_number(max_angle, "max_angle", unit="degrees")
    m = pose.shape[0]
    dirs = _direction_angles(order)
    grid_vectors = viewing_directions(dirs)
    pose_vectors = viewing_directions(pose)
    tree = cKDTree(grid_vectors)
    tol = 1e-9
    chord = 2.0 * math.sin(math.radians(min(limit + tol, 180.0)) / 2.0) + 1e-12
    hits = tree.query_ball_point(pose_vectors, r=chord)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=m)
    owner = np.repeat(np.arange(m, dtype=np.int64), counts)
    idir = np.fromiter((d for h in hits for d in h), dtype=np.int64, count=int(counts.sum()))
    # The chord test is exact up to round-off; apply the angular criterion itself.
    cosang = np.einsum("ij,ij->i", grid_vectors[idir], pose_vectors[owner])
    inside = np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0))) <= limit + tol
    idir, owner = idir[inside], owner[inside]
    lonely = np.flatnonzero(np.bincount(owner, minlength=m) == 0)
    if lonely.size:  # no direction within range: take the nearest, as RELION does
        nearest = nearest_orientation(order, pose[lonely], psi_mode=psi_mode) // (6 * 2**order)
        idir = np.concatenate([idir, nearest])
        owner = np.concatenate([owner, lonely])
    order_ = np.lexsort((idir, owner))
    idir, owner = idir[order_], owner[order_]

    step = angular_step(order)
    n_psi = 6 * 2**order
    psi0 = _psi_reference(psi_mode, dirs[idir], pose[owner])
    if limit >= 180.0:
        offsets = np.broadcast_to(np.arange(n_psi), (idir.size, n_psi))
        valid = np.ones(offsets.shape, dtype=bool)
    else:
        # Unwrapped window [psi0 - limit, psi0 + limit] is shorter than 360°: no psi appears twice.
        lo = np.ceil((psi0 - limit - tol) / step).astype(np.int64)
        width = math.floor(2 * limit / step) + 2
        offsets = lo[:, None] + np.arange(width)[None, :]
        valid = np.abs(offsets * step - psi0[:, None]) <= limit + tol
        empty = ~valid.any(axis=1)
        if empty.any():  # no psi within range: take the nearest, as RELION does
            offsets[empty, 0] = np.rint(psi0[empty] / step).astype(np.int64)
            valid[empty, 0] = True
        offsets = np.where(valid, np.mod(offsets, n_psi), n_psi)  # padding sorts last
        offsets.sort(axis=1)
        valid = offsets < n_psi
    flat = (idir[:, None] * n_psi + offsets)[valid]
    per_pose = np.bincount(owner, weights=valid.sum(axis=1), minlength=m).astype(np.int64)
    return np.split(flat, np.cumsum(per_pose)[:-1])
