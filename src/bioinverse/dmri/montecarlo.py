"""Monte Carlo simulation of diffusion MRI signals in packed cylinders (white matter axons).

A *substrate* is a periodic square cell of parallel, impermeable cylinders along z
(:func:`pack_cylinders`). Spins are random walkers in the plane transverse to the cylinders
(:func:`random_walk`): each takes steps of fixed length :math:`\\ell = \\sqrt{4 D\\,\\mathrm{d}t}`
in a uniformly random direction and is reflected elastically (specularly) by the membranes, as
often as needed within a step, at exact segment/circle intersections. Intra-axonal walkers only
see their own cylinder; extra-axonal walkers find the cylinders near them through a cell list of
the periodic cell and keep unwrapped positions for the phase.

For every distinct pulse timing (δ, Δ) each walker stores the vector

.. math::

    \\mathbf I = \\int_0^{\\Delta+\\delta} s(t)\\, \\mathbf x(t)\\, \\mathrm{d}t, \\qquad
    s(t) = \\begin{cases} +1 & 0 \\le t \\le \\delta \\\\ -1 & \\Delta \\le t \\le \\Delta+\\delta \\\\
    0 & \\text{otherwise} \\end{cases}

(the effective gradient waveform of a PGSE sequence after the refocusing pulse), so that a
gradient :math:`G\\,\\mathbf g` gives the walker the phase :math:`\\gamma G\\, \\mathbf g\\cdot
\\mathbf I`. The walk is done once; the signals of all gradient strengths and angles of every shell
follow from the stored integrals (:func:`simulate_fingerprint`). Motion along the fibres is free and
independent of the transverse motion, so its contribution is the exact Gaussian factor
:math:`e^{-bD\\cos^2\\theta}`.

Convergence (Hall & Alexander, 2009): the bias of a fixed-step walk among obstacles grows with the
ratio of the step length to the size of the obstacles, its noise falls as :math:`1/\\sqrt{n}` with
the number of walkers. By default the number of steps is chosen per substrate so that the step is
:data:`DEFAULT_STEP_RATIO` = 0.25 mean radii (:func:`default_n_steps`, at most :data:`MAX_STEPS`).
The long-time apparent diffusivity of the extra-axonal space, the quantity most sensitive to the
step, is then within 1 % (f = 0.5) and 6 % (f = 0.76, too low) of its small-step limit, and it
falls to 14 % at f = 0.76 where the cap lengthens the step to 0.42 radii (r̄ = 0.25 µm with the
HCP timing); a step of 0.8 radii would cost 30 %. The cost keeps a dictionary of 782 atoms well
within an hour on 2 cores.

Units: lengths µm, times ms, diffusivities µm²/ms, gradient amplitudes mT/m; b in s/mm² where a
b-value is an argument (``b·D`` is dimensionless with b in ms/µm² = 1000 s/mm²).

The kernels are compiled with numba and run in parallel over walkers. Each walker draws its step
directions from its own SplitMix64 stream, seeded from ``seed`` and its index, so a result depends
on the seed only, never on the number of threads.

References
----------
Hall MG, Alexander DC (2009). Convergence and parameter choice for Monte-Carlo simulations of
diffusion MRI. IEEE Trans Med Imaging 28:1354–1364.

Rensonnet G, Scherrer B, Girard G, et al. (2019). Towards microstructure fingerprinting: estimation
of tissue properties from a dictionary of Monte Carlo diffusion MRI simulations. NeuroImage
184:964–980.

Van Gelderen P, DesPres D, van Zijl PCM, Moonen CTW (1994). Evaluation of restricted diffusion in
cylinders. Phosphocreatine in rabbit leg muscle. J Magn Reson B 103:255–260.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.dmri.pgse import GAMMA_UM
from bioinverse.errors import InputError

__all__ = [
    "DEFAULT_N_AZIMUTHS",
    "DEFAULT_N_CYLINDERS",
    "DEFAULT_N_WALKERS",
    "DEFAULT_RADIUS_CV",
    "DEFAULT_SHAKE_SWEEPS",
    "DEFAULT_STEP_RATIO",
    "MAX_STEPS",
    "MIN_STEPS",
    "Substrate",
    "WalkResult",
    "default_n_steps",
    "hcp_shells",
    "pack_cylinders",
    "pgse_weights",
    "random_walk",
    "simulate_fingerprint",
    "validate",
]

#: Coefficient of variation of the gamma distribution of radii in a substrate. Narrow, so that an
#: atom's signal is governed by its nominal mean radius, but non-zero, so that dense packings are
#: disordered like axons (monodisperse discs at high density order into hexagonal patches).
DEFAULT_RADIUS_CV = 0.1
#: Cylinders per periodic cell.
DEFAULT_N_CYLINDERS = 100
#: Walkers per simulation (split between the compartments in proportion to their volume).
DEFAULT_N_WALKERS = 5000
#: Default step length in units of the mean cylinder radius (see :func:`default_n_steps`).
DEFAULT_STEP_RATIO = 0.25
#: Bounds of the default number of steps: enough to resolve the pulses (and to make the phase of
#: free diffusion Gaussian to 0.1 % at b = 1000 s/mm²), and a cap on the cost of the thinnest axons
#: (with the HCP timing it lengthens the step to 0.42 radii at r̄ = 0.25 µm, 0.34 at 0.31 µm).
MIN_STEPS = 1000
MAX_STEPS = 25_000
#: Azimuths of the gradient around the fibre axis averaged in a fingerprint.
DEFAULT_N_AZIMUTHS = 8
#: Sweeps of random hard-disc moves that loosen a packing (see :func:`pack_cylinders`).
DEFAULT_SHAKE_SWEEPS = 2000

_DIFFUSIVITY = 2.0  # µm²/ms
_COMPARTMENTS = ("all", "intra", "extra")
# Walkers are kept this far (relative to the radius) on their side of a membrane after a
# reflection, far above the rounding error of coordinates of a few hundred µm.
_MEMBRANE_MARGIN = 1e-10
# Packing aims at separating cylinders by this relative gap so that no two of them touch.
_PACKING_GAP = 1e-6
# A step bouncing more often than this between nearly touching membranes stops where it is.
_MAX_REFLECTIONS = 10_000


# ----------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------


@numba.njit(inline="always")
def _splitmix64(state):  # pragma: no cover - compiled
    """Next state and output of the SplitMix64 generator (Steele, Lea & Flood, 2014)."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


# Step directions: a 32-bit random integer a is the angle 2πa/2³²; its top 16 bits index a table
# of cos/sin and the remaining angle (< 2π/2¹⁶) enters through the angle-addition formulas with a
# third-order Taylor expansion (error < 1e-17); several times faster than calling sin and cos.
_TABLE_ANGLES = 2.0 * np.pi * np.arange(2**16) / 2**16
_COS_TABLE = np.cos(_TABLE_ANGLES)
_SIN_TABLE = np.sin(_TABLE_ANGLES)


