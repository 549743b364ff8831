"""Diffusion MRI file formats: FSL ``bvals`` / ``bvecs`` gradient tables and NIfTI images.

FSL stores the b-values (s/mm²) as one whitespace-separated row and the unit gradient directions
as three rows (x, y, z), one column per volume; some tools write the transpose (one row per
volume), which is accepted too. Diffusion series, masks and parameter maps are NIfTI files
(``.nii`` or ``.nii.gz``) read and written with nibabel; every reader validates what it returns and
every writer is atomic (a failed write leaves no file behind).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.errors import InputError

__all__ = [
    "GYROMAGNETIC_RATIO",
    "DiffusionData",
    "GradientTable",
    "b_from_gradient",
    "read_bvals_bvecs",
    "read_dwi",
    "read_map",
    "read_mask",
    "read_nifti",
    "write_bvals_bvecs",
    "write_dwi",
    "write_map",
    "write_mask",
]

#: Proton gyromagnetic ratio γ in rad s⁻¹ T⁻¹ (CODATA 2018).
GYROMAGNETIC_RATIO = 2.6752218744e8

_UNIT_TOLERANCE = 1e-2


@dataclass(frozen=True)
class GradientTable:
    """A diffusion acquisition scheme: one b-value and direction per volume, plus pulse timings.

    The arrays are copied to read-only float64 on construction; directions of diffusion-weighted
    volumes are renormalised to exact unit length once they pass the check.

    Attributes
    ----------
    bvals : ndarray, shape (n,)
        b-values in s/mm², ≥ 0.
    bvecs : ndarray, shape (n, 3)
        Gradient directions; unit vectors (norm within 1e-2 of 1) wherever b > ``b0_threshold``,
        anything finite (usually zeros) for the b ≈ 0 volumes.
    b0_threshold : float
        b-values at or below it (s/mm²) count as b = 0.
    small_delta : float or None
        Gradient pulse duration δ in ms, if known.
    big_delta : float or None
        Gradient pulse separation Δ in ms, if known.
    echo_time : float or None
        Echo time TE in ms, if known.

    Raises
    ------
    InputError
        (source ``"gtab"``) wrong shapes, NaN/Inf, negative b-values, non-unit directions at b > 0,
        or timings that are not positive.

    Examples
    --------
    >>> gtab = GradientTable([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]], echo_time=80.7)
    >>> len(gtab), gtab.b0s_mask.tolist(), gtab.shells()
    (3, [True, False, False], [(0.0, 1), (1000.0, 2)])
    >>> GradientTable([0, 1000], [[0, 0, 0], [0.5, 0, 0]])
    Traceback (most recent call last):
    ...
    bioinverse.errors.InputError: gtab: direction 1 (b=1000) has norm 0.500, expected a unit vector
    """

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = 50.0
    small_delta: float | None = None
    big_delta: float | None = None
    echo_time: float | None = None

    def __post_init__(self) -> None:
        bvals = _float_array(self.bvals, "bvals")
        bvecs = _float_array(self.bvecs, "bvecs")
        if bvals.ndim != 1 or bvals.size == 0:
            raise InputError("gtab", f"bvals must have shape (n,) with n ≥ 1, got {bvals.shape}")
        if bvecs.shape != (bvals.size, 3):
            raise InputError("gtab", f"bvecs must have shape ({bvals.size}, 3), got {bvecs.shape}")
        if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()):
            raise InputError("gtab", "bvals or bvecs contain NaN or Inf")
        if (bvals < 0).any():
            i = int(np.flatnonzero(bvals < 0)[0])
            raise InputError("gtab", f"b-value {i} is negative ({bvals[i]:g} s/mm²)")
        threshold = _number(self.b0_threshold, "gtab", "b0_threshold", allow_zero=True)
        weighted = bvals > threshold
        norms = np.linalg.norm(bvecs, axis=1)
        bad = weighted & (np.abs(norms - 1) > _UNIT_TOLERANCE)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                "gtab", f"direction {i} (b={bvals[i]:g}) has norm {norms[i]:.3f}, expected a unit vector"
            )
        # Renormalise only what is visibly off, so that rebuilding a table (subset) is bit-exact.
        renormalise = weighted & (np.abs(norms - 1) > 1e-12)
        bvecs[renormalise] /= norms[renormalise, None]
        bvals.flags.writeable = False
        bvecs.flags.writeable = False
        object.__setattr__(self, "bvals", bvals)
        object.__setattr__(self, "bvecs", bvecs)
        object.__setattr__(self, "b0_threshold", threshold)
        for name in ("small_delta", "big_delta", "echo_time"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else _number(value, "gtab", f"{name} (ms)"))
        if self.small_delta is not None and self.big_delta is not None and self.big_delta < self.small_delta:
            raise InputError(
                "gtab",
                f"big_delta ({self.big_delta:g} ms) is shorter than small_delta ({self.small_delta:g} ms)",
            )

    def __len__(self) -> int:
        return self.bvals.shape[0]

    @property
    def b0s_mask(self) -> np.ndarray:
        """Boolean mask of the b ≈ 0 volumes."""
        return self.bvals <= self.b0_threshold

    def shells(self, tolerance: float = 100.0) -> list[tuple[float, int]]:
        """Group the b-values into shells: ``[(mean b in s/mm², number of volumes), ...]``, sorted.

        Volumes whose b-values differ by at most ``tolerance`` s/mm² from a shell's first member
        join that shell (scanners report 995, 1000, 1005 for one nominal shell).

        Examples
        --------
        >>> GradientTable([0, 995, 1005, 2000], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]).shells()
        [(0.0, 1), (1000.0, 2), (2000.0, 1)]
        """
        groups: list[list[float]] = []
        for b in np.sort(self.bvals):
            if groups and b - groups[-1][0] <= tolerance:
                groups[-1].append(float(b))
            else:
                groups.append([float(b)])
        return [(float(np.mean(g)), len(g)) for g in groups]

    def subset(self, indices: ArrayLike) -> GradientTable:
        """The table of the volumes ``indices`` (integers, in the given order, or a boolean mask).

        Timings and ``b0_threshold`` are kept.

        Parameters
        ----------
        indices : array_like of int, shape (m,), or of bool, shape (n,)
            Volumes to keep.

        Returns
        -------
        GradientTable
            ``m`` volumes.

        Examples
        --------
        >>> gtab = GradientTable([0, 1000, 2000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]], echo_time=80.7)
        >>> sub = gtab.subset([2, 0])
        >>> sub.bvals.tolist(), sub.echo_time
        ([2000.0, 0.0], 80.7)
        """
        index = _index_array(indices, len(self), "indices")
        return GradientTable(
            self.bvals[index],
            self.bvecs[index],
            self.b0_threshold,
            small_delta=self.small_delta,
            big_delta=self.big_delta,
            echo_time=self.echo_time,
        )

    def find(self, other: GradientTable, b_tol: float = 20.0, angle_tol_deg: float = 2.0) -> np.ndarray:
        """Locate each measurement of ``other`` in this table.

        A diffusion-weighted measurement of ``other`` matches one of ``self`` when the b-values
        differ by at most ``b_tol`` and the directions agree up to sign within ``angle_tol_deg``
        (the signal is antipodally symmetric, :math:`S(\\mathbf g) = S(-\\mathbf g)`); any b ≈ 0
        volume matches any b ≈ 0 volume (paired in order). Each volume of ``self`` is used at most
        once; among admissible pairings the one with the smallest total normalised mismatch
        :math:`\\sum |\\Delta b|/b_{tol} + \\theta/\\theta_{tol}` is chosen (Hungarian algorithm), so
        near-duplicate directions cannot steal each other's partner.

        Parameters
        ----------
        other : GradientTable
            The measurements to look up (e.g. the subsampled scheme a saved model expects).
        b_tol : float
            b-value tolerance in s/mm².
        angle_tol_deg : float
            Direction tolerance in degrees.

        Returns
        -------
        ndarray of int, shape (len(other),)
            ``self.subset(result)`` reproduces ``other``.

        Raises
        ------
        InputError
            (source ``"gtab"``) naming the first measurement of ``other`` without a match.

        Examples
        --------
        >>> scan = GradientTable([0, 1000, 1000, 0], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
        >>> wanted = GradientTable([1000, 0], [[0, -1, 0], [0, 0, 0]])
        >>> scan.find(wanted).tolist()
        [2, 0]
        """
        from scipy.optimize import linear_sum_assignment

        if not isinstance(other, GradientTable):
            raise InputError("other", f"must be a GradientTable, got {type(other).__name__}")
        b_tol = _number(b_tol, "b_tol", "b_tol", allow_zero=True)
        angle_tol = _number(angle_tol_deg, "angle_tol_deg", "angle_tol_deg", allow_zero=True)
        result = np.full(len(other), -1, dtype=np.int64)

        mine_b0, theirs_b0 = np.flatnonzero(self.b0s_mask), np.flatnonzero(other.b0s_mask)
        paired = min(mine_b0.size, theirs_b0.size)
        result[theirs_b0[:paired]] = mine_b0[:paired]

        mine_dw, theirs_dw = np.flatnonzero(~self.b0s_mask), np.flatnonzero(~other.b0s_mask)
        if mine_dw.size and theirs_dw.size:
            db = np.abs(other.bvals[theirs_dw, None] - self.bvals[None, mine_dw])
            cos = np.abs(other.bvecs[theirs_dw] @ self.bvecs[mine_dw].T)
            angle = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
            # A small slack absorbs the rounding of directions written with 6 decimals.
            admissible = (db <= b_tol + 1e-6) & (angle <= angle_tol + 1e-6)
            with np.errstate(divide="ignore", invalid="ignore"):
                mismatch = np.nan_to_num(db / b_tol) + np.nan_to_num(angle / angle_tol)
            # An inadmissible pair costs more than any full set of admissible ones, so the
            # assignment first maximises the number of matches, then minimises the mismatch.
            penalty = 10.0 * (theirs_dw.size + 1) * (float(mismatch[admissible].max(initial=0.0)) + 1.0)
            cost = np.where(admissible, mismatch, penalty)
            rows, cols = linear_sum_assignment(cost)
            good = admissible[rows, cols]
            result[theirs_dw[rows[good]]] = mine_dw[cols[good]]

        missing = np.flatnonzero(result < 0)
        if missing.size:
            i = int(missing[0])
            b, g = other.bvals[i], other.bvecs[i]
            if other.b0s_mask[i]:
                what = f"b=0 measurement {i} has no match: the table has only {mine_b0.size} b=0 volumes"
            else:
                what = (
                    f"measurement {i} (b={b:g} s/mm², direction ({g[0]:.3f}, {g[1]:.3f}, {g[2]:.3f})) has no "
                    f"unused match within {b_tol:g} s/mm² and {angle_tol:g}° (directions up to sign)"
                )
            raise InputError("gtab", what)
        return result


def _float_array(x: ArrayLike, name: str) -> np.ndarray:
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("gtab", f"{name} must be numeric") from None
    return a


def _number(value: float, source: str, name: str, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (≥ 0 with ``allow_zero``), else InputError(source)."""
    kind = "non-negative" if allow_zero else "positive"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(source, f"{name} must be a {kind} number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(source, f"{name} must be a {kind} finite number, got {value!r}")
    return v


def _index_array(indices: ArrayLike, n: int, name: str) -> np.ndarray:
    index = np.asarray(indices)
    if index.dtype == bool:
        if index.shape != (n,):
            raise InputError(name, f"a boolean mask must have shape ({n},), got {index.shape}")
        return np.flatnonzero(index)
    if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise InputError(
            name, f"must be a 1-D array of integer indices, got dtype {index.dtype} shape {index.shape}"
        )
    index = index.astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= n):
        raise InputError(name, f"indices must lie in [0, {n - 1}], got {index.min()}…{index.max()}")
    return index


def b_from_gradient(G_mT_per_m: ArrayLike, small_delta_ms: ArrayLike, big_delta_ms: ArrayLike) -> np.ndarray:
    """b-value of a pulsed-gradient spin-echo (Stejskal–Tanner) encoding.

    .. math:: b = \\gamma^2 G^2 \\delta^2 \\left(\\Delta - \\frac{\\delta}{3}\\right)

    with rectangular gradient pulses of amplitude :math:`G`, duration :math:`\\delta` and separation
    :math:`\\Delta` (Stejskal & Tanner, J. Chem. Phys. 42:288, 1965; formula as printed in Golkov et
    al., IEEE TMI 2016, §II-A). The proton gyromagnetic ratio is
    :math:`\\gamma = 2.675221874 \\times 10^8` rad s⁻¹ T⁻¹ — the physically correct value; Golkov et al.
    print it without the factor :math:`10^8`.

    Parameters
    ----------
    G_mT_per_m : array_like
        Gradient amplitude in mT/m, ≥ 0.
    small_delta_ms : array_like
        Pulse duration δ in ms, > 0.
    big_delta_ms : array_like
        Pulse separation Δ in ms, ≥ δ.

    Returns
    -------
    ndarray
        b in s/mm², broadcast over the inputs.

    Examples
    --------
    >>> round(float(b_from_gradient(40.0, 20.0, 40.0)), 1)
    1526.8
    """
    g = real_finite_array(G_mT_per_m, "G_mT_per_m", allow_empty=True) * 1e-3  # T/m
    small = real_finite_array(small_delta_ms, "small_delta_ms", allow_empty=True) * 1e-3  # s
    big = real_finite_array(big_delta_ms, "big_delta_ms", allow_empty=True) * 1e-3
    if (g < 0).any():
        raise InputError("G_mT_per_m", "gradient amplitudes must be ≥ 0")
    if (small <= 0).any():
        raise InputError("small_delta_ms", "pulse durations must be > 0")
    if (big < small).any():
        raise InputError("big_delta_ms", "pulse separation Δ must be at least the pulse duration δ")
    b_si = GYROMAGNETIC_RATIO**2 * g**2 * small**2 * (big - small / 3.0)  # s/m²
    return b_si * 1e-6


def _read_table(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "no such file")
    text = path.read_text(errors="replace").strip()
    if not text:
        raise InputError(path, "is empty")
    try:
        rows = [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise InputError(path, f"contains a value that is not a number ({exc})") from None
    if len({len(r) for r in rows}) != 1:
        raise InputError(path, "rows have different numbers of values (truncated file?)")
    table = np.array(rows, dtype=np.float64)
    if not np.isfinite(table).all():
        raise InputError(path, "contains NaN or Inf")
    return table


def read_bvals_bvecs(
    bvals: str | os.PathLike, bvecs: str | os.PathLike, b0_threshold: float = 50.0
) -> GradientTable:
    """Read and validate an FSL gradient table.

    Parameters
    ----------
    bvals, bvecs : path
        The FSL files. b-values must be in s/mm².
    b0_threshold : float
        b-values at or below it (s/mm²) are treated as b = 0.

    Returns
    -------
    GradientTable

    Raises
    ------
    InputError
        Missing/empty/non-numeric files, lengths that disagree, negative b-values, b-values that look
        like ms/µm² (all ≤ 10), or directions of diffusion-weighted volumes that are not unit vectors.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "x.bval").write_text("0 1000 2000")
    >>> _ = (d / "x.bvec").write_text("0 1 0\\n0 0 1\\n0 0 0")
    >>> read_bvals_bvecs(d / "x.bval", d / "x.bvec").shells()
    [(0.0, 1), (1000.0, 1), (2000.0, 1)]
    """
    bvals, bvecs = Path(bvals), Path(bvecs)
    b = _read_table(bvals)
    if 1 not in b.shape:
        raise InputError(
            bvals, f"must hold one row (or column) of b-values, found a {b.shape[0]}×{b.shape[1]} table"
        )
    b = b.ravel()
    g = _read_table(bvecs)
    if g.shape[0] != 3 and g.shape[1] == 3:
        g = g.T
    if g.shape[0] != 3:
        raise InputError(bvecs, f"must hold 3 rows (x, y, z), found {g.shape[0]}×{g.shape[1]}")
    if g.shape[1] != b.size:
        raise InputError(bvecs, f"has {g.shape[1]} directions but {bvals.name} has {b.size} b-values")
    if (b < 0).any():
        raise InputError(bvals, "contains negative b-values")
    if b.max() <= 10:
        raise InputError(bvals, f"largest b-value is {b.max():g}: expected s/mm² (e.g. 1000), not ms/µm²")
    g = g.T
    norms = np.linalg.norm(g, axis=1)
    weighted = b > b0_threshold
    bad = weighted & (np.abs(norms - 1) > _UNIT_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(bvecs, f"direction {i} (b={b[i]:g}) has norm {norms[i]:.3f}, expected a unit vector")
    g = np.where(weighted[:, None], g / np.where(norms > 0, norms, 1)[:, None], g)
    return GradientTable(b, g, b0_threshold)


def write_bvals_bvecs(gtab: GradientTable, bvals: str | os.PathLike, bvecs: str | os.PathLike) -> None:
    """Write ``gtab`` as FSL files (atomically): b-values on one row, directions as three rows.

    Parameters
    ----------
    gtab : GradientTable
        The table (b in s/mm²); timings are not part of the FSL format and are not written.
    bvals, bvecs : path
        Targets.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> write_bvals_bvecs(GradientTable([0, 1000], [[0, 0, 0], [0, 0, 1]]), d / "x.bval", d / "x.bvec")
    >>> print((d / "x.bval").read_text().strip())
    0 1000
    """
    from bioinverse.io import write_text

    write_text(bvals, " ".join(f"{v:g}" for v in gtab.bvals) + "\n")
    write_text(bvecs, "\n".join(" ".join(f"{v:.6f}" for v in row) for row in gtab.bvecs.T) + "\n")


# --------------------------------------------------------------------------- NIfTI images


@dataclass(frozen=True)
class DiffusionData:
    """A diffusion series with its gradient table, voxel-to-world affine and brain mask.

    Attributes
    ----------
    data : ndarray of float32, shape (X, Y, Z, n)
        Signal intensities, measurement axis last.
    gtab : GradientTable
        ``n`` measurements.
    affine : ndarray of float64, shape (4, 4)
        Voxel indices → world (scanner) coordinates in mm.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels to process.

    Examples
    --------
    >>> gtab = GradientTable([0, 1000], [[0, 0, 0], [1, 0, 0]])
    >>> data = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    >>> mask = np.zeros((2, 2, 2), bool); mask[0, 0, 0] = mask[1, 1, 1] = True
    >>> dwi = DiffusionData(data, gtab, np.eye(4), mask)
    >>> dwi.voxels().tolist()
    [[0.0, 1.0], [14.0, 15.0]]
    >>> dwi.unmask(np.array([1.0, 2.0]))[:, :, 1].tolist()
    [[0.0, 0.0], [0.0, 2.0]]
    """

    data: np.ndarray
    gtab: GradientTable
    affine: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        data = np.asarray(self.data, dtype=np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        mask = np.asarray(self.mask, dtype=bool)
        if data.ndim != 4:
            raise InputError("data", f"must be 4D (X, Y, Z, volumes), got shape {data.shape}")
        if data.shape[-1] != len(self.gtab):
            raise InputError(
                "data", f"has {data.shape[-1]} volumes but the gradient table has {len(self.gtab)}"
            )
        if affine.shape != (4, 4):
            raise InputError("affine", f"must have shape (4, 4), got {affine.shape}")
        if mask.shape != data.shape[:3]:
            raise InputError("mask", f"has shape {mask.shape} but the diffusion series has {data.shape[:3]}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "mask", mask)

    def voxels(self) -> np.ndarray:
        """Signals of the voxels inside the mask, shape (N, n), in C (x-major) voxel order."""
        return self.data[self.mask]

    def unmask(self, values: ArrayLike) -> np.ndarray:
        """Scatter per-voxel ``values`` of shape (N, ...) back into an image (X, Y, Z, ...), zeros outside.

        ``N`` must be the number of mask voxels, in the order :meth:`voxels` returns them.
        """
        values = np.asarray(values)
        n_inside = int(self.mask.sum())
        if values.ndim == 0 or values.shape[0] != n_inside:
            raise InputError(
                "values", f"must have {n_inside} rows (one per mask voxel), got shape {values.shape}"
            )
        out = np.zeros(self.mask.shape + values.shape[1:], dtype=values.dtype)
        out[self.mask] = values
        return out


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Image data (float32) and voxel-to-world affine of a NIfTI file, validated.

    Raises
    ------
    InputError
        (source: the path) missing, empty, truncated or unreadable file, or an invalid affine.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty")
    # Compressed or truncated data only fail when read, so the reading belongs inside the guard.
    try:
        img = nib.load(path)
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
        affine = np.asarray(img.affine, dtype=np.float64)
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(path, f"is not a readable NIfTI image ({reason})") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(path, "has an invalid voxel-to-world affine")
    return data, affine


def _first_nonfinite(data: np.ndarray) -> tuple[int, ...] | None:
    bad = ~np.isfinite(data)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), data.shape))


def _shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def read_dwi(
    dwi: str | os.PathLike,
    bvals: str | os.PathLike,
    bvecs: str | os.PathLike,
    mask: str | os.PathLike | None = None,
    b0_threshold: float = 50.0,
) -> DiffusionData:
    """Read and validate a diffusion series, its FSL gradient table and (optionally) a brain mask.

    Parameters
    ----------
    dwi : path
        4D NIfTI (X, Y, Z, volumes). Negative intensities (from scanner rescaling) are accepted.
    bvals, bvecs : path
        FSL gradient files, one entry per volume (b in s/mm²).
    mask : path, optional
        3D NIfTI of the same spatial shape; nonzero = inside. All voxels when omitted.
    b0_threshold : float
        b-values at or below it (s/mm²) count as b = 0.

    Returns
    -------
    DiffusionData

    Raises
    ------
    InputError
        Naming the file at fault: missing, empty, truncated or unreadable image; a 3D image; a
        volume count that differs from the number of b-values; NaN/Inf intensities; any problem of
        the gradient table (see :func:`read_bvals_bvecs`) or of the mask (see :func:`read_mask`).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> gtab = GradientTable([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    >>> write_bvals_bvecs(gtab, d / "dwi.bval", d / "dwi.bvec")
    >>> _ = write_dwi(d / "dwi.nii.gz", np.ones((2, 3, 4, 3)), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> dwi = read_dwi(d / "dwi.nii.gz", d / "dwi.bval", d / "dwi.bvec")
    >>> dwi.data.shape, dwi.data.dtype.name, int(dwi.mask.sum()), dwi.voxels().shape
    ((2, 3, 4, 3), 'float32', 24, (24, 3))
    """
    dwi = Path(dwi)
    gtab = read_bvals_bvecs(bvals, bvecs, b0_threshold)
    data, affine = read_nifti(dwi)
    if data.ndim == 3:
        raise InputError(dwi, "is 3D; a diffusion series must be 4D (X, Y, Z, volumes)")
    if data.ndim != 4:
        raise InputError(
            dwi,
            f"has {data.ndim} dimensions ({_shape_text(data.shape)}); a diffusion series must be 4D (X, Y, Z, volumes)",
        )
    if data.shape[3] != len(gtab):
        raise InputError(dwi, f"has {data.shape[3]} volumes but {Path(bvals).name} has {len(gtab)} b-values")
    where = _first_nonfinite(data)
    if where is not None:
        raise InputError(dwi, f"contains NaN or Inf (first at voxel {where[:3]}, volume {where[3]})")
    mask_array = (
        np.ones(data.shape[:3], dtype=bool) if mask is None else read_mask(mask, shape=data.shape[:3])
    )
    return DiffusionData(data, gtab, affine, mask_array)


def read_mask(path: str | os.PathLike, shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a brain mask: a 3D NIfTI whose nonzero voxels are inside.

    Parameters
    ----------
    path : path
        3D NIfTI (a 4D file with one volume is accepted).
    shape : sequence of 3 ints, optional
        Required spatial shape (that of the diffusion series).

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)

    Raises
    ------
    InputError
        Unreadable file, not 3D, NaN/Inf, wrong shape, or no voxel inside ("mask is empty").

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "mask.nii.gz"
    >>> _ = write_mask(out, np.eye(3)[:, :, None] > 0, np.eye(4))
    >>> int(read_mask(out, shape=(3, 3, 1)).sum())
    3
    """
    path = Path(path)
    data, _ = read_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"has shape {_shape_text(data.shape)}; a mask must be 3D (X, Y, Z)")
    if not np.isfinite(data).all():
        raise InputError(path, "contains NaN or Inf")
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise InputError(
            path, f"has shape {_shape_text(data.shape)} but the diffusion series has {_shape_text(shape)}"
        )
    inside = data != 0
    if not inside.any():
        raise InputError(path, "mask is empty (no nonzero voxel)")
    return inside


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D scalar parameter map (e.g. mean kurtosis).

    Parameters
    ----------
    path : path
        3D NIfTI (a 4D file with one volume is accepted and squeezed).

    Returns
    -------
    data : ndarray of float32, shape (X, Y, Z)
    affine : ndarray of float64, shape (4, 4)

    Raises
    ------
    InputError
        Unreadable file, not 3D, or NaN/Inf values.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "md.nii"
    >>> _ = write_map(out, np.full((2, 2, 2), 0.7e-3), np.eye(4))
    >>> data, affine = read_map(out)
    >>> data.shape, round(float(data[0, 0, 0]), 6)
    ((2, 2, 2), 0.0007)
    """
    path = Path(path)
    data, affine = read_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"has shape {_shape_text(data.shape)}; a scalar map must be 3D (X, Y, Z)")
    where = _first_nonfinite(data)
    if where is not None:
        raise InputError(path, f"contains NaN or Inf (first at voxel {where})")
    return data, affine


def _check_target(path: Path) -> None:
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError(path, "output must be a NIfTI file ending in .nii or .nii.gz")


def _check_affine(path: Path, affine: ArrayLike) -> np.ndarray:
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, "affine must be a numeric 4×4 matrix") from None
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(path, f"affine must be a finite 4×4 matrix, got shape {a.shape}")
    return a


