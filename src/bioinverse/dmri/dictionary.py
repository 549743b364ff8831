"""Dictionaries of fingerprints: signals of one axon population over a grid of (radius, density).

Fingerprinting and the hybrid estimator (Rensonnet et al., ICML IMLH 2021, Sec. 3.2) decompose a
voxel's signal on the responses of single populations of parallel axons, one sub-dictionary per
population orientation. A population is cylindrically symmetric, so its response to a measurement
depends on the direction only through the angle θ between the gradient and the fibre axis (and not
on the sign of the axis): a fingerprint is stored once per *shell* (G, δ, Δ) as a function of
θ ∈ [0, π/2] on a uniform grid, and :meth:`FingerprintDictionary.atoms` rotates it to any
orientation by linear interpolation in θ — exactly on the grid.

Fingerprints come from the analytic model (:mod:`bioinverse.dmri.axons`, well under a second for
the default 782 atoms) or from the Monte Carlo simulator (:mod:`bioinverse.dmri.montecarlo`, one
substrate per atom, with a progress bar and a resumable on-disk cache).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.dmri.axons import DIFFUSIVITY, axon_population_signal
from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError
from bioinverse.io import atomic_open

__all__ = ["FingerprintDictionary", "build_dictionary", "default_grid"]

GENERATORS = ("analytic", "montecarlo")
_FORMAT = "bioinverse.dmri.dictionary"
_FORMAT_VERSION = 1
# Two shells are the same acquisition when G, δ and Δ agree to this relative tolerance (scheme
# files round-trip through T/m and s, which perturbs the last digits).
_SHELL_RTOL = 1e-6
_SHELL_ATOL = 1e-9
# A Monte Carlo build writes its cache after this many new atoms, or this many seconds.
_CHECKPOINT_ATOMS = 8
_CHECKPOINT_SECONDS = 60.0


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update((np.round(np.asarray(a, dtype=np.float64), 9) + 0.0).astype("<f8").tobytes())
    return h.hexdigest()


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.flags.writeable = False
    return a


def _jsonable(settings: Any) -> dict:
    if not isinstance(settings, dict):
        raise InputError("settings", f"must be a dict, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings, allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise InputError("settings", f"must be JSON-serialisable ({exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


@dataclass(frozen=True, eq=False)
class FingerprintDictionary:
    """Fingerprints of single axon populations, as functions of the gradient–axis angle per shell.

    Atom j is a population of parallel axons of radius ``radius[j]`` at fibre density
    ``density[j]``; ``signals[j, s, t]`` is its normalised signal (1 without diffusion weighting)
    for a measurement of shell ``shells[s]`` whose gradient makes the angle ``angles[t]`` with the
    fibre axis. Arrays are copied to read-only float64 on construction.

    Attributes
    ----------
    radius : ndarray, shape (N,)
        Axon radii, µm.
    density : ndarray, shape (N,)
        Fibre densities f in [0, 1].
    shells : ndarray, shape (S, 3)
        Rows ``[G mT/m, δ ms, Δ ms]``.
    angles : ndarray, shape (T,)
        Uniform grid on [0, π/2], rad, T ≥ 2.
    signals : ndarray, shape (N, S, T)
        Fingerprints.
    generator : str
        ``"analytic"`` or ``"montecarlo"``.
    settings : dict
        What else determined the signals (diffusivity µm²/ms, walkers, steps, seed, …); JSON.
    build_seconds : float
        Wall time spent computing the fingerprints, summed over the runs of a resumed build (s).

    Raises
    ------
    InputError
        Inconsistent shapes, NaN/Inf, angles that are not a uniform grid on [0, π/2], an unknown
        generator or settings that are not JSON-serialisable.

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.pgse import PGSEProtocol
    >>> p = PGSEProtocol([[0, 0, 0], [1, 0, 0], [0, 0, 1]], [0.0, 70.0, 70.0], 12.9, 21.8, 57.0)
    >>> d = build_dictionary(p, radius=[1.0, 2.0], density=[0.5, 0.5], n_angles=91, progress=False)
    >>> d.n_atoms, d.signals.shape
    (2, (2, 2, 91))
    >>> d.atoms(p, [[0.0, 0.0, 1.0]]).round(3).tolist()  # fibres along z: x is across, z along
    [[[1.0, 1.0], [0.68, 0.678], [0.13, 0.13]]]
    """

    radius: np.ndarray
    density: np.ndarray
    shells: np.ndarray
    angles: np.ndarray
    signals: np.ndarray
    generator: str
    settings: dict = field(default_factory=dict)
    build_seconds: float = 0.0

    def __post_init__(self) -> None:
        radius = real_finite_array(self.radius, "radius")
        density = real_finite_array(self.density, "density")
        shells = real_finite_array(self.shells, "shells")
        angles = real_finite_array(self.angles, "angles")
        signals = real_finite_array(self.signals, "signals")
        if radius.ndim != 1 or density.shape != radius.shape:
            raise InputError("radius, density", f"must be 1-D of the same length, got {radius.shape} and "
                                                f"{density.shape}")
        if (radius < 0).any():
            raise InputError("radius", "must be ≥ 0 µm")
        if ((density < 0) | (density > 1)).any():
            raise InputError("density", "must lie in [0, 1]")
        if shells.ndim != 2 or shells.shape[1] != 3:
            raise InputError("shells", f"must have shape (S, 3) [G, δ, Δ], got {shells.shape}")
        _check_angle_grid(angles)
        expected = (radius.size, shells.shape[0], angles.size)
        if signals.shape != expected:
            raise InputError("signals", f"must have shape (N, S, T) = {expected}, got {signals.shape}")
        if self.generator not in GENERATORS:
            raise InputError("generator", f"must be one of {', '.join(GENERATORS)}, got {self.generator!r}")
        for name, value in (("radius", radius), ("density", density), ("shells", shells), ("angles", angles),
                            ("signals", signals)):
            object.__setattr__(self, name, _readonly(value))
        object.__setattr__(self, "settings", _jsonable(self.settings))
        object.__setattr__(self, "build_seconds", float(self.build_seconds))

    @property
    def n_atoms(self) -> int:
        """Number of atoms N."""
        return int(self.radius.size)

    def metadata(self) -> dict:
        """What identifies the dictionary: format, generator, settings and digests of shells and grid."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "generator": self.generator,
            "settings": self.settings,
            "shells_digest": _digest(self.shells),
            "grid_digest": _digest(self.radius, self.density),
            "n_atoms": self.n_atoms,
            "n_angles": int(self.angles.size),
            "shells": self.shells.tolist(),
        }

    # ------------------------------------------------------------------ rotation

    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows (s·T + t) of values and of slopes to the next angle, plus a final row of ones (b0)."""
        n, s, t = self.signals.shape
        values = np.ones((s * t + 1, n))
        values[:-1] = self.signals.transpose(1, 2, 0).reshape(s * t, n)
        slopes = np.zeros((s, t, n))
        slopes[:, :-1] = np.diff(self.signals, axis=2).transpose(1, 2, 0)
        return values, np.concatenate([slopes.reshape(s * t, n), np.zeros((1, n))])

    def shell_index(self, protocol: PGSEProtocol) -> np.ndarray:
        """Row of :attr:`shells` of every measurement of ``protocol``; −1 for G = 0.

        Raises
        ------
        InputError
            (source ``"protocol"``) a diffusion-weighted shell of the protocol is not in the
            dictionary.
        """
        if not isinstance(protocol, PGSEProtocol):
            raise InputError("protocol", f"must be a PGSEProtocol, got {type(protocol).__name__}")
        protocol_shells, shell_of = protocol.shell_table()
        match = _match_shells(protocol_shells, self.shells)
        weighted = protocol_shells[:, 0] > 0
        missing = weighted & (match < 0)
        if missing.any():
            G, small, big = protocol_shells[np.flatnonzero(missing)[0]]
            raise InputError("protocol", f"shell G = {G:g} mT/m, δ = {small:g} ms, Δ = {big:g} ms is not in the "
                                         f"dictionary (its shells: {_describe_shells(self.shells)}); rebuild it "
                                         "for this protocol")
        return np.where(weighted, match, -1)[shell_of]

    def atoms(self, protocol: PGSEProtocol, orientations: ArrayLike, *, out: np.ndarray | None = None) -> np.ndarray:
        """The dictionary rotated to fibre orientations: one (M, N) matrix per orientation.

        .. math::

            C(\\mathbf{u})_{ij} = (1 - w)\\,S_j(s_i, \\theta_k) + w\\,S_j(s_i, \\theta_{k+1}),
            \\quad \\theta = \\arccos|\\mathbf{g}_i\\cdot\\mathbf{u}|, \\;
            k = \\lfloor\\theta/h\\rfloor,\\; w = \\theta/h - k,

        with :math:`s_i` the shell of measurement i and h the angle step; measurements with G = 0
        give 1. θ is computed as atan2(|g × u|, |g · u|), accurate near 0 and π/2, so a
        measurement exactly on the angle grid reproduces the stored fingerprint (to rounding), and
        off the grid the error is at most h²/8 · max|∂²S/∂θ²| (linear interpolation).

        Parameters
        ----------
        protocol : PGSEProtocol
            M measurements; their shells must be in the dictionary.
        orientations : array_like, shape (V, 3)
            Fibre directions (normalised here; the sign is irrelevant).
        out : ndarray, shape (V, M, N), optional
            C-contiguous float64 array to write into (saves reallocating it batch after batch).

        Returns
        -------
        ndarray, shape (V, M, N), float64
            ``out`` if given.

        Raises
        ------
        InputError
            A missing shell, or orientations of the wrong shape, NaN/Inf or zero length.

        Examples
        --------
        >>> import numpy as np
        >>> from bioinverse.dmri.pgse import PGSEProtocol
        >>> p = PGSEProtocol([[1, 0, 0], [0, 1, 0]], 70.0, 12.9, 21.8, 57.0)
        >>> d = build_dictionary(p, radius=[1.0], density=[0.5], n_angles=3, progress=False)
        >>> d.atoms(p, [[1.0, 0, 0], [0, 1.0, 0]]).round(3)[:, :, 0].tolist()
        [[0.13, 0.68], [0.68, 0.13]]
        """
        rows = self.shell_index(protocol)
        u = real_finite_array(orientations, "orientations")
        if u.ndim != 2 or u.shape[1] != 3:
            raise InputError("orientations", f"must have shape (V, 3), got {u.shape}")
        norms = np.linalg.norm(u, axis=1)
        if (norms == 0).any():
            raise InputError("orientations", f"row {int(np.argmin(norms))} has zero length")
        u = u / norms[:, None]
        g = protocol.directions
        cos = np.abs(u @ g.T)  # (V, M)
        sin = np.linalg.norm(np.cross(u[:, None, :], g[None, :, :]), axis=2)
        theta = np.arctan2(sin, cos)
        n_angles = self.angles.size
        position = np.clip(theta * ((n_angles - 1) / (np.pi / 2)), 0.0, n_angles - 1)
        below = np.minimum(np.floor(position), n_angles - 1).astype(np.intp)
        weight = position - below
        b0 = rows < 0
        index = np.where(b0, self.shells.shape[0] * n_angles, rows * n_angles + below)
        weight = np.where(b0, 0.0, weight)
        values, slopes = self._tables
        shape = (u.shape[0], rows.size, self.n_atoms)
        if out is None:
            out = np.empty(shape)
        elif not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float64
                  and out.flags.c_contiguous and out.flags.writeable):
            raise InputError("out", f"must be a writeable C-contiguous float64 array of shape {shape}")
        _lerp_gather(values, slopes, index.ravel(), weight.ravel(), out.reshape(-1, self.n_atoms))
        return out

    # ------------------------------------------------------------------ protocols

    def for_protocol(self, protocol: PGSEProtocol) -> FingerprintDictionary:
        """The dictionary restricted to the shells ``protocol`` uses (in the dictionary's order).

        This is how a dictionary is "rebuilt" for a protocol P′ made of a subset of the shells of
        the protocol it was simulated for: no new simulation is needed.

        Raises
        ------
        InputError
            (source ``"protocol"``) a diffusion-weighted shell of the protocol is not in the
            dictionary.

        Examples
        --------
        >>> from bioinverse.dmri.pgse import PGSEProtocol
        >>> p = PGSEProtocol([[0, 0, 0], [1, 0, 0], [1, 0, 0]], [0.0, 70.0, 150.0], 12.9, 21.8, 57.0)
        >>> d = build_dictionary(p, radius=[1.0], density=[0.5], n_angles=5, progress=False)
        >>> d.for_protocol(p.subset([0, 2])).shells.tolist()
        [[0.0, 12.9, 21.8], [150.0, 12.9, 21.8]]
        """
        rows = self.shell_index(protocol)
        keep = np.zeros(self.shells.shape[0], dtype=bool)
        keep[rows[rows >= 0]] = True
        protocol_shells = protocol.shell_table()[0]
        b0_match = _match_shells(protocol_shells[protocol_shells[:, 0] == 0], self.shells)
        keep[b0_match[b0_match >= 0]] = True
        return FingerprintDictionary(self.radius, self.density, self.shells[keep], self.angles,
                                     self.signals[:, keep], self.generator, self.settings)

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dictionary to ``path`` (``.npz`` with JSON metadata), atomically.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from bioinverse.dmri.pgse import PGSEProtocol
        >>> p = PGSEProtocol([[1, 0, 0]], 150.0, 12.9, 21.8, 57.0)
        >>> d = build_dictionary(p, radius=[1.0], density=[0.5], n_angles=5, progress=False)
        >>> f = d.save(pathlib.Path(tempfile.mkdtemp()) / "dict.npz")
        >>> FingerprintDictionary.load(f).signals.tolist() == d.signals.tolist()
        True
        """
        return _write_npz(path, self, np.ones(self.n_atoms, dtype=bool), self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FingerprintDictionary:
        """Read a dictionary written by :meth:`save` (or a finished build cache).

        Raises
        ------
        InputError
            (source: the path) missing or unreadable file, another format, an unfinished build,
            or contents that contradict their metadata.
        """
        dictionary, done, _ = _read_npz(path)
        if not done.all():
            raise InputError(str(path), f"is an unfinished build ({int(done.sum())} of {done.size} atoms); "
                                        "run build_dictionary with the same arguments to finish it")
        return dictionary


@numba.njit(cache=True, parallel=True)
def _lerp_gather(values: np.ndarray, slopes: np.ndarray, index: np.ndarray, weight: np.ndarray,
                 out: np.ndarray) -> None:
    """out[r] = values[index[r]] + weight[r] · slopes[index[r]]: one pass over the (V·M, N) output,
    reading the small tables from cache (NumPy would need a gather and a temporary per term)."""
    for row in numba.prange(index.shape[0]):
        source, w = index[row], weight[row]
        for atom in range(values.shape[1]):
            out[row, atom] = values[source, atom] + w * slopes[source, atom]


def _check_angle_grid(angles: np.ndarray) -> None:
    if angles.ndim != 1 or angles.size < 2:
        raise InputError("angles", f"must be a 1-D grid of at least 2 angles, got shape {angles.shape}")
    uniform = np.linspace(0.0, np.pi / 2, angles.size)
    if not np.allclose(angles, uniform, rtol=0.0, atol=1e-9):
        raise InputError("angles", "must be the uniform grid linspace(0, π/2, T)")


def _match_shells(wanted: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Row of ``available`` equal to each row of ``wanted`` within tolerance, −1 if none."""
    if available.size == 0 or wanted.size == 0:
        return np.full(wanted.shape[0], -1)
    close = np.isclose(wanted[:, None, :], available[None, :, :], rtol=_SHELL_RTOL, atol=_SHELL_ATOL).all(axis=2)
    return np.where(close.any(axis=1), np.argmax(close, axis=1), -1)


def _describe_shells(shells: np.ndarray) -> str:
    return "; ".join(f"[{G:g}, {small:g}, {big:g}]" for G, small, big in shells)


# ---------------------------------------------------------------------- npz files


def _write_npz(path: str | os.PathLike, dictionary: FingerprintDictionary, done: np.ndarray, metadata: dict) -> Path:
    # A file handle keeps np.savez from appending ".npz" to a name that lacks it.
    with atomic_open(path, "wb") as fh:
        np.savez(fh, radius=dictionary.radius, density=dictionary.density, shells=dictionary.shells,
                 angles=dictionary.angles, signals=dictionary.signals, done=done,
                 build_seconds=np.float64(dictionary.build_seconds),
                 metadata=np.array(json.dumps(metadata, allow_nan=False)))
    return Path(path)


def _read_npz(path: str | os.PathLike) -> tuple[FingerprintDictionary, np.ndarray, dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(str(path), f"is not a readable .npz file ({exc.__class__.__name__})") from None
    required = {"radius", "density", "shells", "angles", "signals", "done", "metadata"}
    if not required <= arrays.keys():
        raise InputError(str(path), f"is not a fingerprint dictionary (missing {sorted(required - arrays.keys())})")
    try:
        metadata = json.loads(str(arrays["metadata"]))
    except ValueError:
        raise InputError(str(path), "has unreadable metadata") from None
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise InputError(str(path), "is not a fingerprint dictionary")
    if metadata.get("version") != _FORMAT_VERSION:
        raise InputError(str(path), f"has format version {metadata.get('version')}, expected {_FORMAT_VERSION}")
    try:
        dictionary = FingerprintDictionary(arrays["radius"], arrays["density"], arrays["shells"], arrays["angles"],
                                           arrays["signals"], metadata.get("generator"), metadata.get("settings", {}),
                                           float(arrays.get("build_seconds", 0.0)))
    except InputError as exc:
        raise InputError(str(path), f"{exc.source}: {exc.problem}") from None
    done = np.asarray(arrays["done"], dtype=bool)
    if done.shape != (dictionary.n_atoms,):
        raise InputError(str(path), "has a 'done' mask of the wrong shape")
    stored = dictionary.metadata()
    for key in ("shells_digest", "grid_digest"):
        if metadata.get(key) != stored[key]:
            raise InputError(str(path), f"its arrays do not match the recorded {key} (corrupt file?)")
    return dictionary, done, metadata


# ---------------------------------------------------------------------- building


def default_grid() -> tuple[np.ndarray, np.ndarray]:
    """The (radius, density) grid of the dictionaries of Rensonnet et al. (2021): 782 atoms.

    34 radii ``linspace(0.25, 2.23)`` µm times 23 densities ``linspace(0.10, 0.76)``, radius
    major (atom j has radius index j // 23 and density index j % 23).

    Returns
    -------
    radius, density : ndarray, shape (782,)

    Examples
    --------
    >>> r, f = default_grid()
    >>> r.size, float(r[23]).__round__(2), float(f[1]).__round__(2)
    (782, 0.31, 0.13)
    """
    radii = np.linspace(0.25, 2.23, 34)
    densities = np.linspace(0.10, 0.76, 23)
    return np.repeat(radii, densities.size), np.tile(densities, radii.size)


def _analytic_signals(radius: np.ndarray, density: np.ndarray, shells: np.ndarray, angles: np.ndarray,
                      diffusivity: float) -> np.ndarray:
    G, small, big = (shells[None, :, k, None] for k in range(3))
    return axon_population_signal(radius[:, None, None], density[:, None, None], G, small, big,
                                  np.cos(angles)[None, None, :], diffusivity)


def _montecarlo_parameters() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The simulator module and the tunable keyword defaults of its packer and simulator."""
    from bioinverse.dmri import montecarlo

    def tunable(function: Any, fixed: set[str]) -> dict[str, Any]:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()
                if name not in fixed and p.default is not inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    pack = tunable(montecarlo.pack_cylinders, {"mean_radius", "density", "seed"})
    simulate = tunable(montecarlo.simulate_fingerprint, {"substrate", "shells", "angles", "seed"})
    return montecarlo, pack, simulate


def _atom_seeds(seed: int, atom: int) -> tuple[int, int]:
    """Seeds of atom ``atom``'s packing and walk, fixed by (seed, atom) alone so that a resumed
    build draws what an uninterrupted one does."""
    pack_seed, walk_seed = np.random.SeedSequence(seed, spawn_key=(atom,)).generate_state(2)
    return int(pack_seed), int(walk_seed)


def _resolve_settings(generator: str, seed: int, generator_settings: dict) -> tuple[dict, dict, dict]:
    """Full settings (defaults filled in) and the keyword arguments of the packer and simulator."""
    if generator == "analytic":
        unknown = set(generator_settings) - {"diffusivity"}
        if unknown:
            raise InputError("generator_settings", f"the analytic generator takes only 'diffusivity', got "
                                                   f"{sorted(unknown)}")
        diffusivity = float(generator_settings.get("diffusivity", DIFFUSIVITY))
        if not np.isfinite(diffusivity) or diffusivity <= 0:
            raise InputError("diffusivity", f"must be a positive number of µm²/ms, got {diffusivity!r}")
        return {"diffusivity": diffusivity}, {}, {}
    _, pack_defaults, simulate_defaults = _montecarlo_parameters()
    unknown = set(generator_settings) - set(pack_defaults) - set(simulate_defaults)
    if unknown:
        raise InputError("generator_settings", f"unknown Monte Carlo settings {sorted(unknown)}; known: "
                                               f"{sorted({*pack_defaults, *simulate_defaults})}")
    pack = {k: generator_settings.get(k, v) for k, v in pack_defaults.items()}
    simulate = {k: generator_settings.get(k, v) for k, v in simulate_defaults.items()}
    settings = _jsonable({**pack, **simulate, "seed": int(seed)})
    return settings, pack, simulate


def build_dictionary(protocol: PGSEProtocol, generator: str = "analytic", radius: ArrayLike | None = None,
                     density: ArrayLike | None = None, n_angles: int = 181, cache: str | os.PathLike | None = None,
                     progress: bool = True, seed: int = 0, *, overwrite: bool = False,
                     **generator_settings: Any) -> FingerprintDictionary:
    """Simulate the fingerprints of every (radius, density) atom for the shells of ``protocol``.

    For each atom and each shell (G, δ, Δ) of the protocol (the G = 0 shell included), the signal
    of a population of parallel axons is computed at ``n_angles`` gradient–axis angles
    ``linspace(0, π/2, n_angles)``:

    * ``"analytic"``: :func:`bioinverse.dmri.axons.axon_population_signal` (restricted cylinder +
      tortuous zeppelin), all atoms at once; settings: ``diffusivity`` (µm²/ms).
    * ``"montecarlo"``: per atom, a substrate packed by
      :func:`bioinverse.dmri.montecarlo.pack_cylinders` at mean radius r and density f, and
      :func:`bioinverse.dmri.montecarlo.simulate_fingerprint` on it; settings: the keyword
      arguments of both (``radius_cv``, ``n_cylinders``, ``diffusivity``, ``n_walkers``,
      ``n_steps``, …), defaults filled in and recorded. Atom j's seeds derive from
      (``seed``, j) only.

    With ``cache``, the result is stored there (``.npz``, metadata inside). A Monte Carlo build
    writes it every few atoms and when interrupted; calling again with the same arguments resumes
    from the atoms done, and a finished cache is simply loaded. The result equals an
    uninterrupted build.

    Parameters
    ----------
    protocol : PGSEProtocol
        Its shells are simulated (directions are irrelevant).
    generator : {"analytic", "montecarlo"}
    radius, density : array_like, shape (N,), optional
        Atom grid (µm; fibre density in (0, 1)); both or neither; default :func:`default_grid`.
    n_angles : int
        Angles in the stored grid, ≥ 2 (181: a 0.5° step).
    cache : str or os.PathLike, optional
        Cache file.
    progress : bool
        Show a progress bar on stderr (Monte Carlo).
    seed : int
        Base seed of the Monte Carlo generator (unused by the analytic one).
    overwrite : bool
        Replace a cache built with other arguments instead of refusing it.
    **generator_settings
        Settings of the generator, as above.

    Returns
    -------
    FingerprintDictionary

    Raises
    ------
    InputError
        Bad arguments, unknown settings, a cache file built with other arguments (unless
        ``overwrite``) or an unreadable one.

    Examples
    --------
    >>> from bioinverse.dmri.pgse import hcp_mgh_protocol
    >>> d = build_dictionary(hcp_mgh_protocol(), progress=False)
    >>> d.n_atoms, d.shells.shape, d.angles.size, d.settings
    (782, (5, 3), 181, {'diffusivity': 2.0})
    """
    if not isinstance(protocol, PGSEProtocol):
        raise InputError("protocol", f"must be a PGSEProtocol, got {type(protocol).__name__}")
    if generator not in GENERATORS:
        raise InputError("generator", f"must be one of {', '.join(GENERATORS)}, got {generator!r}")
    if isinstance(n_angles, bool) or not isinstance(n_angles, (int, np.integer)) or n_angles < 2:
        raise InputError("n_angles", f"must be an integer ≥ 2, got {n_angles!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    radius, density = _atom_grid(radius, density)
    shells = protocol.shell_table()[0]
    angles = np.linspace(0.0, np.pi / 2, int(n_angles))
    settings, pack_kwargs, simulate_kwargs = _resolve_settings(generator, int(seed), generator_settings)
    empty = FingerprintDictionary(radius, density, shells, angles, np.zeros((radius.size, shells.shape[0],
                                                                             angles.size)), generator, settings)
    metadata = empty.metadata()
    signals, done = np.zeros(empty.signals.shape), np.zeros(radius.size, dtype=bool)
    spent_before = 0.0
    if cache is not None:
        cached = _resume(cache, metadata, overwrite)
        if cached is not None:
            signals, done = np.array(cached[0].signals), cached[1]
            spent_before = cached[0].build_seconds
            if done.all():
                return cached[0]
    start = time.perf_counter()

    def result() -> FingerprintDictionary:
        return FingerprintDictionary(radius, density, shells, angles, signals, generator, settings,
                                     spent_before + time.perf_counter() - start)

    if generator == "analytic":
        signals = _analytic_signals(radius, density, shells, angles, settings["diffusivity"])
        done[:] = True
    else:
        montecarlo = _montecarlo_parameters()[0]
        from bioinverse._progress import progress_bar

        last_write, unsaved = time.monotonic(), 0
        try:
            with progress_bar(progress) as bar:
                task = bar.add_task("Monte Carlo fingerprints", total=radius.size, completed=int(done.sum()))
                for atom in np.flatnonzero(~done):
                    pack_seed, walk_seed = _atom_seeds(int(seed), int(atom))
                    substrate = montecarlo.pack_cylinders(float(radius[atom]), float(density[atom]),
                                                          seed=pack_seed, **pack_kwargs)
                    signals[atom] = montecarlo.simulate_fingerprint(substrate, shells, angles, seed=walk_seed,
                                                                    **simulate_kwargs)
                    done[atom] = True
                    unsaved += 1
                    bar.advance(task)
                    if cache is not None and (unsaved >= _CHECKPOINT_ATOMS
                                              or time.monotonic() - last_write > _CHECKPOINT_SECONDS):
                        _write_npz(cache, result(), done, metadata)
                        last_write, unsaved = time.monotonic(), 0
        finally:
            # an interrupted build keeps what it has done
            if cache is not None and unsaved and not done.all():
                _write_npz(cache, result(), done, metadata)
    dictionary = result()
    if cache is not None:
        _write_npz(cache, dictionary, done, metadata)
    return dictionary


def _atom_grid(radius: ArrayLike | None, density: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    if (radius is None) != (density is None):
        raise InputError("radius, density", "give both or neither")
    if radius is None:
        return default_grid()
    r = real_finite_array(radius, "radius")
    f = real_finite_array(density, "density")
    if r.ndim != 1 or f.shape != r.shape:
        raise InputError("radius, density", f"must be 1-D of the same length, got {r.shape} and {f.shape}")
    if (r <= 0).any():
        raise InputError("radius", "must be > 0 µm")
    if ((f <= 0) | (f >= 1)).any():
        raise InputError("density", "must lie in (0, 1)")
    return r, f


def _resume(cache: str | os.PathLike, metadata: dict, overwrite: bool) -> tuple[FingerprintDictionary,
                                                                                  np.ndarray] | None:
    """The cached dictionary and its done mask if ``cache`` holds this build; None to start afresh."""
    path = Path(cache)
    if not path.exists():
        return None
    try:
        dictionary, done, stored = _read_npz(path)
    except InputError:
        if overwrite:
            return None
        raise
    differences = sorted(key for key in set(metadata) | set(stored) if metadata.get(key) != stored.get(key))
    if differences:
        if overwrite:
            return None
        raise InputError(str(path), f"holds a dictionary built with other arguments (differs in "
                                    f"{', '.join(differences)}); delete it or pass overwrite=True")
    return dictionary, done
