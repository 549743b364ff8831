"""Diffusion acquisition schemes: gradient directions, multi-shell protocols, q-space subsampling.

The protocols are those of Golkov et al., "q-Space deep learning: twelve-fold shorter and
model-free diffusion MRI scans", IEEE TMI 35(5):1344–1351, 2016, §II-D (five-shell and three-shell
healthy-volunteer data) and the two-shell NODDI protocol of Zhang et al., "NODDI: practical in vivo
neurite orientation dispersion and density imaging of the human brain", NeuroImage 61:1000–1016,
2012 (the 99-DWI protocol of Golkov et al., Table II). The directions of each shell are spread by
electrostatic repulsion (Jones, Horsfield & Simmons, MRM 42:515–525, 1999); the exact direction
sets of the original scans are not published, so these are equivalents, not copies.

q-DL learns from a fixed subset α of the measurements (the "pseudorandom subsampling multi-index"
of Golkov et al., §II-C1): :func:`subsample_pattern` draws it reproducibly from a seed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from bioinverse.dmri.io import GradientTable
from bioinverse.errors import InputError

__all__ = [
    "PROTOCOLS",
    "electrostatic_directions",
    "five_shell_protocol",
    "multi_shell_protocol",
    "noddi_protocol",
    "subsample",
    "subsample_pattern",
    "three_shell_protocol",
]

#: Echo time of the five-shell and three-shell acquisitions (Golkov et al. 2016, §II-D1–2), ms.
_GOLKOV_ECHO_TIME_MS = 80.7


def _count(value: int, name: str, minimum: int) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise InputError(name, f"must be an integer, got {value!r}") from None
    if n < minimum:
        raise InputError(name, f"must be at least {minimum}, got {n}")
    return n


def _repulsion(u: np.ndarray, antipodal: bool) -> tuple[float, np.ndarray]:
    """Coulomb energy of the unit vectors ``u`` (n, 3) and its negative gradient, tangent to the sphere."""
    cos = u @ u.T
    energy = 0.0
    weights = np.zeros_like(cos)
    # With |u_i ∓ u_j|² = 2 ∓ 2 u_i·u_j the pairwise terms need only the Gram matrix; the
    # self-pairs get an infinite distance so they drop out of both sums.
    for sign in (-1.0, 1.0) if antipodal else (-1.0,):
        dist2 = 2.0 + 2.0 * sign * cos
        np.fill_diagonal(dist2, np.inf)
        np.maximum(dist2, 1e-12, out=dist2)
        inv = 1.0 / np.sqrt(dist2)
        energy += 0.5 * float(inv.sum())
        weights += sign * inv**3
    force = weights @ u
    force -= np.sum(force * u, axis=1, keepdims=True) * u
    return energy, force


def electrostatic_directions(
    n: int, seed: int = 0, antipodal: bool = True, iterations: int = 2000, tolerance: float = 1e-10
) -> np.ndarray:
    """Unit gradient directions spread over the sphere by electrostatic repulsion.

    Minimises the Coulomb energy of ``n`` unit charges (Jones et al., MRM 1999); with
    ``antipodal=True`` each direction also repels the others' antipodes, because ``g`` and ``-g``
    measure the same diffusion signal:

    .. math::

        E = \\sum_{i<j} \\frac{1}{\\lVert u_i - u_j \\rVert} + \\frac{1}{\\lVert u_i + u_j \\rVert}

    by projected gradient descent on the sphere (step along the tangential force, renormalise),
    from a seeded random start, with a step that grows after each accepted move and halves after
    each rejected one. Stops when the relative energy decrease falls below ``tolerance`` or after
    ``iterations`` steps.

    Parameters
    ----------
    n : int
        Number of directions, ≥ 1.
    seed : int
        Seed of the random start; the result is deterministic for a seed.
    antipodal : bool
        Treat ``u`` and ``-u`` as the same direction (diffusion MRI). The directions are then
        returned in the upper hemisphere (z ≥ 0).
    iterations : int
        Maximum number of descent steps.
    tolerance : float
        Relative energy decrease at which to stop.

    Returns
    -------
    ndarray, shape (n, 3)
        Unit vectors.

    Examples
    --------
    >>> u = electrostatic_directions(6)
    >>> cos = np.abs(u @ u.T) - 2 * np.eye(6)
    >>> round(float(np.degrees(np.arccos(cos.max()))), 1)  # icosahedron: the optimum for 6
    63.4
    """
    n = _count(n, "n", 1)
    iterations = _count(iterations, "iterations", 0)
    seed = _count(seed, "seed", 0)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise InputError("tolerance", f"must be a non-negative number, got {tolerance!r}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    energy, force = _repulsion(u, antipodal)
    step = 0.1 / np.sqrt(n)  # about a tenth of the typical spacing between directions
    for _ in range(iterations):
        largest = float(np.sqrt(np.max(np.sum(force * force, axis=1))))
        if largest == 0.0:
            break
        candidate = u + (step / largest) * force
        candidate /= np.linalg.norm(candidate, axis=1, keepdims=True)
        new_energy, new_force = _repulsion(candidate, antipodal)
        if new_energy < energy:
            converged = energy - new_energy < tolerance * energy
            u, energy, force = candidate, new_energy, new_force
            step *= 1.2
            if converged:
                break
        else:
            step *= 0.5
            if step < 1e-12:
                break
    if antipodal:
        # Fold onto z ≥ 0; on the equator use the first nonzero of y, x to pick a side.
        key = np.where(u[:, 2] != 0, u[:, 2], np.where(u[:, 1] != 0, u[:, 1], u[:, 0]))
        u = np.where(key[:, None] < 0, -u, u)
    return u


def multi_shell_protocol(
    shells: Sequence[tuple[float, int]],
    n_b0: int,
    seed: int = 0,
    interleave: bool = True,
    *,
    small_delta: float | None = None,
    big_delta: float | None = None,
    echo_time: float | None = None,
) -> GradientTable:
    """A multi-shell gradient table: electrostatic directions on each shell plus b = 0 volumes.

    Each shell gets its own electrostatic set (its own seed, derived from ``seed`` and the shell's
    position), so different shells do not repeat each other's directions. The diffusion-weighted
    volumes follow shell by shell in the given order. With ``interleave`` one b = 0 volume comes
    first and the others are spread evenly through the series, as scanners do to track signal
    drift; otherwise all b = 0 volumes come first.

    Parameters
    ----------
    shells : sequence of (b, count)
        b-value in s/mm² (> 50) and number of directions (≥ 1) of each shell.
    n_b0 : int
        Number of b = 0 volumes, ≥ 0.
    seed : int
        Seed of the direction sets.
    interleave : bool
        Spread the b = 0 volumes through the series.
    small_delta, big_delta, echo_time : float, optional
        Timings δ, Δ, TE in ms stored in the table.

    Returns
    -------
    GradientTable
        ``n_b0 + Σ count`` volumes.

    Examples
    --------
    >>> gtab = multi_shell_protocol([(1000, 6), (2000, 6)], n_b0=3)
    >>> gtab.bvals.astype(int).tolist()
    [0, 1000, 1000, 1000, 1000, 0, 1000, 1000, 2000, 2000, 0, 2000, 2000, 2000, 2000]
    >>> gtab.shells()
    [(0.0, 3), (1000.0, 6), (2000.0, 6)]
    """
    try:
        pairs = [(float(b), count) for b, count in shells]
    except (TypeError, ValueError):
        raise InputError("shells", "must be a sequence of (b-value, number of directions) pairs") from None
    if not pairs:
        raise InputError("shells", "needs at least one shell")
    parsed = [(b, _count(count, "shells", 1)) for b, count in pairs]
    for b, _ in parsed:
        if not (np.isfinite(b) and b > 50.0):
            raise InputError("shells", f"b-values must be finite and above 50 s/mm², got {b:g}")
    n_b0 = _count(n_b0, "n_b0", 0)
    seed = _count(seed, "seed", 0)
    shell_seeds = np.random.SeedSequence(seed).generate_state(len(parsed))
    bvals = np.concatenate([np.full(count, b) for b, count in parsed])
    bvecs = np.concatenate(
        [
            electrostatic_directions(count, seed=int(s))
            for (_, count), s in zip(parsed, shell_seeds, strict=True)
        ]
    )
    n_dw = bvals.size
    if interleave and n_b0 > 1:
        # The k-th of the remaining b0s goes before diffusion-weighted volume round(k·n_dw/n_b0).
        positions = np.r_[0, np.round(np.arange(1, n_b0) * n_dw / n_b0).astype(int)]
    else:
        positions = np.zeros(n_b0, dtype=int)
    bvals = np.insert(bvals, positions, 0.0)
    bvecs = np.insert(bvecs, positions, 0.0, axis=0)
    return GradientTable(bvals, bvecs, small_delta=small_delta, big_delta=big_delta, echo_time=echo_time)


def five_shell_protocol(seed: int = 0) -> GradientTable:
    """The five-shell scheme of Golkov et al. 2016, §II-D1: 158 volumes.

    30 directions on each of b = 600, 1200, 1800, 2400, 3000 s/mm² and 8 b = 0 volumes,
    TE = 80.7 ms.

    Examples
    --------
    >>> gtab = five_shell_protocol()
    >>> len(gtab), gtab.shells()[0], gtab.echo_time
    (158, (0.0, 8), 80.7)
    """
    return multi_shell_protocol(
        [(600.0, 30), (1200.0, 30), (1800.0, 30), (2400.0, 30), (3000.0, 30)],
        n_b0=8,
        seed=seed,
        echo_time=_GOLKOV_ECHO_TIME_MS,
    )


def three_shell_protocol(seed: int = 0) -> GradientTable:
    """The three-shell DKI/NODDI scheme of Golkov et al. 2016, §II-D2: 148 volumes.

    25, 40 and 75 directions at b = 750, 1070, 3000 s/mm² and 8 b = 0 volumes; acquisition
    parameters as for the five-shell data (TE = 80.7 ms).

    Examples
    --------
    >>> gtab = three_shell_protocol()
    >>> len(gtab), gtab.shells()
    (148, [(0.0, 8), (750.0, 25), (1070.0, 40), (3000.0, 75)])
    """
    return multi_shell_protocol(
        [(750.0, 25), (1070.0, 40), (3000.0, 75)], n_b0=8, seed=seed, echo_time=_GOLKOV_ECHO_TIME_MS
    )


def noddi_protocol(seed: int = 0) -> GradientTable:
    """The two-shell NODDI scheme of Zhang et al. 2012: 99 volumes.

    9 b = 0 volumes, 30 directions at b = 711 s/mm² and 60 at b = 2855 s/mm² (the 99-DWI standard
    NODDI protocol of Golkov et al. 2016, Table II). Timings are left unset.

    Examples
    --------
    >>> gtab = noddi_protocol()
    >>> len(gtab), gtab.shells()
    (99, [(0.0, 9), (711.0, 30), (2855.0, 60)])
    """
    return multi_shell_protocol([(711.0, 30), (2855.0, 60)], n_b0=9, seed=seed)


#: Named protocols for the command line: name → builder taking ``seed``.
PROTOCOLS: dict[str, Callable[..., GradientTable]] = {
    "five-shell": five_shell_protocol,
    "three-shell": three_shell_protocol,
    "noddi": noddi_protocol,
}


def _shell_labels(bvals: np.ndarray, tolerance: float = 100.0) -> np.ndarray:
    """Shell number of each b-value, grouped as :meth:`GradientTable.shells` groups them."""
    order = np.argsort(bvals, kind="stable")
    labels = np.empty(bvals.size, dtype=np.int64)
    label, first = -1, -np.inf
    for i in order:
        if bvals[i] - first > tolerance:
            label, first = label + 1, bvals[i]
        labels[i] = label
    return labels


def subsample_pattern(
    gtab: GradientTable, n_volumes: int, seed: int = 0, stratified: bool = False
) -> np.ndarray:
    """Pseudorandom subsampling multi-index α of Golkov et al. 2016 (§II-C1).

    α holds exactly one b = 0 volume — the first of the table — and ``n_volumes − 1``
    diffusion-weighted volumes drawn without replacement by a generator seeded with ``seed``, so
    training and test scans are subsampled identically. With ``stratified`` the diffusion-weighted
    draws are split between shells in proportion to the shells' sizes (largest-remainder
    rounding), which keeps every shell represented in tiny subsets; the source draws uniformly
    (the default).

    Parameters
    ----------
    gtab : GradientTable
        The full scheme (must contain a b = 0 volume).
    n_volumes : int
        :math:`|\\alpha|`, from 2 to (number of diffusion-weighted volumes + 1).
    seed : int
        Seed of the draw.
    stratified : bool
        Draw from shells in proportion to their size.

    Returns
    -------
    ndarray of int, shape (n_volumes,)
        Sorted volume indices into ``gtab``.

    Examples
    --------
    >>> gtab = noddi_protocol()
    >>> alpha = subsample_pattern(gtab, 8, seed=1)
    >>> len(alpha), int(gtab.b0s_mask[alpha].sum()), float(gtab.bvals[alpha[0]])
    (8, 1, 0.0)
    >>> bool(np.array_equal(alpha, subsample_pattern(gtab, 8, seed=1)))
    True
    """
    if not isinstance(gtab, GradientTable):
        raise InputError("gtab", f"must be a GradientTable, got {type(gtab).__name__}")
    seed = _count(seed, "seed", 0)
    b0s = np.flatnonzero(gtab.b0s_mask)
    weighted = np.flatnonzero(~gtab.b0s_mask)
    if b0s.size == 0:
        raise InputError("gtab", "has no b=0 volume, which a subsampling pattern needs")
    n_volumes = _count(n_volumes, "n_volumes", 2)
    if n_volumes > weighted.size + 1:
        raise InputError(
            "n_volumes",
            f"must be at most {weighted.size + 1} (one b=0 plus the {weighted.size} diffusion-weighted volumes), "
            f"got {n_volumes}",
        )
    rng = np.random.default_rng(seed)
    wanted = n_volumes - 1
    if not stratified:
        picked = rng.choice(weighted, size=wanted, replace=False)
    else:
        labels = _shell_labels(gtab.bvals[weighted])
        sizes = np.bincount(labels)
        quota = wanted * sizes / sizes.sum()
        counts = np.floor(quota).astype(np.int64)
        remainders = quota - counts
        # Largest remainders first; ties go to the earlier (lower-b) shell.
        extra = np.argsort(-remainders, kind="stable")[: wanted - int(counts.sum())]
        counts[extra] += 1
        picked = np.concatenate(
            [rng.choice(weighted[labels == s], size=int(c), replace=False) for s, c in enumerate(counts)]
        )
    return np.sort(np.r_[b0s[0], picked]).astype(np.int64)


def subsample(gtab: GradientTable, data: ArrayLike, pattern: ArrayLike) -> tuple[GradientTable, np.ndarray]:
    """Keep the measurements ``pattern`` of a table and of its signals.

    Parameters
    ----------
    gtab : GradientTable
        ``n`` measurements.
    data : array_like, shape (..., n)
        Signals, measurement axis last.
    pattern : array_like of int, shape (m,)
        Indices, e.g. from :func:`subsample_pattern`.

    Returns
    -------
    GradientTable
        ``gtab.subset(pattern)``.
    ndarray, shape (..., m)
        ``data[..., pattern]``.

    Examples
    --------
    >>> gtab = noddi_protocol()
    >>> sub, signals = subsample(gtab, np.ones((4, len(gtab))), subsample_pattern(gtab, 8))
    >>> len(sub), signals.shape
    (8, (4, 8))
    """
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[-1] != len(gtab):
        raise InputError("data", f"last axis must have {len(gtab)} measurements, got shape {data.shape}")
    sub = gtab.subset(pattern)
    index = (
        np.flatnonzero(pattern) if np.asarray(pattern).dtype == bool else np.asarray(pattern, dtype=np.int64)
    )
    return sub, data[..., index]