@numba.njit(inline="always")
def _direction(a, cos_table, sin_table):  # pragma: no cover - compiled
    """Unit vector at angle 2πa/2³² for a 32-bit integer a (held in an int64)."""
    e = np.float64(a & 0xFFFF) * (2.0 * np.pi / 4294967296.0)
    ce = 1.0 - 0.5 * e * e
    se = e * (1.0 - e * e / 6.0)
    c = cos_table[a >> 16]
    s = sin_table[a >> 16]
    return c * ce - s * se, s * ce + c * se


@numba.njit(inline="always")
def _step_direction(k, state, z, cos_table, sin_table):  # pragma: no cover - compiled
    """Direction of step k of a walker: one 64-bit draw gives the directions of two steps.

    Returns the generator state, its last output and the unit vector (ux, uy).
    """
    if k & 1 == 0:
        state, z = _splitmix64(state)
        a = np.int64(z >> np.uint64(32))
    else:
        a = np.int64(z & np.uint64(0xFFFFFFFF))
    ux, uy = _direction(a, cos_table, sin_table)
    return state, z, ux, uy


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)


# ----------------------------------------------------------------------------------------------
# Substrate
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Substrate:
    """A periodic square cell of parallel impermeable cylinders along z.

    Attributes
    ----------
    side : float
        Side L of the square cell, µm; the substrate repeats with period L in x and y.
    centres : ndarray, shape (n, 2)
        Cylinder centres in [0, L)², µm (read-only).
    radii : ndarray, shape (n,)
        Cylinder radii, µm (read-only).
    density : float
        Fibre (intra-axonal area) fraction :math:`f = \\sum_i \\pi r_i^2 / L^2`.

    Examples
    --------
    >>> s = Substrate(side=10.0, centres=[[5.0, 5.0]], radii=[2.0], density=0.04 * np.pi)
    >>> s.n_cylinders, round(s.mean_radius, 2)
    (1, 2.0)
    """

    side: float
    centres: np.ndarray
    radii: np.ndarray
    density: float

    def __post_init__(self) -> None:
        centres = real_finite_array(self.centres, "centres", allow_empty=True).reshape(-1, 2).copy()
        radii = real_finite_array(self.radii, "radii", allow_empty=True).ravel().copy()
        if len(centres) != len(radii):
            raise InputError("radii", f"has {len(radii)} values for {len(centres)} centres")
        if (radii <= 0).any():
            raise InputError("radii", "must be > 0 µm")
        side = float(self.side)
        if not (math.isfinite(side) and side > 0):
            raise InputError("side", f"must be a positive number of µm, got {self.side!r}")
        centres.flags.writeable = False
        radii.flags.writeable = False
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "radii", radii)
        object.__setattr__(self, "side", side)
        object.__setattr__(self, "density", float(self.density))

    @property
    def n_cylinders(self) -> int:
        """Number of cylinders in the cell."""
        return int(self.radii.size)

    @property
    def mean_radius(self) -> float:
        """Mean radius, µm (0 for an empty substrate)."""
        return float(self.radii.mean()) if self.radii.size else 0.0

    def contains(self, points: ArrayLike) -> np.ndarray:
        """Index of the cylinder that contains each point (periodic), −1 outside all of them.

        Parameters
        ----------
        points : array_like, shape (m, 2)
            Positions in µm, anywhere in the plane.

        Returns
        -------
        ndarray of int64, shape (m,)

        Examples
        --------
        >>> s = Substrate(10.0, [[1.0, 1.0]], [2.0], 0.04 * np.pi)
        >>> s.contains([[1.5, 1.0], [9.5, 1.0], [5.0, 5.0]]).tolist()
        [0, 0, -1]
        """
        p = real_finite_array(points, "points", allow_empty=True).reshape(-1, 2)
        grid = _CellList.build(self, margin=0.0)
        return _locate(np.mod(p, self.side), self.side, grid.n_grid, grid.start, grid.table, grid.ids)


