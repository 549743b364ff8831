"""Cryo-EM file formats, validated on read and written atomically.

- MRC/CCP4 maps (:func:`read_map`, :func:`write_map`) and MRCS image stacks (:func:`read_stack`,
  :func:`write_stack`, :func:`read_stack_images`) through ``mrcfile``.
- RELION 3.1 particle STAR files (:class:`Particles`, :func:`read_particles`, :func:`write_particles`,
  :func:`read_particle_stack`) through ``starfile``; RELION 3.0 files (no optics table) are read too.
- Atomic models, PDB or mmCIF, optionally gzipped (:class:`Atoms`, :func:`read_atoms`) through ``gemmi``.

Lengths are Å, angles degrees, defocus Å, spherical aberration mm, voltage kV (RELION's units). Maps are
indexed [z, y, x] and stacks [image, y, x], as ``mrcfile`` returns them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import nonempty_file, positive_number, real_finite_array
from bioinverse.errors import InputError
from bioinverse.io import atomic_path

__all__ = [
    "Atoms",
    "CTFParameters",
    "Particles",
    "read_atoms",
    "read_map",
    "read_map_origin",
    "read_particle_stack",
    "read_particles",
    "read_stack",
    "read_stack_images",
    "write_map",
    "write_particles",
    "write_stack",
]

#: Relative tolerance for pixel sizes that must agree (header against STAR file, x against y).
PIXEL_SIZE_RTOL = 1e-3


# --------------------------------------------------------------------------------------------------
# MRC maps and stacks


@contextlib.contextmanager
def _open_mrc(path: Path, *, mmap: bool = False, header_only: bool = False) -> Iterator:
    """``mrcfile`` handle, strict: truncation and header problems become InputError."""
    import mrcfile

    nonempty_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # mrcfile reports truncation and bad headers as warnings
            if mmap:
                handle = mrcfile.mmap(path, mode="r", permissive=False)
            else:
                handle = mrcfile.open(path, mode="r", permissive=False, header_only=header_only)
    except (ValueError, OSError, RuntimeWarning, EOFError) as exc:
        raise InputError(path, f"is not a valid MRC file ({exc})") from None
    with handle:
        yield handle


def _image_pixel_size(path: Path, mrc) -> float:
    """Pixel size in Å from x and y of the header (z of a stack is the image axis); 0 if unset."""
    sizes = np.array([mrc.voxel_size.x, mrc.voxel_size.y], dtype=np.float64)
    if (sizes < 0).any() or not np.isfinite(sizes).all():
        raise InputError(path, f"has an invalid pixel size {sizes.tolist()} Å in its header")
    if (sizes == 0).any():
        return 0.0
    if np.ptp(sizes) > PIXEL_SIZE_RTOL * sizes.max():
        raise InputError(path, f"has anisotropic pixels {sizes.tolist()} Å")
    return float(sizes[0])


def _stack_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of images, side) of a 2-D image or a 3-D stack; InputError for anything else."""
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise InputError(path, f"holds a {len(shape)}-D array; expected an image or a stack of images")
    if shape[1] != shape[2]:
        raise InputError(path, f"has non-square {shape[2]}×{shape[1]} images (x × y); expected square ones")
    return shape[0], shape[1]


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3-D MRC map.

    Parameters
    ----------
    path : str or os.PathLike
        MRC/CCP4 file.

    Returns
    -------
    data : ndarray, shape (z, y, x), float32
    voxel_size : float
        Å per voxel (from the header; must be positive and isotropic).

    Raises
    ------
    InputError
        Missing, empty, truncated or corrupt file; not 3-D; non-finite values; voxel size missing
        (0) or anisotropic.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "m.mrc"
    >>> write_map(out, np.ones((4, 4, 4)), 1.5)
    >>> data, voxel = read_map(out)
    >>> data.shape, voxel
    ((4, 4, 4), 1.5)
    """
    path = Path(path)
    with _open_mrc(path) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32).copy()
        voxel = mrc.voxel_size
    if data.ndim != 3:
        raise InputError(path, f"holds a {data.ndim}-D array; expected a 3-D map")
    if not np.isfinite(data).all():
        raise InputError(path, "contains NaN or Inf")
    sizes = np.array([voxel.x, voxel.y, voxel.z], dtype=np.float64)
    if (sizes <= 0).any():
        raise InputError(path, "has no voxel size in its header; give it with --pixel-size")
    if np.ptp(sizes) > PIXEL_SIZE_RTOL * sizes.max():
        raise InputError(path, f"has anisotropic voxels {sizes.tolist()} Å")
    return data, float(sizes[0])


def write_map(path: str | os.PathLike, data: np.ndarray, voxel_size: float,
              origin: tuple[float, float, float] | None = None) -> None:
    """Write a 3-D map as MRC (float32) with its voxel size in Å, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.mrc``).
    data : array_like, shape (z, y, x)
    voxel_size : float
        Å per voxel, written to the header (0 leaves it unset).
    origin : (x, y, z) in Å, optional
        Position of the first voxel's centre, written to the header's ``origin`` field (see
        :func:`read_map_origin`); by default 0.
    """
    import mrcfile

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_map expects a 3-D array, got shape {data.shape}")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size
        if origin is not None:
            mrc.header.origin = tuple(float(v) for v in origin)


def read_map_origin(path: str | os.PathLike) -> tuple[float, float, float]:
    """Position in Å (x, y, z) of the centre of a map's first voxel.

    MRC2014 places a map in space in two ways: the ``origin`` field in Å, or the index of the first
    column, row and section (``nxstart``, ``nystart``, ``nzstart``) in voxels. As UCSF Chimera and
    ChimeraX do, a non-zero ``origin`` wins; otherwise the start indices times the voxel size.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "m.mrc"
    >>> write_map(out, np.ones((4, 4, 4)), 1.5, origin=(-3.0, 0.0, 4.5))
    >>> read_map_origin(out)
    (-3.0, 0.0, 4.5)
    """
    path = Path(path)
    with _open_mrc(path, header_only=True) as mrc:
        header = mrc.header
        origin = np.array([header.origin.x, header.origin.y, header.origin.z], dtype=np.float64)
        start = np.array([header.nxstart, header.nystart, header.nzstart], dtype=np.float64)
        voxel = np.array([mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z], dtype=np.float64)
    if not np.isfinite(origin).all():
        raise InputError(path, f"has a non-finite origin {origin.tolist()}")
    position = origin if origin.any() else start * voxel
    return tuple(float(v) for v in position)


def read_stack(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read an MRCS stack of square images (a single 2-D image reads as a stack of one).

    Parameters
    ----------
    path : str or os.PathLike
        MRC/MRCS file holding a 2-D image or a 3-D array of images.

    Returns
    -------
    images : ndarray, shape (n, N, N), float32
        Indexed [image, y, x].
    pixel_size : float
        Å per pixel, from the header's x and y sampling.

    Raises
    ------
    InputError
        Missing, empty, truncated or corrupt file; non-square images; NaN or Inf; pixel size missing
        (0) or anisotropic.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "s.mrcs"
    >>> write_stack(out, np.zeros((3, 8, 8)), 1.2)
    >>> images, px = read_stack(out)
    >>> images.shape, round(px, 3)
    ((3, 8, 8), 1.2)
    """
    path = Path(path)
    with _open_mrc(path) as mrc:
        n, side = _stack_shape(path, mrc.data.shape)
        images = np.asarray(mrc.data, dtype=np.float32).reshape(n, side, side).copy()
        pixel_size = _image_pixel_size(path, mrc)
    if not np.isfinite(images).all():
        raise InputError(path, "contains NaN or Inf")
    if pixel_size == 0:
        raise InputError(path, "has no pixel size in its header")
    return images, pixel_size


