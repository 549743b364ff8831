"""Pulsed-gradient spin-echo (PGSE) protocols and the Camino scheme file that stores them.

A :class:`~bioinverse.dmri.io.GradientTable` knows one b-value per volume; simulators of restricted
diffusion need what produced it: the gradient amplitude G, the pulse duration δ and separation Δ
(and the echo time TE) of every measurement. :class:`PGSEProtocol` keeps those, derives b and q,
and groups measurements into *shells* of identical (G, δ, Δ) — the unit on which fingerprints are
simulated, since a measurement's signal depends on its direction only through the angle to the
fibres.

Units: G in mT/m, times in ms, lengths in µm, b in s/mm², q in rad/µm. The Camino
``STEJSKALTANNER`` scheme file is in SI units (T/m, s); :func:`read_scheme` and
:func:`write_scheme` convert.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bioinverse.dmri.io import GYROMAGNETIC_RATIO, GradientTable
from bioinverse.errors import InputError
from bioinverse.io import write_text

__all__ = ["GAMMA_UM", "PGSEProtocol", "hcp_mgh_protocol", "read_scheme", "write_scheme"]

#: Proton gyromagnetic ratio in rad ms⁻¹ µm⁻¹ (mT/m)⁻¹: the phase of a spin is
#: ``GAMMA_UM * G[mT/m] * ∫ x[µm] dt[ms]``.
GAMMA_UM = GYROMAGNETIC_RATIO * 1e-12

_SCHEME_HEADER = "VERSION: STEJSKALTANNER"
_UNIT_TOLERANCE = 1e-2
# Plausibility limits of the SI values in a scheme file; beyond them the file is almost surely in
# mT/m or ms, which would silently scale b by 10⁶.
_MAX_G_T_PER_M = 1.0
_MAX_TIME_S = 1.0


@dataclass(frozen=True)
class PGSEProtocol:
    """A PGSE acquisition: one gradient direction, amplitude and timing per measurement.

    Rectangular gradient pulses of amplitude :math:`G` and duration :math:`\\delta`, separated by
    :math:`\\Delta`, give (Stejskal & Tanner, J. Chem. Phys. 42:288, 1965)

    .. math::

        q = \\gamma G \\delta, \\qquad b = q^2 \\left(\\Delta - \\frac{\\delta}{3}\\right).

    Arrays are copied to read-only float64 on construction; directions are renormalised to unit
    length where G > 0.

    Attributes
    ----------
    directions : ndarray, shape (n, 3)
        Gradient directions: unit vectors (norm within 1e-2 of 1) where G > 0, anything finite
        (usually zeros) where G = 0.
    gradient_strength : ndarray, shape (n,)
        G in mT/m, ≥ 0.
    small_delta : ndarray, shape (n,)
        Pulse duration δ in ms, > 0.
    big_delta : ndarray, shape (n,)
        Pulse separation Δ in ms, ≥ δ.
    echo_time : ndarray, shape (n,)
        Echo time TE in ms, ≥ Δ + δ.

    Raises
    ------
    InputError
        (source ``"protocol"``) mismatched lengths, NaN/Inf, or values outside the ranges above.

    Examples
    --------
    >>> p = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 40.0], 20.0, 40.0, 80.0)
    >>> p.bvals.round(1).tolist(), len(p)
    ([0.0, 1526.8], 2)
    """

    directions: np.ndarray
    gradient_strength: np.ndarray
    small_delta: np.ndarray
    big_delta: np.ndarray
    echo_time: np.ndarray

    def __post_init__(self) -> None:
        directions = _float_array(self.directions, "directions")
        if directions.ndim != 2 or directions.shape[1] != 3 or directions.shape[0] == 0:
            raise InputError("protocol", f"directions must have shape (n, 3) with n ≥ 1, got {directions.shape}")
        n = directions.shape[0]
        columns = {}
        for name in ("gradient_strength", "small_delta", "big_delta", "echo_time"):
            value = _float_array(getattr(self, name), name)
            if value.ndim == 0:
                value = np.full(n, float(value))
            if value.shape != (n,):
                raise InputError("protocol", f"{name} must have shape ({n},) or be a scalar, got {value.shape}")
            columns[name] = value
        for name, value in (("directions", directions), *columns.items()):
            if not np.isfinite(value).all():
                raise InputError("protocol", f"{name} contains NaN or Inf")
        G, small, big, te = (columns[k] for k in ("gradient_strength", "small_delta", "big_delta", "echo_time"))
        _first_violation(G < 0, "gradient strength must be ≥ 0 mT/m", G)
        _first_violation(small <= 0, "δ must be > 0 ms", small)
        _first_violation(big < small, "Δ must be ≥ δ", big)
        _first_violation(te < big + small, "TE must be ≥ Δ + δ", te)
        weighted = G > 0
        norms = np.linalg.norm(directions, axis=1)
        bad = weighted & (np.abs(norms - 1) > _UNIT_TOLERANCE)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError("protocol", f"direction {i} has norm {norms[i]:.3f}, expected a unit vector")
        directions[weighted] /= norms[weighted, None]
        for name, value in (("directions", directions), *columns.items()):
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return self.directions.shape[0]

    @property
    def q(self) -> np.ndarray:
        """q = γGδ in rad/µm, shape (n,)."""
        return GAMMA_UM * self.gradient_strength * self.small_delta

    @property
    def bvals(self) -> np.ndarray:
        """b = q²(Δ − δ/3) in s/mm², shape (n,)."""
        return self.q**2 * (self.big_delta - self.small_delta / 3.0) * 1e3

    @property
    def b0s_mask(self) -> np.ndarray:
        """Boolean mask of the measurements without diffusion weighting (G = 0)."""
        return self.gradient_strength == 0

    def subset(self, indices: ArrayLike) -> PGSEProtocol:
        """The protocol restricted to ``indices`` (an index array or a boolean mask), in that order."""
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise InputError("indices", f"a boolean mask must have shape ({len(self)},), got {index.shape}")
            index = np.flatnonzero(index)
        if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
            raise InputError("indices", "must be a non-empty 1-D integer array or boolean mask")
        if index.min() < -len(self) or index.max() >= len(self):
            raise InputError("indices", f"must lie in [0, {len(self) - 1}]")
        return PGSEProtocol(self.directions[index], self.gradient_strength[index], self.small_delta[index],
                            self.big_delta[index], self.echo_time[index])

    def shell_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Group the measurements by their (G, δ, Δ).

        Returns
        -------
        shells : ndarray, shape (S, 3)
            The distinct ``[G mT/m, δ ms, Δ ms]`` rows, sorted by b, then G.
        shell_of : ndarray of int, shape (n,)
            Row of ``shells`` of every measurement.

        Examples
        --------
        >>> p = PGSEProtocol([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [0.0, 40.0, 40.0], 20.0, 40.0, 80.0)
        >>> shells, shell_of = p.shell_table()
        >>> shells.tolist(), shell_of.tolist()
        ([[0.0, 20.0, 40.0], [40.0, 20.0, 40.0]], [0, 1, 1])
        """
        keys = np.round(np.column_stack([self.gradient_strength, self.small_delta, self.big_delta]), 9)
        shells, shell_of = np.unique(keys, axis=0, return_inverse=True)
        b = GAMMA_UM**2 * shells[:, 0] ** 2 * shells[:, 1] ** 2 * (shells[:, 2] - shells[:, 1] / 3.0)
        order = np.lexsort((shells[:, 0], np.round(b, 9)))
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        return shells[order], rank[shell_of.ravel()]

    def gradient_table(self, b0_threshold: float = 50.0) -> GradientTable:
        """The equivalent :class:`~bioinverse.dmri.io.GradientTable` (for dipy and FSL files).

        δ, Δ and TE are carried over when every measurement shares them.
        """
        def common(values: np.ndarray) -> float | None:
            return float(values[0]) if np.all(values == values[0]) else None

        return GradientTable(self.bvals, np.where(self.b0s_mask[:, None], 0.0, self.directions), b0_threshold,
                             small_delta=common(self.small_delta), big_delta=common(self.big_delta),
                             echo_time=common(self.echo_time))

    def digest(self) -> str:
        """A stable SHA-256 (hex) of the protocol, rounded to 1e-9 of the stored units.

        Two protocols with the same digest have the same measurements in the same order; saved
        models and dictionaries record it to refuse data from another protocol.
        """
        table = np.column_stack([np.where(self.b0s_mask[:, None], 0.0, self.directions), self.gradient_strength,
                                 self.small_delta, self.big_delta, self.echo_time])
        rounded = np.round(table, 9) + 0.0  # + 0.0 folds -0.0 into 0.0
        return hashlib.sha256(rounded.astype("<f8").tobytes()).hexdigest()