def _gamma_radii(mean_radius: float, radius_cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if radius_cv == 0.0:
        return np.full(n, mean_radius)
    shape = 1.0 / radius_cv**2
    radii = rng.gamma(shape, mean_radius / shape, size=n)
    # The sample mean is set to the requested one so that atoms of a dictionary differ by their
    # parameters, not by the sampling error of a finite set of radii.
    return radii * (mean_radius / radii.mean())


@numba.njit(cache=True)
def _relax_overlaps(pos, radii, side, gap, max_sweeps):  # pragma: no cover - compiled
    """Sequential (Gauss–Seidel) removal of pairwise overlaps in a periodic cell, aiming at a
    separation of (1 + gap)(r_i + r_j); stops once no pair is closer than (1 + gap)(1 − gap/4)
    (r_i + r_j) and returns the largest remaining shortfall relative to the target separation."""
    n = radii.size
    worst = 0.0
    for _ in range(max_sweeps):
        worst = 0.0
        for i in range(n):
            for j in range(i + 1, n):
                dx = pos[j, 0] - pos[i, 0]
                dy = pos[j, 1] - pos[i, 1]
                dx -= side * np.rint(dx / side)
                dy -= side * np.rint(dy / side)
                need = (radii[i] + radii[j]) * (1.0 + gap)
                d2 = dx * dx + dy * dy
                if d2 >= need * need:
                    continue
                d = math.sqrt(d2)
                overlap = need - d
                worst = max(worst, overlap / need)
                if d < 1e-12 * need:
                    # Coincident centres: separate along a direction that depends only on the pair.
                    angle = 2.399963229728653 * (i * n + j)
                    dx, dy, d = math.cos(angle), math.sin(angle), 1.0
                # Each moves by a share of the overlap inversely proportional to its area, so that
                # small cylinders make way for large ones; the 1 % excess speeds up convergence.
                wi = radii[j] ** 2 / (radii[i] ** 2 + radii[j] ** 2)
                shift = 1.01 * overlap / d
                pos[i, 0] -= wi * shift * dx
                pos[i, 1] -= wi * shift * dy
                pos[j, 0] += (1.0 - wi) * shift * dx
                pos[j, 1] += (1.0 - wi) * shift * dy
        for i in range(n):
            pos[i, 0] = min(pos[i, 0] - side * math.floor(pos[i, 0] / side), side * (1.0 - 1e-15))
            pos[i, 1] = min(pos[i, 1] - side * math.floor(pos[i, 1] / side), side * (1.0 - 1e-15))
        if worst <= 0.25 * gap:
            break
    return worst


@numba.njit(cache=True)
def _shake(pos, radii, side, gap, n_sweeps, key):  # pragma: no cover - compiled
    """Metropolis moves of hard discs: each sweep tries one random displacement per cylinder and
    keeps it if the cylinder then overlaps none (separation ≥ (1 + gap)(r_i + r_j)); the move size
    adapts towards an acceptance rate of 40 %."""
    n = radii.size
    state = key
    size = 0.1 * radii.mean()
    for _ in range(n_sweeps):
        accepted = 0
        for i in range(n):
            state, z = _splitmix64(state)
            ax = np.float64(np.int64(z >> np.uint64(43))) / 2097152.0 - 0.5
            ay = np.float64(np.int64((z >> np.uint64(11)) & np.uint64(0x1FFFFF))) / 2097152.0 - 0.5
            x = pos[i, 0] + size * ax
            y = pos[i, 1] + size * ay
            free = True
            for j in range(n):
                if j == i:
                    continue
                dx = x - pos[j, 0]
                dy = y - pos[j, 1]
                dx -= side * np.rint(dx / side)
                dy -= side * np.rint(dy / side)
                need = (radii[i] + radii[j]) * (1.0 + gap)
                if dx * dx + dy * dy < need * need:
                    free = False
                    break
            if free:
                pos[i, 0] = min(x - side * math.floor(x / side), side * (1.0 - 1e-15))
                pos[i, 1] = min(y - side * math.floor(y / side), side * (1.0 - 1e-15))
                accepted += 1
        size = min(size * (1.1 if accepted > 0.4 * n else 1.0 / 1.1), 0.5 * side)


def pack_cylinders(mean_radius: float, density: float, *, radius_cv: float = DEFAULT_RADIUS_CV,
                   n_cylinders: int = DEFAULT_N_CYLINDERS, seed: int = 0,
                   shake_sweeps: int = DEFAULT_SHAKE_SWEEPS, max_sweeps: int = 20_000) -> Substrate:
    """Pack non-overlapping parallel cylinders in a periodic square cell at a given fibre density.

    ``n_cylinders`` radii are drawn from a gamma distribution of mean ``mean_radius`` and
    coefficient of variation ``radius_cv`` (then rescaled so that their sample mean is exactly
    ``mean_radius``), and the cell side is set so that the density is exactly the requested one,

    .. math::

        L = \\sqrt{\\frac{\\sum_i \\pi r_i^2}{f}} .

    The centres are placed uniformly at random and overlaps are removed by collective
    rearrangement: repeated sweeps over all pairs (with their nearest periodic images) push
    overlapping cylinders apart along their line of centres, the smaller one moving more, until
    every pair is separated by at least :math:`(1 + 5\\cdot10^{-7})(r_i + r_j)`. That leaves
    clusters of touching cylinders, whose chains would seal off parts of the extra-axonal space;
    ``shake_sweeps`` sweeps of random hard-disc moves (Metropolis, each move kept only if it
    creates no overlap) then loosen the packing towards an equilibrium arrangement of discs. This
    reaches the densities of white matter (f = 0.8 with the default radius spread; random close
    packing of discs is ≈ 0.84).

    Parameters
    ----------
    mean_radius : float
        Mean cylinder radius, µm (> 0).
    density : float
        Fibre density f in [0, 1): the area fraction of the cylinders. 0 gives an empty substrate
        (free diffusion) of side 10 µm.
    radius_cv : float, optional
        Coefficient of variation (standard deviation / mean) of the radii, in [0, 1]; 0 gives
        identical radii. Default :data:`DEFAULT_RADIUS_CV` = 0.1.
    n_cylinders : int, optional
        Number of cylinders in the cell (default :data:`DEFAULT_N_CYLINDERS` = 100).
    seed : int, optional
        Seed of the radii, the initial positions and the moves.
    shake_sweeps : int, optional
        Sweeps of random moves after the overlaps are removed (default 2000; 0 skips them).
    max_sweeps : int, optional
        Limit on the overlap-removal sweeps; a density not reached within it is an error.

    Returns
    -------
    Substrate

    Raises
    ------
    InputError
        Invalid arguments, or a density the algorithm cannot reach (the source is ``density``).

    Examples
    --------
    >>> s = pack_cylinders(1.0, 0.6, n_cylinders=20, seed=1)
    >>> s.n_cylinders, round(s.density, 6), round(float(np.pi * (s.radii**2).sum() / s.side**2), 6)
    (20, 0.6, 0.6)
    >>> pack_cylinders(1.0, 0.0).n_cylinders
    0
    """
    mean_radius = _positive(mean_radius, "mean_radius")
    density = _finite(density, "density")
    if not 0.0 <= density < 1.0:
        raise InputError("density", f"must be in [0, 1), got {density!r}")
    radius_cv = _finite(radius_cv, "radius_cv")
    if not 0.0 <= radius_cv <= 1.0:
        raise InputError("radius_cv", f"must be in [0, 1], got {radius_cv!r}")
    n_cylinders = _count(n_cylinders, "n_cylinders")
    max_sweeps = _count(max_sweeps, "max_sweeps")
    shake_sweeps = _count(shake_sweeps, "shake_sweeps", allow_zero=True)
    if density == 0.0:
        return Substrate(side=10.0, centres=np.zeros((0, 2)), radii=np.zeros(0), density=0.0)
    rng = np.random.default_rng(seed)
    radii = _gamma_radii(mean_radius, radius_cv, n_cylinders, rng)
    side = math.sqrt(math.pi * float((radii**2).sum()) / density)
    if 2.0 * radii.max() * (1.0 + _PACKING_GAP) >= side:
        raise InputError("n_cylinders", f"{n_cylinders} cylinder(s) at density {density} do not fit in a periodic "
                         "cell; use more cylinders")
    # Large cylinders first: the sweeps then move the small ones into the gaps.
    radii = np.sort(radii)[::-1].copy()
    centres = rng.uniform(0.0, side, size=(n_cylinders, 2))
    worst = _relax_overlaps(centres, radii, side, _PACKING_GAP, max_sweeps)
    if worst > 0.25 * _PACKING_GAP:
        raise InputError("density", f"{density} could not be reached by packing {n_cylinders} cylinders "
                         f"(radius CV {radius_cv}) in {max_sweeps} sweeps")
    if shake_sweeps:
        _shake(centres, radii, side, _PACKING_GAP, shake_sweeps, _keys(rng, 1)[0])
    achieved = math.pi * float((radii**2).sum()) / side**2
    return Substrate(side=side, centres=centres, radii=radii, density=achieved)


# ----------------------------------------------------------------------------------------------
# Cell list
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CellList:
    """Cylinder images (periodic copies) registered in the grid cells within reach of them.

    Image m is listed in every grid cell that intersects the square of half-side r + margin around
    its centre, so a walker in a cell finds every membrane that a path of length ≤ margin can hit.
    ``table`` rows are (x, y, r², r) of the images, ``ids`` the cylinder of each image.
    """

    n_grid: int
    start: np.ndarray  # (n_grid² + 1,) CSR offsets into table/ids
    table: np.ndarray  # (m, 4)
    ids: np.ndarray  # (m,)

    @classmethod
    def build(cls, substrate: Substrate, margin: float) -> _CellList:
        L = substrate.side
        if substrate.n_cylinders == 0:
            return cls(1, np.zeros(2, dtype=np.int64), np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
        # Cells of half a mean radius keep the candidate lists at about two cylinders when dense.
        n_grid = int(np.clip(math.floor(L / (0.5 * substrate.mean_radius)), 1, 1024))
        h = L / n_grid
        shifts = np.array([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)], dtype=np.float64) * L
        centres = (substrate.centres[:, None, :] + shifts[None, :, :]).reshape(-1, 2)
        radii = np.repeat(substrate.radii, 9)
        ids = np.repeat(np.arange(substrate.n_cylinders, dtype=np.int64), 9)
        reach = radii + margin
        lo = np.clip(np.floor((centres - reach[:, None]) / h).astype(np.int64), 0, n_grid)
        hi = np.clip(np.floor((centres + reach[:, None]) / h).astype(np.int64), -1, n_grid - 1)
        cells, owners = [], []
        for m in np.flatnonzero((hi >= lo).all(axis=1)):
            gx, gy = np.meshgrid(np.arange(lo[m, 0], hi[m, 0] + 1), np.arange(lo[m, 1], hi[m, 1] + 1),
                                 indexing="ij")
            cells.append((gx * n_grid + gy).ravel())
            owners.append(np.full(gx.size, m))
        cell = np.concatenate(cells)
        owner = np.concatenate(owners)
        order = np.argsort(cell, kind="stable")
        cell, owner = cell[order], owner[order]
        start = np.searchsorted(cell, np.arange(n_grid * n_grid + 1)).astype(np.int64)
        table = np.stack([centres[owner, 0], centres[owner, 1], radii[owner] ** 2, radii[owner]], axis=1)
        return cls(n_grid, start, np.ascontiguousarray(table), ids[owner].copy())


@numba.njit(cache=True)
def _locate(points, side, n_grid, start, table, ids):  # pragma: no cover - compiled
    """Cylinder containing each point of [0, L)² (distance to the axis < r), −1 if none."""
    out = np.full(points.shape[0], -1, dtype=np.int64)
    inv_h = n_grid / side
    for i in range(points.shape[0]):
        c = min(int(points[i, 0] * inv_h), n_grid - 1) * n_grid + min(int(points[i, 1] * inv_h), n_grid - 1)
        for m in range(start[c], start[c + 1]):
            dx = points[i, 0] - table[m, 0]
            dy = points[i, 1] - table[m, 1]
            if dx * dx + dy * dy < table[m, 2]:
                out[i] = ids[m]
                break
    return out


# ----------------------------------------------------------------------------------------------
# Walk kernels
# ----------------------------------------------------------------------------------------------


@numba.njit(parallel=True, cache=True)
def _walk_extra(start_pos, side, n_grid, start, table, ids, step, weights_t, keys, cos_table,
                sin_table):  # pragma: no cover - compiled
    """Walkers outside the cylinders; positions unwrapped (X, Y) and wrapped into the cell (px, py)."""
    n_walkers = start_pos.shape[0]
    n_times, n_timings = weights_t.shape
    n_steps = n_times - 1
    inv_h = n_grid / side
    integrals = np.zeros((n_timings, n_walkers, 2))
    final = np.empty((n_walkers, 2))
    for w in numba.prange(n_walkers):
        state = keys[w]
        z = np.uint64(0)
        X = start_pos[w, 0]
        Y = start_pos[w, 1]
        px = X - side * math.floor(X / side)
        py = Y - side * math.floor(Y / side)
        acc = np.zeros((n_timings, 2))
        for k in range(n_times):
            for j in range(n_timings):
                acc[j, 0] += weights_t[k, j] * X
                acc[j, 1] += weights_t[k, j] * Y
            if k == n_steps:
                break
            state, z, ux, uy = _step_direction(k, state, z, cos_table, sin_table)
            remaining = step
            last = -1
            for _ in range(_MAX_REFLECTIONS):
                # The cell list covers [0, L)²: wrap before every look-up, a step may leave the cell.
                if px < 0.0 or px >= side:
                    px -= side * math.floor(px / side)
                if py < 0.0 or py >= side:
                    py -= side * math.floor(py / side)
                c = min(int(px * inv_h), n_grid - 1) * n_grid + min(int(py * inv_h), n_grid - 1)
                t_hit = remaining
                hit = -1
                for m in range(start[c], start[c + 1]):
                    dx = px - table[m, 0]
                    dy = py - table[m, 1]
                    b = dx * ux + dy * uy
                    if b >= 0.0:  # moving away from this axis
                        continue
                    cc = dx * dx + dy * dy - table[m, 2]
                    disc = b * b - cc
                    # A convex obstacle cannot be hit twice in a row from outside.
                    if disc <= 0.0 or ids[m] == last:
                        continue
                    t = cc / (math.sqrt(disc) - b) if cc > 0.0 else 0.0
                    if t < t_hit:
                        t_hit = t
                        hit = m
                px += t_hit * ux
                py += t_hit * uy
                X += t_hit * ux
                Y += t_hit * uy
                if hit < 0:
                    break
                nx = px - table[hit, 0]
                ny = py - table[hit, 1]
                inv = 1.0 / math.sqrt(nx * nx + ny * ny)
                nx *= inv
                ny *= inv
                # Back onto the membrane, just outside it (rounding may have put the walker inside).
                rr = table[hit, 3] * (1.0 + _MEMBRANE_MARGIN)
                sx = table[hit, 0] + rr * nx - px
                sy = table[hit, 1] + rr * ny - py
                px += sx
                py += sy
                X += sx
                Y += sy
                d = ux * nx + uy * ny
                ux -= 2.0 * d * nx
                uy -= 2.0 * d * ny
                remaining -= t_hit
                last = ids[hit]
        for j in range(n_timings):
            integrals[j, w, 0] = acc[j, 0]
            integrals[j, w, 1] = acc[j, 1]
        final[w, 0] = X
        final[w, 1] = Y
    return integrals, final


@numba.njit(parallel=True, cache=True)
def _walk_intra(start_rel, radius, step, weights_t, keys, cos_table, sin_table):  # pragma: no cover
    """Walkers inside their own circle; positions relative to its centre (Σ w_k = 0 makes the
    integrals independent of the origin)."""
    n_walkers = start_rel.shape[0]
    n_times, n_timings = weights_t.shape
    n_steps = n_times - 1
    integrals = np.zeros((n_timings, n_walkers, 2))
    final = np.empty((n_walkers, 2))
    for w in numba.prange(n_walkers):
        state = keys[w]
        z = np.uint64(0)
        x = start_rel[w, 0]
        y = start_rel[w, 1]
        r = radius[w]
        r2 = r * r
        r_in = r * (1.0 - _MEMBRANE_MARGIN)
        acc = np.zeros((n_timings, 2))
        for k in range(n_times):
            for j in range(n_timings):
                acc[j, 0] += weights_t[k, j] * x
                acc[j, 1] += weights_t[k, j] * y
            if k == n_steps:
                break
            state, z, ux, uy = _step_direction(k, state, z, cos_table, sin_table)
            remaining = step
            for _ in range(_MAX_REFLECTIONS):
                b = x * ux + y * uy
                t_exit = math.sqrt(max(b * b + r2 - x * x - y * y, 0.0)) - b
                if t_exit >= remaining:
                    x += remaining * ux
                    y += remaining * uy
                    break
                x += t_exit * ux
                y += t_exit * uy
                inv = 1.0 / math.sqrt(x * x + y * y)
                nx = x * inv
                ny = y * inv
                x = r_in * nx
                y = r_in * ny
                d = ux * nx + uy * ny
                ux -= 2.0 * d * nx
                uy -= 2.0 * d * ny
                remaining -= t_exit
        for j in range(n_timings):
            integrals[j, w, 0] = acc[j, 0]
            integrals[j, w, 1] = acc[j, 1]
        final[w, 0] = x
        final[w, 1] = y
    return integrals, final


@numba.njit(parallel=True, cache=True)
def _mean_cos(projections, wavenumbers):  # pragma: no cover - compiled
    """mean(cos(k·p)) over all p for each k; each mean is summed in a fixed order, so the result
    does not depend on the number of threads."""
    out = np.empty(wavenumbers.size)
    m = projections.size
    for q in numba.prange(wavenumbers.size):
        k = wavenumbers[q]
        s = 0.0
        for i in range(m):
            s += math.cos(k * projections[i])
        out[q] = s / m
    return out


# ----------------------------------------------------------------------------------------------
# Sequence
# ----------------------------------------------------------------------------------------------


def _hat_integral(t: np.ndarray, nodes: np.ndarray, dt: float) -> np.ndarray:
    """∫_{-∞}^{t} φ_k(τ) dτ for the hat functions φ_k of the nodes (outer product over t, nodes)."""
    u = np.clip((t[:, None] - nodes[None, :]) / dt, -1.0, 1.0)
    return dt * np.where(u <= 0.0, 0.5 * (u + 1.0) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def pgse_weights(small_delta: ArrayLike, big_delta: ArrayLike, n_steps: int, duration: float | None = None
                 ) -> np.ndarray:
    """Quadrature weights of the phase integral of PGSE sequences on a uniform time grid.

    The walker position is interpolated linearly between the grid times :math:`t_k = k\\,
    \\mathrm{d}t` (k = 0 … n_steps, :math:`\\mathrm{d}t` = duration / n_steps), and the integral of
    :math:`s(t)` against that interpolant is computed exactly, pulse edges between grid times
    included:

    .. math::

        \\mathbf I = \\int s(t)\\, \\mathbf x(t)\\, \\mathrm{d}t = \\sum_k w_k \\mathbf x_k, \\qquad
        w_k = \\int s(t)\\, \\varphi_k(t)\\, \\mathrm{d}t,

    with :math:`\\varphi_k` the hat function of node k. The weights of each sequence sum to zero
    (:math:`\\int s = 0`), so the integral does not depend on the origin of positions.

    Parameters
    ----------
    small_delta, big_delta : array_like, shape (J,)
        Pulse duration δ > 0 and separation Δ ≥ δ of each timing, ms.
    n_steps : int
        Number of time steps.
    duration : float, optional
        Simulated time, ms, at least the longest Δ + δ (default: that).

    Returns
    -------
    ndarray, shape (J, n_steps + 1)
        Weights in ms.

    Examples
    --------
    >>> pgse_weights([10.0], [20.0], n_steps=6).round(3).tolist()
    [[2.5, 5.0, 2.5, 0.0, -2.5, -5.0, -2.5]]
    >>> w = pgse_weights([12.9], [21.8], n_steps=7)
    >>> round(float(w.sum()), 12), round(float(w[0, :4].sum()), 3)
    (0.0, 12.9)
    """
    small = real_finite_array(small_delta, "small_delta").ravel()
    big = real_finite_array(big_delta, "big_delta").ravel()
    if small.shape != big.shape:
        raise InputError("big_delta", f"has {big.size} values for {small.size} values of small_delta")
    if (small <= 0).any():
        raise InputError("small_delta", "must be > 0 ms")
    if (big < small).any():
        raise InputError("big_delta", "must be ≥ small_delta")
    n_steps = _count(n_steps, "n_steps")
    T = float((big + small).max())
    if duration is not None:
        duration = _positive(duration, "duration")
        if duration < T * (1.0 - 1e-12):
            raise InputError("duration", f"must cover the longest sequence ({T} ms), got {duration} ms")
        T = duration
    dt = T / n_steps
    nodes = dt * np.arange(n_steps + 1)
    edges = np.stack([np.zeros_like(small), small, big, big + small], axis=1)  # (J, 4)
    H = _hat_integral(edges.ravel(), nodes, dt).reshape(len(small), 4, n_steps + 1)
    return (H[:, 1] - H[:, 0]) - (H[:, 3] - H[:, 2])


def default_n_steps(substrate: Substrate, duration: float, diffusivity: float = _DIFFUSIVITY,
                    step_ratio: float = DEFAULT_STEP_RATIO) -> int:
    """Number of steps that makes the step length ``step_ratio`` mean radii.

    .. math::

        n = \\left\\lceil \\frac{4 D T}{(\\kappa\\, \\bar r)^2} \\right\\rceil
        \\quad\\text{clipped to } [\\mathrm{MIN\\_STEPS}, \\mathrm{MAX\\_STEPS}],

    so that :math:`\\ell = \\sqrt{4 D T / n} \\le \\kappa \\bar r` unless the cap applies (an empty
    substrate gets :data:`MIN_STEPS`). With the HCP timing (T = 34.7 ms), D = 2 µm²/ms and
    κ = 0.25, n runs from 1000 (r̄ ≥ 2.11 µm) to the cap 25 000 (r̄ ≤ 0.42 µm).

    Parameters
    ----------
    substrate : Substrate
    duration : float
        Simulated time T, ms.
    diffusivity : float, optional
        D, µm²/ms.
    step_ratio : float, optional
        κ, step length over mean radius (default :data:`DEFAULT_STEP_RATIO`).

    Returns
    -------
    int

    Examples
    --------
    >>> default_n_steps(pack_cylinders(0.5, 0.5, n_cylinders=10), 34.7)
    17767
    >>> default_n_steps(pack_cylinders(1.0, 0.0), 34.7)
    1000
    """
    if not isinstance(substrate, Substrate):
        raise InputError("substrate", f"must be a Substrate, got {type(substrate).__name__}")
    duration = _positive(duration, "duration")
    diffusivity = _positive(diffusivity, "diffusivity")
    step_ratio = _positive(step_ratio, "step_ratio")
    if substrate.n_cylinders == 0:
        return MIN_STEPS
    n = math.ceil(4.0 * diffusivity * duration / (step_ratio * substrate.mean_radius) ** 2)
    return int(min(max(n, MIN_STEPS), MAX_STEPS))


# ----------------------------------------------------------------------------------------------
# Walk and signals
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalkResult:
    """Walkers of one simulation: where they started and ended, where they live, their integrals.

    Attributes
    ----------
    start, final : ndarray, shape (n, 2)
        Unwrapped positions at t = 0 and after the last step, µm (intra-axonal walkers first).
    cylinder : ndarray of int64, shape (n,)
        Index of the cylinder of an intra-axonal walker, −1 for an extra-axonal one.
    integrals : ndarray, shape (J, n, 2)
        :math:`\\mathbf I = \\int s(t)\\,\\mathbf x(t)\\,\\mathrm{d}t` of each walker for each timing,
        µm·ms.
    step_length : float
        Step length, µm.
    """

    start: np.ndarray
    final: np.ndarray
    cylinder: np.ndarray
    integrals: np.ndarray
    step_length: float


def _extra_start(substrate: Substrate, grid: _CellList, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform in the space outside the cylinders (rejection sampling)."""
    L = substrate.side
    found: list[np.ndarray] = []
    count = 0
    outside_share = max(1.0 - substrate.density, 0.05)
    while count < n:
        trial = rng.uniform(0.0, L, size=(int((n - count) / outside_share * 1.1) + 16, 2))
        keep = trial[_locate(trial, L, grid.n_grid, grid.start, grid.table, grid.ids) < 0]
        found.append(keep)
        count += len(keep)
    return np.concatenate(found)[:n]


def _compartment_sizes(substrate: Substrate, n_walkers: int, compartment: str) -> tuple[int, int]:
    if compartment == "intra":
        return n_walkers, 0
    if compartment == "extra" or substrate.n_cylinders == 0:
        return 0, n_walkers
    n_intra = round(substrate.density * n_walkers)
    if n_walkers >= 2:  # both compartments need walkers to be weighted by their volume fractions
        n_intra = min(max(n_intra, 1), n_walkers - 1)
    return n_intra, n_walkers - n_intra


def random_walk(substrate: Substrate, n_walkers: int, n_steps: int, duration: float, *,
                diffusivity: float = _DIFFUSIVITY, compartment: str = "all", weights: ArrayLike | None = None,
                seed: int = 0) -> WalkResult:
    """Random walk of spins in the plane transverse to the cylinders of a substrate.

    Walkers start uniformly in the chosen compartment(s) and take ``n_steps`` steps of length
    :math:`\\ell = \\sqrt{4 D\\,\\mathrm{d}t}`, :math:`\\mathrm{d}t` = duration / n_steps, in
    uniformly random directions (a 2-D walk, whose mean squared displacement is :math:`4Dt`). A
    step that meets a membrane is reflected specularly at the exact intersection point and goes on
    for the rest of its length, as many times as needed. With ``compartment="all"`` the numbers of
    intra- and extra-axonal walkers are round(f·n) and n − round(f·n) (at least one each), and intra
    walkers are spread over the cylinders in proportion to their areas.

    Parameters
    ----------
    substrate : Substrate
    n_walkers : int
    n_steps : int
    duration : float
        Simulated time, ms.
    diffusivity : float, optional
        Free diffusivity D, µm²/ms (default 2.0).
    compartment : {"all", "intra", "extra"}, optional
        Where the walkers start (and stay).
    weights : array_like, shape (J, n_steps + 1), optional
        Quadrature weights of the phase integrals (:func:`pgse_weights`); none by default.
    seed : int, optional
        Seed of the starting positions and of the walkers' random streams.

    Returns
    -------
    WalkResult

    Raises
    ------
    InputError
        Invalid arguments, or "intra" for an empty substrate.

    Examples
    --------
    >>> s = pack_cylinders(1.0, 0.5, n_cylinders=10, radius_cv=0.0)
    >>> walk = random_walk(s, 200, 100, duration=10.0, compartment="intra")
    >>> centre = s.centres[walk.cylinder]
    >>> bool((np.hypot(*(walk.final - centre).T) < 1.0).all()), round(walk.step_length, 3)
    (True, 0.894)
    """
    if not isinstance(substrate, Substrate):
        raise InputError("substrate", f"must be a Substrate, got {type(substrate).__name__}")
    n_walkers = _count(n_walkers, "n_walkers")
    n_steps = _count(n_steps, "n_steps")
    duration = _positive(duration, "duration")
    diffusivity = _positive(diffusivity, "diffusivity")
    if compartment not in _COMPARTMENTS:
        raise InputError("compartment", f"must be one of {_COMPARTMENTS}, got {compartment!r}")
    if compartment == "intra" and substrate.n_cylinders == 0:
        raise InputError("compartment", "'intra' needs a substrate with cylinders")
    if weights is None:
        weights = np.zeros((0, n_steps + 1))
    weights = real_finite_array(weights, "weights", allow_empty=True)
    if weights.ndim != 2 or weights.shape[1] != n_steps + 1:
        raise InputError("weights", f"must have shape (J, n_steps + 1 = {n_steps + 1}), got {weights.shape}")
    weights_t = np.ascontiguousarray(weights.T)

    step = math.sqrt(4.0 * diffusivity * duration / n_steps)
    rng = np.random.default_rng(seed)
    n_intra, n_extra = _compartment_sizes(substrate, n_walkers, compartment)
    starts, finals, cylinders, integrals = [], [], [], []
    if n_intra:
        area = substrate.radii**2
        which = rng.choice(substrate.n_cylinders, size=n_intra, p=area / area.sum())
        radius = substrate.radii[which]
        rho = radius * np.sqrt(rng.uniform(0.0, 1.0, n_intra)) * (1.0 - _MEMBRANE_MARGIN)
        phi = rng.uniform(0.0, 2.0 * np.pi, n_intra)
        rel = np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=1)
        I, rel_final = _walk_intra(rel, radius, step, weights_t, _keys(rng, n_intra), _COS_TABLE, _SIN_TABLE)
        centre = substrate.centres[which]
        starts.append(centre + rel)
        finals.append(centre + rel_final)
        cylinders.append(which.astype(np.int64))
        integrals.append(I)
    if n_extra:
        grid = _CellList.build(substrate, margin=step)
        start_pos = _extra_start(substrate, grid, n_extra, rng)
        I, final = _walk_extra(start_pos, substrate.side, grid.n_grid, grid.start, grid.table, grid.ids, step,
                               weights_t, _keys(rng, n_extra), _COS_TABLE, _SIN_TABLE)
        starts.append(start_pos)
        finals.append(final)
        cylinders.append(np.full(n_extra, -1, dtype=np.int64))
        integrals.append(I)
    return WalkResult(start=np.concatenate(starts), final=np.concatenate(finals),
                      cylinder=np.concatenate(cylinders), integrals=np.concatenate(integrals, axis=1),
                      step_length=step)


def _check_shells(shells: ArrayLike) -> np.ndarray:
    shells = real_finite_array(shells, "shells")
    if shells.ndim != 2 or shells.shape[1] != 3:
        raise InputError("shells", f"must have shape (S, 3) [G mT/m, δ ms, Δ ms], got {shells.shape}")
    G, small, big = shells.T
    weighted = G > 0
    if (G < 0).any():
        raise InputError("shells", "gradient strengths G must be ≥ 0 mT/m")
    if (small[weighted] <= 0).any():
        raise InputError("shells", "δ must be > 0 ms where G > 0")
    if (big[weighted] < small[weighted]).any():
        raise InputError("shells", "Δ must be ≥ δ where G > 0")
    return shells


def simulate_fingerprint(substrate: Substrate, shells: ArrayLike, angles: ArrayLike, *,
                         diffusivity: float = _DIFFUSIVITY, n_walkers: int = DEFAULT_N_WALKERS,
                         n_steps: int | None = None, n_azimuths: int = DEFAULT_N_AZIMUTHS, seed: int = 0,
                         compartment: str = "all") -> np.ndarray:
    """Monte Carlo signal of a substrate for PGSE shells, as a function of the angle to the fibres.

    One random walk (:func:`random_walk`) over the longest sequence, :math:`\\mathrm{d}t =
    \\max(\\Delta+\\delta)/n_\\text{steps}`, stores for every distinct timing (δ, Δ) the integral
    :math:`\\mathbf I_w` of each walker (:func:`pgse_weights`). A gradient of amplitude G at angle θ
    to the fibre axis and azimuth ψ has the transverse component :math:`G\\sin\\theta\\,
    (\\cos\\psi, \\sin\\psi)`, and

    .. math::

        S(G, \\theta) = \\Big\\langle \\cos\\big(\\gamma G \\sin\\theta\\,
            (\\cos\\psi\\, I_x + \\sin\\psi\\, I_y)\\big) \\Big\\rangle_{w,\\,\\psi}
            \\; e^{-bD\\cos^2\\theta}, \\qquad b = \\gamma^2 G^2 \\delta^2 (\\Delta - \\delta/3),

    averaged over the walkers and ``n_azimuths`` azimuths ψ = πa/n_azimuths (which makes the
    fingerprint cylindrically symmetric). The axial factor is exact: motion along the cylinders is
    free and independent of the transverse motion. With ``compartment="all"`` the signal is
    :math:`f S_\\text{intra} + (1-f) S_\\text{extra}` with the exact volume fractions.

    Parameters
    ----------
    substrate : Substrate
        From :func:`pack_cylinders`.
    shells : array_like, shape (S, 3)
        Rows [G mT/m, δ ms, Δ ms]; G = 0 rows give 1 (their timing is ignored).
    angles : array_like, shape (T,)
        Angles θ between gradient and fibre axis, rad, in [0, π/2].
    diffusivity : float, optional
        Free diffusivity D inside and outside the cylinders, µm²/ms (default 2.0).
    n_walkers : int, optional
        Walkers (default :data:`DEFAULT_N_WALKERS` = 5000).
    n_steps : int, optional
        Time steps over the longest sequence; default :func:`default_n_steps` (step length 0.25
        mean radii, between 1000 and 25 000 steps).
    n_azimuths : int, optional
        Azimuths averaged (default :data:`DEFAULT_N_AZIMUTHS` = 8).
    seed : int, optional
        Seed of the walk; the result is identical for the same seed whatever the number of threads.
    compartment : {"all", "intra", "extra"}, optional
        Signal of the whole substrate or of one compartment alone (each normalised to 1 at G = 0).

    Returns
    -------
    ndarray, shape (S, T)
        Signal normalised to S(G = 0) = 1.

    Raises
    ------
    InputError
        Bad shapes, NaN/Inf, G < 0, δ ≤ 0, Δ < δ, angles outside [0, π/2], non-positive counts or
        diffusivity, an unknown compartment, or "intra" for an empty substrate.

    Examples
    --------
    Free diffusion (an empty substrate) at b = 1000 s/mm² across and along the fibres:

    >>> shells = [[0.0, 12.9, 21.8], [69.3, 12.9, 21.8]]
    >>> S = simulate_fingerprint(pack_cylinders(1.0, 0.0), shells, [np.pi / 2, 0.0],
    ...                          n_walkers=20000, n_steps=200)
    >>> S.round(2).tolist(), round(float(np.exp(-2.0)), 2)
    ([[1.0, 1.0], [0.14, 0.14]], 0.14)
    """
    if not isinstance(substrate, Substrate):
        raise InputError("substrate", f"must be a Substrate, got {type(substrate).__name__}")
    shells = _check_shells(shells)
    angles = real_finite_array(angles, "angles")
    if angles.ndim != 1:
        raise InputError("angles", f"must be one-dimensional, got shape {angles.shape}")
    if (angles < 0).any() or (angles > np.pi / 2 + 1e-12).any():
        raise InputError("angles", "must lie in [0, π/2] rad")
    diffusivity = _positive(diffusivity, "diffusivity")
    n_azimuths = _count(n_azimuths, "n_azimuths")
    n_walkers = _count(n_walkers, "n_walkers")
    if n_steps is not None:
        n_steps = _count(n_steps, "n_steps")
    if compartment not in _COMPARTMENTS:
        raise InputError("compartment", f"must be one of {_COMPARTMENTS}, got {compartment!r}")

    G, small, big = shells.T
    signals = np.ones((len(shells), len(angles)))
    rows = np.flatnonzero(G > 0)
    if not rows.size:
        return signals
    timings, timing_of = np.unique(shells[rows, 1:], axis=0, return_inverse=True)
    timing_of = np.asarray(timing_of).ravel()
    duration = float(timings.sum(axis=1).max())
    if n_steps is None:
        n_steps = default_n_steps(substrate, duration, diffusivity)
    weights = pgse_weights(timings[:, 0], timings[:, 1], n_steps, duration)
    walk = random_walk(substrate, n_walkers, n_steps, duration, diffusivity=diffusivity, compartment=compartment,
                       weights=weights, seed=seed)

    psi = np.pi * np.arange(n_azimuths) / n_azimuths
    azimuths = np.stack([np.cos(psi), np.sin(psi)])  # (2, A)
    intra = walk.cylinder >= 0
    groups = [(intra, substrate.density), (~intra, 1.0 - substrate.density)] if compartment == "all" else []
    groups = [(members, fraction) for members, fraction in groups if members.any()]
    if len(groups) < 2:  # one compartment only
        groups = [(np.ones(len(intra), dtype=bool), 1.0)]
    sin_theta = np.sin(angles)
    transverse = np.zeros((len(rows), len(angles)))
    for j in range(len(timings)):
        in_timing = timing_of == j
        # One wavenumber γ G sinθ per (shell, angle) of this timing.
        k = (GAMMA_UM * G[rows[in_timing], None] * sin_theta[None, :]).ravel()
        for members, fraction in groups:
            projections = np.ascontiguousarray((walk.integrals[j, members] @ azimuths).ravel())
            transverse[in_timing] += fraction * _mean_cos(projections, k).reshape(-1, len(angles))
    b = GAMMA_UM**2 * G[rows] ** 2 * small[rows] ** 2 * (big[rows] - small[rows] / 3.0)  # ms/µm²
    signals[rows] = transverse * np.exp(-b[:, None] * diffusivity * np.cos(angles)[None, :] ** 2)
    return signals


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def hcp_shells(bvals: ArrayLike = (0.0, 1000.0, 3000.0, 5000.0, 10000.0), small_delta: float = 12.9,
               big_delta: float = 21.8) -> np.ndarray:
    """Shells [G mT/m, δ ms, Δ ms] of the HCP MGH-USC protocol (G from b, δ/Δ = 12.9/21.8 ms).

    .. math::

        G = \\sqrt{\\frac{b}{\\gamma^2 \\delta^2 (\\Delta - \\delta/3)}}

    Parameters
    ----------
    bvals : array_like, shape (S,)
        b-values, s/mm² (≥ 0).
    small_delta, big_delta : float
        Pulse duration and separation, ms.

    Returns
    -------
    ndarray, shape (S, 3)

    Examples
    --------
    >>> hcp_shells()[:, 0].round(1).tolist()
    [0.0, 69.3, 120.0, 154.9, 219.0]
    """
    b = real_finite_array(bvals, "bvals").ravel()
    if (b < 0).any():
        raise InputError("bvals", "must be ≥ 0 s/mm²")
    small_delta = _positive(small_delta, "small_delta")
    big_delta = _positive(big_delta, "big_delta")
    if big_delta < small_delta:
        raise InputError("big_delta", "must be ≥ small_delta")
    G = np.sqrt(b * 1e-3 / (GAMMA_UM**2 * small_delta**2 * (big_delta - small_delta / 3.0)))
    return np.stack([G, np.full_like(G, small_delta), np.full_like(G, big_delta)], axis=1)


def validate(*, n_walkers: int = 500_000, cylinder_walkers: int = 20_000, n_steps: int | None = None,
             n_angles: int = 19, free_max_b: float = 5000.0, free_signal_floor: float = 0.1,
             cylinder_radii: ArrayLike = (1.0, 2.0, 3.0), diffusivity: float = _DIFFUSIVITY, seed: int = 0) -> dict:
    """Accuracy of the simulator against closed forms, on the shells of the HCP MGH-USC protocol.

    * Free diffusion (empty substrate, ``n_walkers`` walkers): ``free_rel_err`` is the largest
      relative deviation :math:`|S - e^{-bD}|/e^{-bD}` over the shells with b ≤ ``free_max_b``
      and the angle grid, among the measurements whose exact signal is at least
      ``free_signal_floor``. Below it the statistical error of any Monte Carlo estimate, about
      :math:`0.3/\\sqrt{n}` in absolute terms, dominates the relative error (at b = 5000 s/mm²
      across the fibres :math:`e^{-bD} = 4.5\\cdot10^{-5}`, and 1 % of it would take ~10¹²
      walkers); ``free_abs_err`` is the largest absolute deviation over all shells with
      b ≤ ``free_max_b`` and all angles.
    * Restricted diffusion (``cylinder_walkers`` intra-axonal walkers, identical radii):
      ``cylinder_rel_err`` is the largest relative deviation of the intra-cylinder signal over all
      shells and angles from the Van Gelderen Gaussian-phase formula
      (:func:`bioinverse.dmri.axons.cylinder_perpendicular_signal` at G sinθ, times the exact
      :math:`e^{-bD\\cos^2\\theta}`), over ``cylinder_radii``; ``cylinder_attenuation_rel_err`` is
      the largest relative deviation of the attenuation 1 − S across the fibres where the formula
      gives 1 − S ≥ 0.05.

    Parameters
    ----------
    n_walkers, cylinder_walkers : int
        Walkers of the free and of each restricted simulation.
    n_steps : int, optional
        Steps of every simulation (default :func:`default_n_steps`).
    n_angles : int
        Angles on [0, π/2].
    free_max_b, free_signal_floor : float
        Range of the free-diffusion check (s/mm², signal).
    cylinder_radii : array_like
        Radii of the restricted checks, µm.
    diffusivity : float
        µm²/ms.
    seed : int

    Returns
    -------
    dict
        ``free_rel_err``, ``free_abs_err``, ``cylinder_rel_err``, ``cylinder_attenuation_rel_err``
        (floats) and the settings used.

    Examples
    --------
    >>> errors = validate(n_walkers=20000, cylinder_walkers=500, n_steps=300, n_angles=3,
    ...                   cylinder_radii=[2.0])
    >>> errors["free_rel_err"] < 0.1, errors["cylinder_rel_err"] < 0.02
    (True, True)
    """
    from bioinverse.dmri.axons import cylinder_perpendicular_signal

    free_max_b = _positive(free_max_b, "free_max_b")
    free_signal_floor = _positive(free_signal_floor, "free_signal_floor")
    radii = real_finite_array(cylinder_radii, "cylinder_radii").ravel()
    if (radii <= 0).any():
        raise InputError("cylinder_radii", "must be > 0 µm")
    shells = hcp_shells()
    G, small, big = shells.T
    b = GAMMA_UM**2 * G**2 * small**2 * (big - small / 3.0)  # ms/µm²
    angles = np.linspace(0.0, np.pi / 2, _count(n_angles, "n_angles"))
    common = {"n_steps": n_steps, "diffusivity": diffusivity, "seed": seed}

    free = simulate_fingerprint(pack_cylinders(1.0, 0.0), shells, angles, n_walkers=n_walkers, **common)
    exact = np.exp(-b[:, None] * diffusivity) * np.ones_like(angles)
    in_range = np.broadcast_to((b * 1e3 <= free_max_b)[:, None], exact.shape)
    measurable = in_range & (exact >= free_signal_floor)
    free_rel = float((np.abs(free - exact) / exact)[measurable].max())
    free_abs = float(np.abs(free - exact)[in_range].max())

    cylinder_rel, attenuation_rel = 0.0, 0.0
    across = np.argmax(angles)
    for radius in radii:
        substrate = pack_cylinders(float(radius), 0.5, radius_cv=0.0, n_cylinders=4, seed=seed)
        mc = simulate_fingerprint(substrate, shells, angles, n_walkers=cylinder_walkers, compartment="intra",
                                  **common)
        vg = cylinder_perpendicular_signal(G[:, None] * np.sin(angles), small[:, None], big[:, None], radius,
                                           diffusivity) * np.exp(-b[:, None] * diffusivity * np.cos(angles) ** 2)
        cylinder_rel = max(cylinder_rel, float((np.abs(mc - vg) / vg).max()))
        attenuated = 1.0 - vg[:, across] >= 0.05
        if attenuated.any():
            deviation = np.abs(mc[attenuated, across] - vg[attenuated, across]) / (1.0 - vg[attenuated, across])
            attenuation_rel = max(attenuation_rel, float(deviation.max()))
    return {"free_rel_err": free_rel, "free_abs_err": free_abs, "cylinder_rel_err": cylinder_rel,
                "cylinder_attenuation_rel_err": attenuation_rel, "n_walkers": n_walkers,
                "cylinder_walkers": cylinder_walkers, "n_steps": n_steps, "n_angles": len(angles), "free_max_b": free_max_b,
                "free_signal_floor": free_signal_floor, "cylinder_radii": radii.tolist(), "diffusivity": diffusivity,
                "seed": seed}


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(name, f"must be a finite number, got {value!r}")
    return v


def _positive(value, name: str) -> float:
    v = _finite(value, name)
    if v <= 0:
        raise InputError(name, f"must be > 0, got {value!r}")
    return v


def _count(value, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise InputError(name, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return int(value)