def _check_image(path: Path, data: ArrayLike, ndim: int, what: str) -> np.ndarray:
    a = np.asarray(data)
    if a.dtype != bool and not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.floating):
        raise InputError(path, f"{what} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise InputError(path, f"{what} must be {ndim}D, got shape {a.shape}")
    if a.size == 0:
        raise InputError(path, f"{what} is empty, shape {a.shape}")
    if a.dtype == bool:
        return a
    if not np.isfinite(a).all():
        raise InputError(path, f"{what} contains NaN or Inf")
    if np.abs(a).max() > np.finfo(np.float32).max:
        raise InputError(path, f"{what} has values beyond the float32 range")
    return a.astype(np.float32, copy=False)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    from bioinverse.io import atomic_path

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "msec")
    # atomic_path keeps the full suffix in its temporary name, so nibabel still compresses .nii.gz.
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def write_dwi(path: str | os.PathLike, data: ArrayLike, affine: ArrayLike) -> Path:
    """Atomically write a 4D diffusion series (X, Y, Z, volumes) as float32 NIfTI.

    Parameters
    ----------
    path : path
        Target ending in ``.nii`` or ``.nii.gz`` (compressed).
    data : array_like, shape (X, Y, Z, n)
        Finite intensities.
    affine : array_like, shape (4, 4)
        Voxel → world (mm).

    Returns
    -------
    Path
        ``path``. Nothing is written when validation fails.

    Examples
    --------
    >>> import tempfile
    >>> out = write_dwi(Path(tempfile.mkdtemp()) / "dwi.nii.gz", np.zeros((2, 2, 2, 5)), np.eye(4))
    >>> out.name
    'dwi.nii.gz'
    """
    path = Path(path)
    _check_target(path)
    a = _check_image(path, data, 4, "diffusion series")
    return _save(path, a, _check_affine(path, affine))


