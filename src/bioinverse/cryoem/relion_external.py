r"""Our priors inside RELION: an executable for RELION 3.1's ``--external_reconstruct`` (seed 002 §3.3).

With ``--external_reconstruct``, ``relion_refine`` hands every reconstruction of its M-step to the program
named by the environment variable ``RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE``: it writes the accumulators
and a STAR file, runs ``$RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE <name>_external_reconstruct.star`` (through
the shell, so the variable may carry options before the file) and waits for the result map. The STAR file
(paths relative to RELION's working directory) holds

* block ``external_reconstruct_general``: ``rlnExtReconsDataReal``, ``rlnExtReconsDataImag`` (B) and
  ``rlnExtReconsWeight`` (K), MRC files of shape (P, P, P/2 + 1) in FFTW's half-complex order (frequency 0
  at [0, 0, 0]) on the padded grid P = padding · N; ``rlnExtReconsResult``, the map to write (N³, real
  space); ``rlnTau2FudgeFactor``, ``rlnPaddingFactor``, ``rlnReferenceDimensionality``,
  ``rlnOriginalImageSize`` (N) and ``rlnCurrentImageSize`` (the band of the iteration);
* loop ``external_reconstruct_tau2``: ``rlnSpectralIndex`` (shells of the N-box), ``rlnReferenceTau2`` and
  ``rlnGoldStandardFsc``. (``relion_reconstruct --external_reconstruct`` writes the two columns the other
  way round; ``relion_refine``, the program this serves, writes them as named.)

:func:`reconstruct_external` reproduces RELION's own reconstruction of these files
(``BackProjector::reconstruct`` without iterative gridding, as ``--skip_gridding``):

1. the MAP term: for :math:`|k| < r_{\max}` (padded pixels, :math:`r_{\max}` = round(padding · current
   size / 2)), :math:`K \mathrel{+}= \tau^{-2} = 1 / (\text{padding}^3\, \text{fudge}\, \tau^2[\text{round}(|k| /
   \text{padding})])`, or :math:`1/(0.001\,\text{padding}^3 K)` where :math:`\tau^2 = 0`;
2. the floor: :math:`K \ge` 1/1000 of its mean over the shell :math:`\lfloor |k| / \text{padding} \rfloor`;
3. :math:`F = B / K`, 0 beyond :math:`r_{\max}`; inverse FFT of the P-grid, the central N³ window, divided
   by :math:`\text{padding}^3 N`; the soft spherical mask of radius N/2 (cosine edge of 3 pixels, the
   background the edge-weighted mean beyond); divided by the radial gridding kernel
   :math:`\operatorname{sinc}^2(|r| / P)`.

Checked against ``relion_reconstruct --skip_gridding`` on RELION's own dumps: without the MAP term to
float32 round-off: 2·10⁻⁸ relative without the MAP term, 2·10⁻⁷ with it.

RED and CW-RED change step 3's numerator as eq. 17 does: :math:`F = (B + \lambda \tau^{-2} D) / (K +
\tau^{-2})` with :math:`D` the denoiser's output on the unregularised map :math:`\tilde x` (steps 2–3
without the MAP term), carried back into the same Fourier units by the exact inverse of step 3's
window, scaling and gridding correction. λ = 0 gives RELION's Gaussian result exactly; CW-RED sets λ from
the nominal resolution of the STAR file's FSC column (:mod:`bioinverse.cryoem.priors`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bioinverse.cryoem.priors import GAUSSIAN, WEIGHT_FLOOR, Prior, nominal_resolution
from bioinverse.errors import InputError

__all__ = ["ExternalReconstruction", "read_external_reconstruct", "reconstruct_external", "run_external"]

# RELION's constants: the stand-in for τ² = 0, the mask edge.
_ZERO_TAU2_FRACTION = 1e-3
_MASK_EDGE = 3.0


@dataclass
class ExternalReconstruction:
    """One reconstruction RELION asks for.

    Attributes
    ----------
    star : Path
    numerator : ndarray, complex128, shape (P, P, P // 2 + 1)
        B in FFTW half-complex order.
    weight : ndarray, float64, same shape
        K.
    result, result_star : Path
        Where RELION waits for the map, and the optional STAR file of updated τ² (not written here).
    tau2_fudge, padding : float
    original_size, current_size : int
    tau2, fsc : ndarray, shape (N // 2 + 1,), or None
        Per shell of the N-box; None when the file has no τ² table (RELION then does not regularise, and
        neither does this).
    """

    star: Path
    numerator: np.ndarray
    weight: np.ndarray
    result: Path
    result_star: Path
    tau2_fudge: float
    padding: float
    original_size: int
    current_size: int
    tau2: np.ndarray | None
    fsc: np.ndarray | None


def _resolve(star: Path, name: str) -> Path:
    """RELION writes paths relative to its working directory, which is ours; else try the STAR's folder."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    beside = star.parent / path
    return beside if beside.exists() else path


def _read_half_complex(path: Path, shape: tuple | None) -> np.ndarray:
    from bioinverse.cryoem.io import _open_mrc

    with _open_mrc(path) as mrc:
        data = np.array(mrc.data, dtype=np.float64)
    if data.ndim != 3 or data.shape[2] != data.shape[0] // 2 + 1 or data.shape[0] != data.shape[1]:
        raise InputError(path, f"has shape {data.shape}; RELION's half-complex grid is (P, P, P/2 + 1)")
    if shape is not None and data.shape != shape:
        raise InputError(path, f"has shape {data.shape}, the other accumulators {shape}")
    if not np.isfinite(data).all():
        raise InputError(path, "contains NaN or Inf")
    return data


def read_external_reconstruct(star: str | os.PathLike) -> ExternalReconstruction:
    """Read and check the STAR file and the B, K maps of one external reconstruction.

    Raises
    ------
    InputError
        A missing block, field or file; a 2-D reconstruction; accumulators of the wrong shape or with NaN;
        negative weights; a τ² table shorter than N/2 + 1 shells or with negative values.
    """
    from bioinverse.cryoem.io import _read_star

    star = Path(star)
    blocks = _read_star(star)
    if "external_reconstruct_general" not in blocks:
        raise InputError(star, "has no data_external_reconstruct_general block: not a RELION external-reconstruct file")
    general = blocks["external_reconstruct_general"].iloc[0]
    table = blocks.get("external_reconstruct_tau2")  # absent when RELION does not regularise
    fields = ("rlnExtReconsDataReal", "rlnExtReconsDataImag", "rlnExtReconsWeight", "rlnExtReconsResult",
              "rlnTau2FudgeFactor", "rlnPaddingFactor", "rlnOriginalImageSize")
    for name in fields:
        if name not in general:
            raise InputError(star, f"lacks _{name}")
    for name in ("rlnSpectralIndex", "rlnReferenceTau2", "rlnGoldStandardFsc") if table is not None else ():
        if name not in table:
            raise InputError(star, f"lacks the column _{name} of its τ² table")
    if int(general.get("rlnReferenceDimensionality", 3)) != 3:
        raise InputError(star, "asks for a 2-D reconstruction; only 3-D maps are supported")
    try:
        fudge, padding = float(general["rlnTau2FudgeFactor"]), float(general["rlnPaddingFactor"])
        size = int(general["rlnOriginalImageSize"])
        current = int(general.get("rlnCurrentImageSize", size))
        if table is not None:
            index = np.asarray(table["rlnSpectralIndex"], dtype=np.int64)
            tau2 = np.asarray(table["rlnReferenceTau2"], dtype=np.float64)
            fsc = np.asarray(table["rlnGoldStandardFsc"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(star, f"has a non-numeric setting ({exc})") from None
    if not (fudge > 0 and padding >= 1 and size >= 2 and 0 < current <= size):
        raise InputError(star, f"has invalid settings: fudge {fudge}, padding {padding}, sizes {size}/{current}")
    if table is None:
        tau2 = fsc = None
    else:
        if len(index) < size // 2 + 1 or not np.array_equal(index[: size // 2 + 1], np.arange(size // 2 + 1)):
            raise InputError(star, f"needs τ² for shells 0 … {size // 2} in order")
        if not (np.isfinite(tau2).all() and np.isfinite(fsc).all()) or (tau2 < 0).any():
            raise InputError(star, "has a non-finite or negative τ²")
        tau2, fsc = tau2[: size // 2 + 1], fsc[: size // 2 + 1]
    real = _read_half_complex(_resolve(star, str(general["rlnExtReconsDataReal"])), None)
    imag = _read_half_complex(_resolve(star, str(general["rlnExtReconsDataImag"])), real.shape)
    weight_path = _resolve(star, str(general["rlnExtReconsWeight"]))
    weight = _read_half_complex(weight_path, real.shape)
    if (weight < 0).any():
        raise InputError(weight_path, "has negative weights")
    if real.shape[0] != round(padding * size):
        raise InputError(star, f"padding {padding:g} × size {size} does not match the {real.shape[0]}-voxel grid")
    result = Path(str(general["rlnExtReconsResult"]))
    result_star = Path(str(general.get("rlnExtReconsResultStarfile", result.with_suffix(".star"))))
    return ExternalReconstruction(star, real + 1j * imag, weight, result, result_star, fudge, padding, size,
                                  current, tau2, fsc)


class _Geometry:
    """Radii of the padded half-complex grid and of the N-box, and the two real↔Fourier maps of step 3."""

    def __init__(self, padded: int, size: int, padding: float, current_size: int):
        self.P, self.N, self.padding = padded, size, padding
        k = np.fft.fftfreq(padded, 1.0 / padded)
        kx = np.arange(padded // 2 + 1)
        self.r2 = np.rint(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2).astype(np.int64)
        self.radius = np.sqrt(self.r2)
        self.r_max = current_size // 2
        self.max_r2 = round(self.r_max * padding) ** 2
        grid = np.arange(size) - size // 2
        self.r_real = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
        self.gridding = np.sinc(self.r_real / (size * padding)) ** 2
        self.norm = padding**3 * size

    def floored(self, weight: np.ndarray) -> np.ndarray:
        """K raised to 1/1000 of its mean over the shell floor(|k| / padding) (RELION's floor)."""
        shell = np.floor(self.radius / self.padding).astype(np.int64)
        inside = self.r2 < round((self.r_max * self.padding) ** 2)
        sums = np.bincount(shell[inside], weights=weight[inside], minlength=self.r_max)[: self.r_max]
        counts = np.bincount(shell[inside], minlength=self.r_max)[: self.r_max]
        floor = WEIGHT_FLOOR * sums / np.maximum(counts, 1)
        return np.maximum(weight, floor[np.minimum(shell, self.r_max - 1)])

    def to_map(self, spectrum: np.ndarray) -> np.ndarray:
        """Step 3: inverse FFT, window, normalisation, soft mask, gridding correction."""
        P, N = self.P, self.N
        volume = np.fft.fftshift(np.fft.irfftn(spectrum, s=(P, P, P), axes=(0, 1, 2))) * P**3
        lo = P // 2 - N // 2
        window = volume[lo : lo + N, lo : lo + N, lo : lo + N] / self.norm
        radius = N / 2.0
        edge = np.clip((self.r_real - radius) / _MASK_EDGE, 0.0, 1.0)
        outside = np.where(self.r_real < radius, 0.0, 0.5 - 0.5 * np.cos(np.pi * edge))  # 0 inside → 1 beyond
        background = (outside * window).sum() / outside.sum() if outside.sum() > 0 else 0.0
        window = (1.0 - outside) * window + outside * background
        return window / self.gridding

    def to_spectrum(self, volume: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_map` before its mask: a real-space map in the units of B / K."""
        P, N = self.P, self.N
        padded = np.zeros((P, P, P))
        lo = P // 2 - N // 2
        padded[lo : lo + N, lo : lo + N, lo : lo + N] = volume * self.gridding * self.norm
        return np.fft.rfftn(np.fft.ifftshift(padded)) / P**3


def _divide(numerator: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """B / K, 0 where K is 0 (nothing inserted and no floor)."""
    return np.where(weight > 0, numerator / np.where(weight > 0, weight, 1.0), 0.0)


def reconstruct_external(job: ExternalReconstruction, prior: Prior = GAUSSIAN, denoiser=None,
                         pixel_size: float | None = None) -> tuple[np.ndarray, float, float]:
    """The map RELION asked for, regularised by ``prior`` (see the module docstring).

    Parameters
    ----------
    job : ExternalReconstruction
    prior : Prior
    denoiser : callable, optional
        f of eq. 17 on an N³ map (required for RED and CW-RED).
    pixel_size : float, optional
        Å; the nominal resolution of CW-RED needs it (default: the denoiser's).

    Returns
    -------
    volume : ndarray, shape (N, N, N), float32
    weight : float
        The λ applied.
    resolution : float
        The nominal resolution (Å) from the FSC column, NaN without a pixel size.
    """
    N, P = job.original_size, job.weight.shape[0]
    geometry = _Geometry(P, N, job.padding, job.current_size)
    if pixel_size is None and denoiser is not None:
        pixel_size = getattr(denoiser, "pixel_size", None)
    if job.tau2 is None:
        if prior.kind != "gaussian":
            raise InputError(job.star, f"has no τ² table, which the {prior.kind} prior needs")
        spectrum = _divide(job.numerator, geometry.floored(job.weight))
        spectrum[geometry.r2 > geometry.max_r2] = 0.0
        return geometry.to_map(spectrum).astype(np.float32), 0.0, float("nan")
    resolution = nominal_resolution(job.fsc, N, pixel_size) if pixel_size else float("nan")
    if prior.kind == "cwred" and not pixel_size:
        raise InputError("pixel size", "CW-RED needs the pixel size for the nominal resolution: give --apix")
    weight = prior.weight(resolution)
    inside = geometry.r2 < geometry.max_r2

    numerator, k = job.numerator, job.weight
    denoised = None
    if weight > 0:
        if denoiser is None:
            raise InputError("denoiser", f"the {prior.kind} prior needs a denoiser")
        ratio = _divide(numerator, geometry.floored(k))
        ratio[geometry.r2 > geometry.max_r2] = 0.0
        unregularised = geometry.to_map(ratio).astype(np.float32)
        if hasattr(denoiser, "check_map"):  # a MapDenoiser made for another box or sampling is refused
            denoiser.check_map(unregularised, pixel_size, str(job.star))
        denoised = geometry.to_spectrum(denoiser(unregularised))

    shell = np.floor(geometry.radius / job.padding + 0.5).astype(np.int64)  # RELION's ROUND
    tau2 = job.tau2[np.minimum(shell, len(job.tau2) - 1)]
    oversampling = job.padding**3
    with np.errstate(divide="ignore"):
        inv_tau2 = np.where(tau2 > 0, 1.0 / (oversampling * job.tau2_fudge * np.where(tau2 > 0, tau2, 1.0)),
                            np.where(k > 1e-20, 1.0 / (_ZERO_TAU2_FRACTION * oversampling * np.where(k > 1e-20, k, 1.0)),
                                     0.0))
    inv_tau2 = np.where(inside, inv_tau2, 0.0)
    if denoised is not None:
        numerator = numerator + weight * inv_tau2 * denoised
    spectrum = _divide(numerator, geometry.floored(k + inv_tau2))
    spectrum[geometry.r2 > geometry.max_r2] = 0.0
    return geometry.to_map(spectrum).astype(np.float32), weight, resolution


def run_external(star: str | os.PathLike, prior: Prior = GAUSSIAN, denoiser=None,
                 pixel_size: float | None = None) -> dict:
    """Read RELION's request, reconstruct, write the result map atomically where RELION waits for it."""
    from bioinverse.cryoem.io import write_map

    job = read_external_reconstruct(star)
    volume, weight, resolution = reconstruct_external(job, prior, denoiser, pixel_size)
    write_map(job.result, volume, pixel_size or 1.0)
    return {"result": str(job.result), "prior": prior.kind, "weight": weight, "resolution_A": resolution}