def read_stack_images(path: str | os.PathLike, indices: ArrayLike) -> np.ndarray:
    """Read only some images of an MRCS stack, through a memory map (for stacks larger than memory).

    Parameters
    ----------
    path : str or os.PathLike
        MRC/MRCS stack (a 2-D image is a stack of one).
    indices : array_like of int, shape (k,)
        0-based image indices, in any order, repeats allowed.

    Returns
    -------
    images : ndarray, shape (k, N, N), float32
        ``images[j]`` is image ``indices[j]`` of the stack.

    Raises
    ------
    InputError
        The file problems of :func:`read_stack` (the NaN check covers the images read), an index that
        is negative or beyond the stack.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "s.mrcs"
    >>> write_stack(out, np.arange(4.0)[:, None, None] * np.ones((4, 2, 2)), 1.0)
    >>> read_stack_images(out, [3, 1])[:, 0, 0]
    array([3., 1.], dtype=float32)
    """
    images, _ = _read_stack_subset(Path(path), indices)
    return images


def _read_stack_subset(path: Path, indices: ArrayLike) -> tuple[np.ndarray, float]:
    """Images ``indices`` (0-based) of the stack and its header pixel size (0 if unset)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InputError("indices", "must be a 1-D array of integers")
    idx = idx.astype(np.int64)
    with _open_mrc(path, mmap=True) as mrc:
        n, side = _stack_shape(path, mrc.data.shape)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise InputError(path, f"has {n} images; image index {bad} (0-based) is outside the stack")
        images = np.array(np.asarray(mrc.data).reshape(n, side, side)[idx], dtype=np.float32)
        pixel_size = _image_pixel_size(path, mrc)
    if not np.isfinite(images).all():
        raise InputError(path, "contains NaN or Inf")
    return images, pixel_size


def write_stack(path: str | os.PathLike, images: ArrayLike, pixel_size: float) -> None:
    """Write images as an MRCS stack (float32, image-stack header: ``ispg`` 0, ``mz`` 1), atomically.

    RELION reads the result as a stack of n images (``000001@path.mrcs`` is the first).

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.mrcs``).
    images : array_like, shape (n, N, N) or (N, N)
        Square images indexed [image, y, x]; a single 2-D image is written as a stack of one.
    pixel_size : float
        Å per pixel (positive).

    Raises
    ------
    InputError
        Images that are not 2-D/3-D, non-square, empty, NaN or Inf; non-positive pixel size.
    """
    import mrcfile

    data = real_finite_array(images, "images")
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise InputError("images", f"must be square images of shape (n, N, N), got {data.shape}")
    pixel_size = positive_number(pixel_size, "pixel_size", unit="Å")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size


# --------------------------------------------------------------------------------------------------
# RELION particle STAR files

_OPTICS_REQUIRED = (
    "rlnOpticsGroup",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
)
_PARTICLES_REQUIRED = ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
_ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst")
_FLOAT_FORMAT = "%.6f"  # RELION writes 6 decimals too


class CTFParameters(NamedTuple):
    """Per-particle CTF parameters, each an array of shape (n,)."""

    defocus_u: np.ndarray  #: Å
    defocus_v: np.ndarray  #: Å
    defocus_angle: np.ndarray  #: degrees
    voltage: np.ndarray  #: kV
    spherical_aberration: np.ndarray  #: mm
    amplitude_contrast: np.ndarray  #: fraction


@dataclass(eq=False)
class Particles:
    """Particles of a RELION 3.1 STAR file: per-particle metadata and the optics-group table.

    Per-particle fields have length n; optics fields have length G (number of optics groups) and are
    indexed by ``optics_group - 1`` (groups are numbered 1 … G, as RELION numbers them).

    Parameters
    ----------
    image_names : list of str, length n
        RELION image names, ``"000001@particles.mrcs"`` (1-based index ``@`` stack path).
    angles : array_like, shape (n, 3)
        Euler angles rot, tilt, psi in degrees (rlnAngleRot, rlnAngleTilt, rlnAnglePsi).
    origins : array_like, shape (n, 2)
        rlnOriginXAngst, rlnOriginYAngst in Å.
    defocus_u, defocus_v : array_like, shape (n,)
        Defocus in Å (positive is underfocus).
    defocus_angle : array_like, shape (n,)
        Astigmatism angle in degrees.
    optics_group : array_like of int, shape (n,)
        1-based optics group of each particle.
    voltage : array_like, shape (G,)
        Acceleration voltage in kV.
    spherical_aberration : array_like, shape (G,)
        Cs in mm.
    amplitude_contrast : array_like, shape (G,)
        Amplitude contrast fraction in [0, 1).
    pixel_size : array_like, shape (G,)
        Image pixel size in Å (rlnImagePixelSize).
    image_size : array_like of int, shape (G,)
        Image side in pixels (rlnImageSize).
    optics_group_names : list of str, length G, optional
        rlnOpticsGroupName; ``"opticsGroup<g>"`` by default.
    random_subset : array_like of int, shape (n,), optional
        Half set 1 or 2 of each particle (rlnRandomSubset); all 0 (the default) when unassigned.
    micrograph_names : list of str, length n, optional
        rlnMicrographName; written as ``"mic.mrc"`` when unknown.
    original_pixel_size : array_like, shape (G,), optional
        rlnMicrographOriginalPixelSize in Å; ``pixel_size`` by default.
    log_likelihood, max_probability : array_like, shape (n,), optional
        rlnLogLikeliContribution and rlnMaxValueProbDistribution, carried when present.
    has_poses : bool
        False when the file had no angles and origins (e.g. freshly extracted particles); they are then
        zeros and :func:`write_particles` leaves the columns out.
    star_path : pathlib.Path, optional
        The STAR file the particles were read from; image names resolve relative to its folder.

    Examples
    --------
    >>> p = Particles(["000001@a.mrcs", "000002@a.mrcs"], np.zeros((2, 3)), np.zeros((2, 2)),
    ...               [10000.0, 12000.0], [9800.0, 11800.0], [30.0, 30.0], [1, 1],
    ...               voltage=[300.0], spherical_aberration=[2.7], amplitude_contrast=[0.1],
    ...               pixel_size=[1.1], image_size=[64])
    >>> len(p), p.per_particle("voltage").tolist(), p.stack_locations()[1][0]
    (2, [300.0, 300.0], 1)
    """

    image_names: list[str]
    angles: np.ndarray
    origins: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    optics_group: np.ndarray
    voltage: np.ndarray
    spherical_aberration: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size: np.ndarray
    image_size: np.ndarray
    optics_group_names: list[str] | None = None
    random_subset: np.ndarray | None = None
    micrograph_names: list[str] | None = None
    original_pixel_size: np.ndarray | None = None
    log_likelihood: np.ndarray | None = None
    max_probability: np.ndarray | None = None
    has_poses: bool = True
    star_path: Path | None = None

    def __post_init__(self) -> None:
        source = self.star_path if self.star_path is not None else "Particles"
        self.image_names = [str(name) for name in self.image_names]
        n = len(self.image_names)
        if n == 0:
            raise InputError(source, "holds no particles")

        def per_particle(value, label, shape=(n,)):
            a = _finite(value, label, source)
            if a.shape != shape:
                raise InputError(source, f"{label} has shape {a.shape}; expected {shape}")
            return a

        self.angles = per_particle(self.angles, "angles (rlnAngleRot/Tilt/Psi)", (n, 3))
        self.origins = per_particle(self.origins, "origins (rlnOriginX/YAngst)", (n, 2))
        self.defocus_u = per_particle(self.defocus_u, "rlnDefocusU")
        self.defocus_v = per_particle(self.defocus_v, "rlnDefocusV")
        self.defocus_angle = per_particle(self.defocus_angle, "rlnDefocusAngle")
        for label, values in (("rlnDefocusU", self.defocus_u), ("rlnDefocusV", self.defocus_v)):
            if (values <= 0).any():
                first = int(np.flatnonzero(values <= 0)[0])
                raise InputError(source, f"{label} must be positive (Å of underfocus); particle {first + 1} has "
                                 f"{values[first]:g}")
        self.optics_group = _integers(per_particle(self.optics_group, "rlnOpticsGroup"), "rlnOpticsGroup", source)

        groups = len(np.atleast_1d(self.voltage))

        def per_group(value, label):
            a = _finite(value, label, source)
            if a.shape != (groups,):
                raise InputError(source, f"{label} has shape {a.shape}; expected ({groups},), one per optics group")
            return a

        self.voltage = per_group(self.voltage, "rlnVoltage")
        self.spherical_aberration = per_group(self.spherical_aberration, "rlnSphericalAberration")
        self.amplitude_contrast = per_group(self.amplitude_contrast, "rlnAmplitudeContrast")
        self.pixel_size = per_group(self.pixel_size, "rlnImagePixelSize")
        self.image_size = _integers(per_group(self.image_size, "rlnImageSize"), "rlnImageSize", source)
        self.original_pixel_size = (self.pixel_size.copy() if self.original_pixel_size is None
                                    else per_group(self.original_pixel_size, "rlnMicrographOriginalPixelSize"))
        for label, values in (("rlnVoltage", self.voltage), ("rlnImagePixelSize", self.pixel_size),
                              ("rlnImageSize", self.image_size),
                              ("rlnMicrographOriginalPixelSize", self.original_pixel_size)):
            if (values <= 0).any():
                raise InputError(source, f"{label} must be positive; data_optics has {values.tolist()}")
        if ((self.amplitude_contrast < 0) | (self.amplitude_contrast >= 1)).any():
            raise InputError(source, f"rlnAmplitudeContrast must lie in [0, 1); data_optics has "
                             f"{self.amplitude_contrast.tolist()}")
        outside = (self.optics_group < 1) | (self.optics_group > groups)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise InputError(source, f"particle {first + 1} is in optics group {self.optics_group[first]}, which "
                             f"the optics table (groups 1 … {groups}) does not define")
        if self.optics_group_names is None:
            self.optics_group_names = [f"opticsGroup{g}" for g in range(1, groups + 1)]
        self.optics_group_names = [str(name) for name in self.optics_group_names]
        if len(self.optics_group_names) != groups:
            raise InputError(source, f"has {len(self.optics_group_names)} optics group names for {groups} groups")

        if self.random_subset is None:
            self.random_subset = np.zeros(n, dtype=np.int64)
        self.random_subset = _integers(per_particle(self.random_subset, "rlnRandomSubset"), "rlnRandomSubset",
                                       source)
        if not np.isin(self.random_subset, (0, 1, 2)).all():
            raise InputError(source, "rlnRandomSubset must be 1 or 2 (0: unassigned)")
        if (self.random_subset == 0).any() and (self.random_subset != 0).any():
            raise InputError(source, "rlnRandomSubset is set for some particles and not for others")
        if self.micrograph_names is not None:
            self.micrograph_names = [str(name) for name in self.micrograph_names]
            if len(self.micrograph_names) != n:
                raise InputError(source, f"has {len(self.micrograph_names)} micrograph names for {n} particles")
        if self.log_likelihood is not None:
            self.log_likelihood = per_particle(self.log_likelihood, "rlnLogLikeliContribution")
        if self.max_probability is not None:
            self.max_probability = per_particle(self.max_probability, "rlnMaxValueProbDistribution")
        self.has_poses = bool(self.has_poses)
        if self.star_path is not None:
            self.star_path = Path(self.star_path)

    def __len__(self) -> int:
        return len(self.image_names)

    @property
    def n_optics_groups(self) -> int:
        """Number of optics groups G."""
        return len(self.voltage)

    def per_particle(self, name: str) -> np.ndarray:
        """An optics-table field (``"voltage"``, ``"pixel_size"``, …) expanded to one value per particle."""
        table = {"voltage", "spherical_aberration", "amplitude_contrast", "pixel_size", "image_size",
                 "original_pixel_size"}
        if name not in table:
            raise InputError("name", f"must be one of {sorted(table)}, got {name!r}")
        return getattr(self, name)[self.optics_group - 1]

    def ctf_parameters(self) -> CTFParameters:
        """Per-particle CTF parameters (defocus in Å, angle in degrees, kV, mm, fraction)."""
        return CTFParameters(self.defocus_u, self.defocus_v, self.defocus_angle, self.per_particle("voltage"),
                             self.per_particle("spherical_aberration"), self.per_particle("amplitude_contrast"))

    def subset(self, selection: ArrayLike) -> Particles:
        """The particles picked by a boolean mask of length n or by 0-based indices (the optics table is kept).

        Examples
        --------
        >>> p = Particles([f"{i:06d}@a.mrcs" for i in (1, 2, 3)], np.zeros((3, 3)), np.zeros((3, 2)),
        ...               [1e4, 2e4, 3e4], [1e4, 2e4, 3e4], [0.0] * 3, [1] * 3, voltage=[300.0],
        ...               spherical_aberration=[2.7], amplitude_contrast=[0.1], pixel_size=[1.0], image_size=[32])
        >>> p.subset([True, False, True]).defocus_u.tolist(), p.subset([1]).image_names
        ([10000.0, 30000.0], ['000002@a.mrcs'])
        """
        sel = np.asarray(selection)
        n = len(self)
        if sel.dtype == bool:
            if sel.shape != (n,):
                raise InputError("selection", f"boolean mask has shape {sel.shape}; expected ({n},)")
            idx = np.flatnonzero(sel)
        elif sel.size == 0 or np.issubdtype(sel.dtype, np.integer):
            idx = sel.astype(np.int64).ravel()
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise InputError("selection", f"indices must lie in [0, {n}); got {idx.min()} … {idx.max()}")
        else:
            raise InputError("selection", f"must be a boolean mask or integer indices, got dtype {sel.dtype}")

        def pick(value):
            if value is None:
                return None
            if isinstance(value, list):
                return [value[i] for i in idx]
            return value[idx]

        fields = {f: pick(getattr(self, f)) for f in ("image_names", "angles", "origins", "defocus_u", "defocus_v",
                                                      "defocus_angle", "optics_group", "random_subset",
                                                      "micrograph_names", "log_likelihood", "max_probability")}
        return dataclasses.replace(self, **fields)

    def stack_locations(self) -> list[tuple[int, Path]]:
        """Where each particle's image lies: ``(0-based index, stack path)``.

        A relative stack path resolves against the STAR file's folder; when the file is not there but exists
        relative to the working directory (a RELION project directory, where RELION itself resolves names),
        that one is used. Without ``star_path`` names resolve against the working directory. A name without
        ``@`` is a single-image file (index 0).

        Raises
        ------
        InputError
            An image name with an index that is not a positive integer.
        """
        return _locate_images(self.image_names, self.star_path)


def _locate_images(image_names: Sequence[str], star_path: Path | None) -> list[tuple[int, Path]]:
    source = star_path if star_path is not None else "Particles"
    base = star_path.parent if star_path is not None else Path(".")
    resolved: dict[str, Path] = {}
    locations = []
    for k, name in enumerate(image_names):
        number, at, stack = name.partition("@")
        if not at:
            number, stack = "1", name
        try:
            index = int(number)
        except ValueError:
            index = 0
        if index < 1:
            raise InputError(source, f"image name {name!r} of particle {k + 1} needs a 1-based index before '@' "
                             "(e.g. 000001@stack.mrcs)")
        if stack not in resolved:
            path = Path(stack)
            if not path.is_absolute():
                beside = base / path
                path = beside if beside.exists() or not path.exists() else path
            resolved[stack] = path
        locations.append((index - 1, resolved[stack]))
    return locations


def _finite(value, label: str, source) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputError(source, f"{label} must be numeric, got values of type {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError(source, f"{label} contains NaN or Inf")
    return a


def _integers(a: np.ndarray, label: str, source) -> np.ndarray:
    if (a != np.round(a)).any():
        raise InputError(source, f"{label} must hold integers")
    return a.astype(np.int64)


def _columns(block, label_block: str, required: Sequence[str], path: Path) -> None:
    missing = [c for c in required if c not in block.columns]
    if missing:
        raise InputError(path, f"{label_block} lacks the column(s) {', '.join(missing)}")


def _numeric(block, label: str, path: Path) -> np.ndarray:
    import pandas as pd

    column = block[label]
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(values).any():
        first = int(np.flatnonzero(np.isnan(values))[0])
        raise InputError(path, f"{label} of row {first + 1} is {column.iloc[first]!r}, not a number")
    if not np.isfinite(values).all():
        raise InputError(path, f"{label} contains Inf")
    return values


def _strings(block, label: str, path: Path) -> list[str]:
    values = block[label].tolist()
    for k, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "":
            raise InputError(path, f"{label} of row {k + 1} is empty")
    return [str(v) for v in values]


def _read_star(path: Path) -> dict:
    import pandas as pd
    import starfile

    nonempty_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:  # pandas parser errors are ValueErrors
        raise InputError(path, f"is not a valid STAR file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blocks, dict):
        raise InputError(path, "is not a valid STAR file")
    # a block written as key-value pairs instead of a loop_ is a table of one row
    return {name: pd.DataFrame([block]) if isinstance(block, dict) else block for name, block in blocks.items()}


def read_particles(path: str | os.PathLike) -> Particles:
    """Read a RELION particle STAR file (3.1 layout with ``data_optics``; 3.0 files without it too).

    RELION 3.1: ``data_optics`` needs rlnOpticsGroup, rlnVoltage, rlnSphericalAberration,
    rlnAmplitudeContrast, rlnImagePixelSize, rlnImageSize (optics groups numbered 1 … G);
    ``data_particles`` needs rlnImageName, rlnDefocusU, rlnDefocusV, rlnDefocusAngle and rlnOpticsGroup
    (rlnOpticsGroup may be left out when there is a single optics group). Angles
    (rlnAngleRot/Tilt/Psi) and origins (rlnOriginX/YAngst) are optional (zeros, ``has_poses=False``, when
    both are absent).

    RELION 3.0 (one loop of particles, no optics table): rlnVoltage, rlnSphericalAberration and
    rlnAmplitudeContrast per particle; the pixel size from rlnImagePixelSize or from
    rlnDetectorPixelSize (µm) · 10⁴ / rlnMagnification; origins rlnOriginX/Y in pixels (converted to Å);
    the image size from the header of the first referenced stack. Each distinct combination of voltage,
    Cs, amplitude contrast and pixel size becomes one optics group.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.

    Returns
    -------
    Particles
        With ``star_path`` set, so image names resolve relative to the file's folder.

    Raises
    ------
    InputError
        Missing or unreadable file; no ``data_particles`` block; missing columns (named); NaN or
        non-numeric values; defocus ≤ 0; an optics group the optics table lacks; non-positive pixel size.

    Examples
    --------
    >>> import tempfile
    >>> p = Particles(["000001@a.mrcs"], [[10.0, 20.0, 30.0]], [[1.5, -2.0]], [1e4], [9e3], [45.0], [1],
    ...               voltage=[300.0], spherical_aberration=[2.7], amplitude_contrast=[0.1],
    ...               pixel_size=[1.1], image_size=[64])
    >>> out = Path(tempfile.mkdtemp()) / "p.star"
    >>> write_particles(out, p)
    >>> back = read_particles(out)
    >>> back.angles.tolist(), back.origins.tolist(), back.pixel_size.tolist()
    ([[10.0, 20.0, 30.0]], [[1.5, -2.0]], [1.1])
    """
    path = Path(path)
    blocks = _read_star(path)
    if "particles" in blocks:
        if "optics" not in blocks:
            raise InputError(path, "has data_particles but no data_optics block (RELION 3.1 layout); a RELION 3.0 "
                             "file has a single data_ block")
        return _particles_31(path, blocks["optics"], blocks["particles"])
    loops = [b for b in blocks.values() if hasattr(b, "columns") and "rlnImageName" in b.columns]
    if "optics" not in blocks and len(loops) == 1:
        return _particles_30(path, loops[0])
    raise InputError(path, "has no data_particles block with rlnImageName")


def _particles_31(path: Path, optics, block) -> Particles:
    if not hasattr(optics, "columns") or not hasattr(block, "columns"):
        raise InputError(path, "data_optics and data_particles must be loop_ tables")
    _columns(optics, "data_optics", _OPTICS_REQUIRED, path)
    required = list(_PARTICLES_REQUIRED)
    if len(optics) != 1:
        required.append("rlnOpticsGroup")
    _columns(block, "data_particles", required, path)
    if len(block) == 0:
        raise InputError(path, "data_particles holds no particles")
    numbers = _integers(_numeric(optics, "rlnOpticsGroup", path), "rlnOpticsGroup", path)
    if sorted(numbers.tolist()) != list(range(1, len(numbers) + 1)):
        raise InputError(path, f"data_optics numbers its groups {numbers.tolist()}; expected 1 … {len(numbers)}")
    if "rlnImageDimensionality" in optics.columns:
        dims = _numeric(optics, "rlnImageDimensionality", path)
        if (dims != 2).any():
            raise InputError(path, f"rlnImageDimensionality is {dims.tolist()}; only 2-D particle images are "
                             "supported")
    order = np.argsort(numbers)

    def table(label):
        return _numeric(optics, label, path)[order]

    names = (np.asarray(_strings(optics, "rlnOpticsGroupName", path))[order].tolist()
             if "rlnOpticsGroupName" in optics.columns else None)
    original = (table("rlnMicrographOriginalPixelSize") if "rlnMicrographOriginalPixelSize" in optics.columns
                else None)
    group = (_numeric(block, "rlnOpticsGroup", path) if "rlnOpticsGroup" in block.columns
             else np.ones(len(block)))
    angles, origins, has_poses = _poses(path, block, _ORIGIN_LABELS, scale=None)
    return Particles(
        image_names=_strings(block, "rlnImageName", path),
        angles=angles,
        origins=origins,
        defocus_u=_numeric(block, "rlnDefocusU", path),
        defocus_v=_numeric(block, "rlnDefocusV", path),
        defocus_angle=_numeric(block, "rlnDefocusAngle", path),
        optics_group=group,
        voltage=table("rlnVoltage"),
        spherical_aberration=table("rlnSphericalAberration"),
        amplitude_contrast=table("rlnAmplitudeContrast"),
        pixel_size=table("rlnImagePixelSize"),
        image_size=table("rlnImageSize"),
        optics_group_names=names,
        original_pixel_size=original,
        has_poses=has_poses,
        star_path=path,
        **_optional_columns(path, block),
    )


def _poses(path: Path, block, origin_labels, scale) -> tuple[np.ndarray, np.ndarray, bool]:
    n = len(block)
    present_angles = [c for c in _ANGLE_LABELS if c in block.columns]
    present_origins = [c for c in origin_labels if c in block.columns]
    if 0 < len(present_angles) < 3:
        missing = [c for c in _ANGLE_LABELS if c not in block.columns]
        raise InputError(path, f"data_particles has {', '.join(present_angles)} but lacks {', '.join(missing)}")
    if 0 < len(present_origins) < 2:
        missing = [c for c in origin_labels if c not in block.columns]
        raise InputError(path, f"data_particles has {', '.join(present_origins)} but lacks {', '.join(missing)}")
    angles = (np.column_stack([_numeric(block, c, path) for c in _ANGLE_LABELS]) if present_angles
              else np.zeros((n, 3)))
    origins = (np.column_stack([_numeric(block, c, path) for c in origin_labels]) if present_origins
               else np.zeros((n, 2)))
    if scale is not None:
        origins = origins * scale[:, None]
    return angles, origins, bool(present_angles or present_origins)


def _optional_columns(path: Path, block) -> dict:
    out = {}
    if "rlnRandomSubset" in block.columns:
        out["random_subset"] = _numeric(block, "rlnRandomSubset", path)
    if "rlnMicrographName" in block.columns:
        out["micrograph_names"] = _strings(block, "rlnMicrographName", path)
    if "rlnLogLikeliContribution" in block.columns:
        out["log_likelihood"] = _numeric(block, "rlnLogLikeliContribution", path)
    if "rlnMaxValueProbDistribution" in block.columns:
        out["max_probability"] = _numeric(block, "rlnMaxValueProbDistribution", path)
    return out


def _particles_30(path: Path, block) -> Particles:
    required = [*_PARTICLES_REQUIRED, "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
    _columns(block, "the particle table (RELION 3.0 layout, no data_optics)", required, path)
    if len(block) == 0:
        raise InputError(path, "holds no particles")
    if "rlnImagePixelSize" in block.columns:
        pixel = _numeric(block, "rlnImagePixelSize", path)
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(block.columns):
        magnification = _numeric(block, "rlnMagnification", path)
        if (magnification <= 0).any():
            raise InputError(path, "rlnMagnification must be positive")
        pixel = _numeric(block, "rlnDetectorPixelSize", path) * 1e4 / magnification
    else:
        raise InputError(path, "has no optics table and no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize "
                         "with rlnMagnification)")
    if (pixel <= 0).any():
        raise InputError(path, f"has a non-positive pixel size ({pixel.min():g} Å)")
    per_particle = np.column_stack([_numeric(block, "rlnVoltage", path),
                                    _numeric(block, "rlnSphericalAberration", path),
                                    _numeric(block, "rlnAmplitudeContrast", path), pixel])
    _, first, group = np.unique(per_particle, axis=0, return_index=True, return_inverse=True)
    # number groups in order of first appearance, as RELION's converter does
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group = rank[group.ravel()]
    rows = per_particle[np.sort(first)]
    image_names = _strings(block, "rlnImageName", path)
    angles, origins, has_poses = _poses(path, block, ("rlnOriginX", "rlnOriginY"), scale=pixel)
    stack = _locate_images(image_names[:1], path)[0][1]
    try:
        with _open_mrc(stack, header_only=True) as mrc:
            side = int(mrc.header.nx)
    except InputError as exc:
        raise InputError(path, f"has no optics table, so the image size is read from {exc}") from None
    return Particles(
        image_names=image_names,
        angles=angles,
        origins=origins,
        defocus_u=_numeric(block, "rlnDefocusU", path),
        defocus_v=_numeric(block, "rlnDefocusV", path),
        defocus_angle=_numeric(block, "rlnDefocusAngle", path),
        optics_group=group + 1,
        voltage=rows[:, 0],
        spherical_aberration=rows[:, 1],
        amplitude_contrast=rows[:, 2],
        pixel_size=rows[:, 3],
        image_size=np.full(len(rows), side),
        has_poses=has_poses,
        star_path=path,
        **_optional_columns(path, block),
    )


def write_particles(path: str | os.PathLike, particles: Particles) -> None:
    """Write particles as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``), atomically.

    ``data_optics``: rlnOpticsGroupName, rlnOpticsGroup, rlnMicrographOriginalPixelSize, rlnVoltage,
    rlnSphericalAberration, rlnAmplitudeContrast, rlnImagePixelSize, rlnImageSize, rlnImageDimensionality (2).
    ``data_particles``: rlnImageName, rlnMicrographName (``"mic.mrc"`` when unknown), rlnAngleRot,
    rlnAngleTilt, rlnAnglePsi, rlnOriginXAngst, rlnOriginYAngst (these five only when ``has_poses``),
    rlnDefocusU, rlnDefocusV, rlnDefocusAngle, rlnCtfBfactor (0), rlnPhaseShift (0), rlnOpticsGroup,
    then rlnRandomSubset, rlnLogLikeliContribution and rlnMaxValueProbDistribution when set. Image names are
    written as they are, so relative stack paths must hold relative to the destination's folder.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.star``).
    particles : Particles
    """
    import pandas as pd
    import starfile

    if not isinstance(particles, Particles):
        raise InputError("particles", f"must be a Particles, got {type(particles).__name__}")
    p = particles
    groups = np.arange(1, p.n_optics_groups + 1)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": p.optics_group_names,
        "rlnOpticsGroup": groups,
        "rlnMicrographOriginalPixelSize": p.original_pixel_size,
        "rlnVoltage": p.voltage,
        "rlnSphericalAberration": p.spherical_aberration,
        "rlnAmplitudeContrast": p.amplitude_contrast,
        "rlnImagePixelSize": p.pixel_size,
        "rlnImageSize": p.image_size,
        "rlnImageDimensionality": np.full(len(groups), 2),
    })
    n = len(p)
    columns: dict[str, object] = {
        "rlnImageName": p.image_names,
        "rlnMicrographName": p.micrograph_names if p.micrograph_names is not None else ["mic.mrc"] * n,
    }
    if p.has_poses:
        columns.update(zip(_ANGLE_LABELS, p.angles.T))
        columns.update(zip(_ORIGIN_LABELS, p.origins.T))
    columns.update({
        "rlnDefocusU": p.defocus_u,
        "rlnDefocusV": p.defocus_v,
        "rlnDefocusAngle": p.defocus_angle,
        "rlnCtfBfactor": np.zeros(n),
        "rlnPhaseShift": np.zeros(n),
        "rlnOpticsGroup": p.optics_group,
    })
    if (p.random_subset != 0).any():
        columns["rlnRandomSubset"] = p.random_subset
    if p.log_likelihood is not None:
        columns["rlnLogLikeliContribution"] = p.log_likelihood
    if p.max_probability is not None:
        columns["rlnMaxValueProbDistribution"] = p.max_probability
    table = pd.DataFrame(columns)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": table}, tmp, float_format=_FLOAT_FORMAT)
        # RELION 3.1 marks each block with its table version; the package's own banner is dropped
        lines = [line for line in tmp.read_text().splitlines() if not line.startswith("# Created by")]
        text = "\n".join(f"\n# version 30001\n\n{line}" if line.startswith("data_") else line for line in lines)
        tmp.write_text(text.lstrip("\n") + "\n")


def read_particle_stack(star_path: str | os.PathLike) -> tuple[np.ndarray, Particles]:
    """Read a particle STAR file and every image it references (one memory-mapped read per stack file).

    Parameters
    ----------
    star_path : str or os.PathLike
        RELION particle STAR file; stacks resolve as in :meth:`Particles.stack_locations`.

    Returns
    -------
    images : ndarray, shape (n, N, N), float32
        ``images[k]`` is particle k's image, indexed [y, x].
    particles : Particles

    Raises
    ------
    InputError
        Anything :func:`read_particles` rejects; a referenced stack that is missing or invalid; an image
        index < 1 or beyond its stack; images whose size is not rlnImageSize or not square; particles of
        different image sizes; a header pixel size that differs from rlnImagePixelSize by more than 0.1 %
        (a header pixel size of 0, i.e. unset, is accepted).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_stack(folder / "a.mrcs", np.arange(3.0)[:, None, None] * np.ones((3, 4, 4)), 2.0)
    >>> p = Particles(["000003@a.mrcs", "000001@a.mrcs"], np.zeros((2, 3)), np.zeros((2, 2)),
    ...               [1e4, 1e4], [1e4, 1e4], [0.0, 0.0], [1, 1], voltage=[300.0],
    ...               spherical_aberration=[2.7], amplitude_contrast=[0.1], pixel_size=[2.0], image_size=[4])
    >>> write_particles(folder / "p.star", p)
    >>> images, _ = read_particle_stack(folder / "p.star")
    >>> images[:, 0, 0].tolist()
    [2.0, 0.0]
    """
    star_path = Path(star_path)
    particles = read_particles(star_path)
    sizes = np.unique(particles.per_particle("image_size"))
    if sizes.size != 1:
        raise InputError(star_path, f"mixes particles of image sizes {sizes.tolist()} px; read one optics group "
                         "at a time (Particles.subset)")
    side = int(sizes[0])
    locations = particles.stack_locations()
    by_stack: dict[Path, list[int]] = {}
    for k, (_, stack) in enumerate(locations):
        by_stack.setdefault(stack, []).append(k)
    index = np.array([i for i, _ in locations], dtype=np.int64)
    expected_pixel = particles.per_particle("pixel_size")
    images = np.empty((len(particles), side, side), dtype=np.float32)
    for stack, members in by_stack.items():
        members = np.asarray(members)
        if not stack.is_file():
            raise InputError(star_path, f"references the stack {stack}, which does not exist")
        with _open_mrc(stack, header_only=True) as mrc:
            n_images, stack_side = _stack_shape(stack, (int(mrc.header.nz), int(mrc.header.ny),
                                                        int(mrc.header.nx)))
        if stack_side != side:
            raise InputError(stack, f"has {stack_side}×{stack_side} px images but {star_path} gives rlnImageSize "
                             f"{side}")
        beyond = index[members] >= n_images
        if beyond.any():
            k = int(members[beyond][0])
            raise InputError(star_path, f"image {particles.image_names[k]!r} (particle {k + 1}) is beyond the "
                             f"{n_images} images of {stack}")
        block, header_pixel = _read_stack_subset(stack, index[members])
        if header_pixel != 0:
            wanted = np.unique(expected_pixel[members])
            off = np.abs(wanted - header_pixel) > PIXEL_SIZE_RTOL * wanted
            if off.any():
                raise InputError(stack, f"has pixel size {header_pixel:g} Å in its header but {star_path} gives "
                                 f"rlnImagePixelSize {wanted[off][0]:g} Å")
        images[members] = block
    return images, particles


# --------------------------------------------------------------------------------------------------
# Atomic models


@dataclass(eq=False)
class Atoms:
    """Atoms of a structural model.

    Parameters
    ----------
    positions : array_like, shape (n, 3)
        Cartesian (x, y, z) in Å.
    elements : array_like of str, shape (n,)
        Element symbols, upper case (``"C"``, ``"FE"``).
    b_factors : array_like, shape (n,), optional
        Isotropic B-factors in Å² (zeros by default).
    occupancies : array_like, shape (n,), optional
        Occupancies in [0, 1] (ones by default).
    name : str
        What the atoms came from (the file), used in error messages.

    Examples
    --------
    >>> atoms = Atoms([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], ["c", "o"])
    >>> len(atoms), atoms.elements.tolist(), atoms.occupancies.tolist()
    (2, ['C', 'O'], [1.0, 1.0])
    """

    positions: np.ndarray
    elements: np.ndarray
    b_factors: np.ndarray | None = None
    occupancies: np.ndarray | None = None
    name: str = "atoms"

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.positions = _finite(self.positions, "positions", self.name)
        if self.positions.ndim != 2 or self.positions.shape[1] != 3:
            raise InputError(self.name, f"positions must have shape (n, 3), got {self.positions.shape}")
        n = self.positions.shape[0]
        if n == 0:
            raise InputError(self.name, "holds no atoms")
        self.elements = np.array([str(e).strip().upper() for e in np.atleast_1d(self.elements)])
        if self.elements.shape != (n,):
            raise InputError(self.name, f"has {self.elements.size} elements for {n} atoms")
        self.b_factors = np.zeros(n) if self.b_factors is None else _finite(self.b_factors, "b_factors", self.name)
        self.occupancies = (np.ones(n) if self.occupancies is None
                            else _finite(self.occupancies, "occupancies", self.name))
        for label, values in (("b_factors", self.b_factors), ("occupancies", self.occupancies)):
            if values.shape != (n,):
                raise InputError(self.name, f"{label} has shape {values.shape}; expected ({n},)")
        if ((self.occupancies < 0) | (self.occupancies > 1)).any():
            raise InputError(self.name, "occupancies must lie in [0, 1]")

    def __len__(self) -> int:
        return self.positions.shape[0]


# Elements of standard amino acids and nucleotides (selenomethionine's Se included).
_POLYMER_ELEMENTS = frozenset({"H", "C", "N", "O", "S", "P", "Se", "D"})


def _pdb_without_elements(path: Path) -> bool:
    """True for a PDB file none of whose ATOM/HETATM records fills the element columns (77–78)."""
    import gzip

    name = path.name.lower()
    if ".cif" in name or ".mmcif" in name:
        return False
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as fh:
        for line in fh:
            if line.startswith(("ATOM  ", "HETATM")) and line[76:78].strip():
                return False
    return True


def read_atoms(path: str | os.PathLike, keep_waters: bool = False) -> Atoms:
    """Read the first model of an atomic structure (PDB, mmCIF, either optionally gzipped) through gemmi.

    Hydrogens are kept when present; every alternative conformation is kept with its occupancy.

    Parameters
    ----------
    path : str or os.PathLike
        ``.pdb``, ``.ent``, ``.cif``, ``.mmcif`` (``.gz`` allowed).
    keep_waters : bool
        Keep water molecules (removed by default).

    Returns
    -------
    Atoms
        ``name`` is the file path.

    Raises
    ------
    InputError
        Missing, empty or unparseable file; no atoms in the first model (after removing waters).

    Examples
    --------
    >>> import tempfile
    >>> pdb = Path(tempfile.mkdtemp()) / "m.pdb"
    >>> _ = pdb.write_text(
    ...     "ATOM      1  CA  GLY A   1       1.000   2.000   3.000  1.00 20.00           C\\n"
    ...     "HETATM    2  O   HOH A   2       4.000   5.000   6.000  1.00 30.00           O\\nEND\\n")
    >>> atoms = read_atoms(pdb)
    >>> atoms.positions.tolist(), atoms.elements.tolist(), atoms.b_factors.tolist()
    ([[1.0, 2.0, 3.0]], ['C'], [20.0])
    >>> len(read_atoms(pdb, keep_waters=True))
    2
    """
    import gemmi

    path = Path(path)
    nonempty_file(path)
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(path, f"is not a readable PDB or mmCIF file ({exc})") from None
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise InputError(path, "contains no atoms (is it a PDB or mmCIF file?)")
    if not keep_waters:
        structure.remove_waters()
    guessed = _pdb_without_elements(path)
    model = structure[0]
    positions, elements, b_factors, occupancies = [], [], [], []
    for chain in model:
        for residue in chain:
            info = gemmi.find_tabulated_residue(residue.name)
            polymer = residue.het_flag == "A" or (
                info is not None and (info.is_amino_acid() or info.is_nucleic_acid()))
            for atom in residue:
                positions.append((atom.pos.x, atom.pos.y, atom.pos.z))
                element = atom.element.name
                if polymer and element not in _POLYMER_ELEMENTS and (guessed or element == "X"):
                    # PDB files without element columns (CHARMM, some MD tools) leave gemmi to guess
                    # from the name's first two letters: "CA", "HG", "SG" become calcium, mercury, ...
                    # Polymer atoms are named after their element's first letter.
                    element = atom.name.lstrip("0123456789")[:1].upper() or element
                elements.append(element)
                b_factors.append(atom.b_iso)
                occupancies.append(atom.occ)
    if not positions:
        raise InputError(path, "contains only waters; read it with keep_waters=True")
    return Atoms(np.array(positions, dtype=np.float64), elements, np.array(b_factors, dtype=np.float64),
                 np.array(occupancies, dtype=np.float64), name=str(path))



# --------------------------------------------------------------------------------------------------
# FSC tables

__all__ += ["read_fsc_star", "write_fsc_star"]

# RELION's FSC columns, in the order they are looked for: its postprocessing writes the corrected FSC,
# its refinement's model files the gold-standard FSC of the halves.
_FSC_LABELS = ("rlnFourierShellCorrelation", "rlnFourierShellCorrelationCorrected", "rlnGoldStandardFsc")
# rlnAngstromResolution RELION writes for shell 0 (infinite resolution).
_DC_ANGSTROM = 999.0


def write_fsc_star(path: str | os.PathLike, curve) -> None:
    """Write an FSC curve as a RELION ``data_fsc`` table, atomically.

    One row per Fourier shell s = 0 … N/2: rlnSpectralIndex (s), rlnResolution (the shell's frequency
    s / (N · pixel size) in 1/Å), rlnAngstromResolution (1 / frequency in Å; 999 for s = 0, as RELION
    writes it) and rlnFourierShellCorrelation, with 6 decimals as RELION writes them.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.star``).
    curve : bioinverse.fourier.FSCCurve
        From :func:`bioinverse.fourier.fsc`, or built from a per-shell FSC array.

    Raises
    ------
    InputError
        ``curve`` is not an FSCCurve.

    Examples
    --------
    >>> import tempfile
    >>> from bioinverse.fourier import FSCCurve
    >>> out = Path(tempfile.mkdtemp()) / "fsc.star"
    >>> write_fsc_star(out, FSCCurve([0.0, 0.125, 0.25], [1.0, 0.8, 0.1], [1, 18, 35], 2.0))
    >>> out.read_text().split("loop_")[1].split()[-4:]
    ['2', '0.250000', '4.000000', '0.100000']
    """
    import pandas as pd
    import starfile

    from bioinverse.fourier import FSCCurve

    if not isinstance(curve, FSCCurve):
        raise InputError("curve", f"must be an FSCCurve, got {type(curve).__name__}")
    angstrom = np.full(len(curve), _DC_ANGSTROM)
    np.divide(1.0, curve.frequency, out=angstrom, where=curve.frequency > 0)
    table = pd.DataFrame({
        "rlnSpectralIndex": np.arange(len(curve)),
        "rlnResolution": curve.frequency,
        "rlnAngstromResolution": angstrom,
        "rlnFourierShellCorrelation": curve.values,
    })
    with atomic_path(path) as tmp:
        starfile.write({"fsc": table}, tmp, float_format=_FLOAT_FORMAT)
        lines = [line for line in tmp.read_text().splitlines() if not line.startswith("# Created by")]
        text = "\n".join(f"\n# version 30001\n\n{line}" if line.startswith("data_") else line for line in lines)
        tmp.write_text(text.lstrip("\n") + "\n")


def _shell_counts(box: int) -> np.ndarray:
    """Fourier coefficients of an N³ box in each shell 0 … N/2, as :func:`bioinverse.fourier.fsc` counts them.

    Summed one plane at a time: a whole N³ index grid would not fit in memory for large boxes.
    """
    m = np.arange(box) - box // 2
    in_plane = m[:, None] ** 2 + m[None, :] ** 2
    n_shells = box // 2 + 1
    counts = np.zeros(n_shells, dtype=np.int64)
    for kz in m:
        shells = np.rint(np.sqrt(in_plane + kz * kz)).astype(np.intp)
        counts += np.bincount(shells.ravel(), minlength=n_shells)[:n_shells]
    return counts


def read_fsc_star(path: str | os.PathLike, column: str | None = None):
    """Read an FSC curve from a STAR file: :func:`write_fsc_star`'s, or RELION's.

    The table is the first block holding ``column`` — by default the first of rlnFourierShellCorrelation
    (:func:`write_fsc_star`), rlnFourierShellCorrelationCorrected (``relion_postprocess``'s
    ``postprocess.star``) and rlnGoldStandardFsc (``relion_refine``'s ``run_model.star``) found, in that
    order, searching ``data_fsc`` first. Its rows must be the shells 0 … N/2 of an N³ box (rlnSpectralIndex,
    when present, must count 0, 1, 2, …), so N = 2 × (rows − 1); the pixel size is half the
    rlnAngstromResolution of the last row (Nyquist), or 1 / (2 rlnResolution) without that column, and
    every row's rlnResolution must equal s / (N · pixel size). ``n_coefficients`` are the counts of an N³
    box (the file does not hold them). The frequency of shell 0 is 0 whatever the file says (RELION writes
    1/999 Å⁻¹ there).

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.
    column : str, optional
        The FSC column to read (e.g. ``"rlnFourierShellCorrelationUnmaskedMaps"``).

    Returns
    -------
    bioinverse.fourier.FSCCurve

    Raises
    ------
    InputError
        Missing or unreadable file; no table with the FSC column and rlnResolution; fewer than two rows;
        shells not numbered 0, 1, 2, …; frequencies that are not those of shells 0 … N/2 of one box.

    Examples
    --------
    >>> import tempfile
    >>> from bioinverse.fourier import FSCCurve
    >>> out = Path(tempfile.mkdtemp()) / "fsc.star"
    >>> write_fsc_star(out, FSCCurve([0.0, 0.125, 0.25], [1.0, 0.8, 0.1], [1, 18, 35], 2.0))
    >>> curve = read_fsc_star(out)
    >>> curve.values.tolist(), curve.pixel_size, curve.n_coefficients.tolist()
    ([1.0, 0.8, 0.1], 2.0, [1, 18, 35])
    """
    from bioinverse.fourier import FSCCurve

    path = Path(path)
    blocks = _read_star(path)
    names = sorted(blocks, key=lambda name: name != "fsc")  # data_fsc first, the others in file order
    labels = (column,) if column is not None else _FSC_LABELS
    found = None
    for label in labels:
        for name in names:
            block = blocks[name]
            if hasattr(block, "columns") and label in block.columns and "rlnResolution" in block.columns:
                found = block, label
                break
        if found is not None:
            break
    if found is None:
        raise InputError(path, f"has no table with rlnResolution and {' or '.join(labels)}")
    block, label = found
    rows = len(block)
    if rows < 2:
        raise InputError(path, f"its FSC table has {rows} row(s); it needs the shells 0 … N/2 of a box")
    if "rlnSpectralIndex" in block.columns:
        index = _numeric(block, "rlnSpectralIndex", path)
        if (index != np.arange(rows)).any():
            raise InputError(path, "rlnSpectralIndex must count the shells 0, 1, 2, … in order")
    frequency = _numeric(block, "rlnResolution", path)
    values = _numeric(block, label, path)
    box = 2 * (rows - 1)
    if "rlnAngstromResolution" in block.columns:
        pixel_size = 0.5 * float(_numeric(block, "rlnAngstromResolution", path)[-1])
    else:
        pixel_size = 0.5 / float(frequency[-1]) if frequency[-1] > 0 else 0.0
    if not pixel_size > 0:
        raise InputError(path, "its last FSC row has no positive resolution; it must be the Nyquist shell")
    expected = np.arange(rows) / (box * pixel_size)
    # Shell 0 is left out: RELION writes 1/999 Å there, the reciprocal of its stand-in for infinity.
    if not np.allclose(frequency[1:], expected[1:], rtol=1e-3, atol=2e-6):
        raise InputError(path, f"rlnResolution is not s / (N · pixel size) of shells s = 0 … {rows - 1} of a "
                         f"{box}-voxel box at {pixel_size:g} Å (does the table end at Nyquist?)")
    return FSCCurve(frequency=expected, values=values, n_coefficients=_shell_counts(box), pixel_size=pixel_size)