def write_map(path: str | os.PathLike, data: ArrayLike, affine: ArrayLike) -> Path:
    """Atomically write a 3D scalar map (X, Y, Z) as float32 NIfTI.

    Parameters
    ----------
    path : path
        Target ending in ``.nii`` or ``.nii.gz``.
    data : array_like, shape (X, Y, Z)
        Finite values (in the map's own unit, e.g. mm²/s for MD).
    affine : array_like, shape (4, 4)
        Voxel → world (mm).

    Returns
    -------
    Path
        ``path``. Nothing is written when validation fails.

    Examples
    --------
    >>> import tempfile
    >>> out = write_map(Path(tempfile.mkdtemp()) / "mk.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    >>> float(read_map(out)[0].sum())
    8.0
    """
    path = Path(path)
    _check_target(path)
    a = _check_image(path, data, 3, "map")
    return _save(path, a, _check_affine(path, affine))


def write_mask(path: str | os.PathLike, mask: ArrayLike, affine: ArrayLike) -> Path:
    """Atomically write a 3D mask (nonzero = inside) as uint8 NIfTI (0 / 1).

    Parameters
    ----------
    path : path
        Target ending in ``.nii`` or ``.nii.gz``.
    mask : array_like, shape (X, Y, Z)
        Boolean or numeric; nonzero voxels are inside.
    affine : array_like, shape (4, 4)
        Voxel → world (mm).

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> out = write_mask(Path(tempfile.mkdtemp()) / "mask.nii", np.ones((2, 2, 1)), np.eye(4))
    >>> read_mask(out).tolist()
    [[[True], [True]], [[True], [True]]]
    """
    path = Path(path)
    _check_target(path)
    a = _check_image(path, mask, 3, "mask")
    return _save(path, (a != 0).astype(np.uint8), _check_affine(path, affine))