def _float_array(x: ArrayLike, name: str) -> np.ndarray:
    try:
        return np.array(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("protocol", f"{name} must be numeric") from None


def _first_violation(bad: np.ndarray, rule: str, values: np.ndarray) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError("protocol", f"measurement {i}: {rule} (got {values[i]:g})")


# --------------------------------------------------------------------------------------------
# Camino scheme files
# --------------------------------------------------------------------------------------------


def read_scheme(path: str | os.PathLike) -> PGSEProtocol:
    """Read a Camino ``STEJSKALTANNER`` scheme file.

    The file starts with the line ``VERSION: STEJSKALTANNER`` (comment lines starting with ``#``
    and blank lines are ignored anywhere) followed by one line per measurement::

        gx gy gz |G| Δ δ TE

    in SI units: a unit direction, the gradient amplitude in T/m, Δ, δ and TE in seconds
    (Camino's ``scheme`` format; Alexander, Camino documentation).

    Parameters
    ----------
    path : str or os.PathLike
        The scheme file.

    Returns
    -------
    PGSEProtocol
        Converted to mT/m and ms.

    Raises
    ------
    InputError
        (source: the path) missing or empty file, another ``VERSION``, a line without exactly
        seven numbers (its line number is given), NaN/Inf, values in the wrong units (G > 1 T/m or
        a time > 1 s), or measurements that violate :class:`PGSEProtocol`'s rules.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "two.scheme"
    >>> _ = f.write_text("VERSION: STEJSKALTANNER\\n0 0 0 0 0.04 0.02 0.08\\n1 0 0 0.04 0.04 0.02 0.08\\n")
    >>> read_scheme(f).bvals.round(1).tolist()
    [0.0, 1526.8]
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(path), f"cannot be read as text ({exc.__class__.__name__})") from None
    lines = [(number, line.split("#", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise InputError(str(path), "is empty")
    number, header = lines[0]
    if header.replace(" ", "").upper() != _SCHEME_HEADER.replace(" ", ""):
        raise InputError(str(path), f"line {number}: expected '{_SCHEME_HEADER}', got '{header[:60]}'")
    rows = []
    for number, line in lines[1:]:
        fields = line.split()
        if len(fields) != 7:
            raise InputError(str(path), f"line {number}: expected 7 numbers (gx gy gz G Δ δ TE), got {len(fields)}")
        try:
            row = [float(v) for v in fields]
        except ValueError:
            raise InputError(str(path), f"line {number}: not a number in '{line[:60]}'") from None
        if not np.isfinite(row).all():
            raise InputError(str(path), f"line {number}: NaN or Inf")
        rows.append(row)
    if not rows:
        raise InputError(str(path), "has a header but no measurements")
    table = np.array(rows)
    if (table[:, 3] > _MAX_G_T_PER_M).any():
        i = int(np.argmax(table[:, 3] > _MAX_G_T_PER_M))
        raise InputError(str(path), f"measurement {i}: G = {table[i, 3]:g} T/m is implausible; "
                                    "scheme files are in SI units (T/m, s)")
    if (table[:, 4:7] > _MAX_TIME_S).any():
        i = int(np.argmax((table[:, 4:7] > _MAX_TIME_S).any(axis=1)))
        raise InputError(str(path), f"measurement {i}: a time above 1 s is implausible; "
                                    "scheme files are in SI units (s)")
    try:
        return PGSEProtocol(table[:, :3], table[:, 3] * 1e3, table[:, 5] * 1e3, table[:, 4] * 1e3, table[:, 6] * 1e3)
    except InputError as exc:
        raise InputError(str(path), exc.problem) from None


def write_scheme(path: str | os.PathLike, protocol: PGSEProtocol) -> Path:
    """Write ``protocol`` as a Camino ``STEJSKALTANNER`` scheme file (SI units), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written to a temporary name and renamed.
    protocol : PGSEProtocol

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = PGSEProtocol([[0, 0, 0], [0, 0, 1]], [0.0, 40.0], 20.0, 40.0, 80.0)
    >>> f = write_scheme(pathlib.Path(tempfile.mkdtemp()) / "p.scheme", p)
    >>> read_scheme(f).digest() == p.digest()
    True
    """
    if not isinstance(protocol, PGSEProtocol):
        raise InputError("protocol", f"must be a PGSEProtocol, got {type(protocol).__name__}")
    lines = [_SCHEME_HEADER]
    directions = np.where(protocol.b0s_mask[:, None], 0.0, protocol.directions)
    for g, G, big, small, te in zip(directions, protocol.gradient_strength, protocol.big_delta,
                                    protocol.small_delta, protocol.echo_time):
        values = [*g, G * 1e-3, big * 1e-3, small * 1e-3, te * 1e-3]
        lines.append(" ".join(repr(float(v)) for v in values))
    return write_text(path, "\n".join(lines) + "\n")


@functools.lru_cache(maxsize=4)
def hcp_mgh_protocol(seed: int = 0) -> PGSEProtocol:
    """The 552-measurement protocol of the HCP MGH-USC Adult Diffusion data (Setsompop et al., 2013).

    40 measurements without diffusion weighting, then shells at b = 1000, 3000, 5000 and 10000
    s/mm² with 64, 64, 128 and 256 directions spread by electrostatic repulsion (a different set per
    shell), all with δ = 12.9 ms, Δ = 21.8 ms and TE = 57 ms; G follows from b (up to 219 mT/m at
    b = 10000, within the 300 mT/m of the Connectom scanner). The result is cached (it is
    immutable).

    Parameters
    ----------
    seed : int
        Seed of the direction sets.

    Returns
    -------
    PGSEProtocol

    Examples
    --------
    >>> p = hcp_mgh_protocol()
    >>> len(p), p.shell_table()[0][:, 0].round(1).tolist()
    (552, [0.0, 69.3, 120.0, 154.9, 219.0])
    """
    from bioinverse.dmri.acquisition import electrostatic_directions

    small, big, te = 12.9, 21.8, 57.0
    directions, strengths = [np.zeros((40, 3))], [np.zeros(40)]
    for shell, (b, n) in enumerate(((1000.0, 64), (3000.0, 64), (5000.0, 128), (10000.0, 256))):
        directions.append(electrostatic_directions(n, seed=seed + shell))
        G = np.sqrt(b * 1e-3 / (GAMMA_UM**2 * small**2 * (big - small / 3.0)))
        strengths.append(np.full(n, G))
    return PGSEProtocol(np.concatenate(directions), np.concatenate(strengths), small, big, te)
