r"""Particle images from a map: random poses, CTF, shifts and white noise at a given SNR (seed 002 §3.2).

Each image is formed in Fourier space, as the microscope's linear model (eq. 1) has it:

.. math::

    y_i = \mathcal{F}^{-1}\!\left[\mathrm{CTF}_i \cdot S_{s_i} \cdot P_{R_i} \hat{x}\right] + e_i,
    \qquad e_i \sim \mathcal{N}(0, 1)\ \text{per pixel},

with :math:`P_R` the Fourier slice at the pose's rotation (:class:`~bioinverse.cryoem.projection.FourierProjector`),
:math:`S_s` the phase ramp of the in-plane shift and the CTF of RELION (:func:`~bioinverse.cryoem.ctf.ctf`).
The noise has unit variance (RELION's greyscale) and the map is scaled so that the signal's average
per-pixel variance over the stack equals the SNR asked for — the seed's definition ("the average per-pixel
variance of the projection images divided by the variance of the added noise"), with the CTF applied, so it
is the SNR of the images as recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bioinverse._checks import positive_number
from bioinverse.cryoem.ctf import ctf as ctf_values
from bioinverse.cryoem.io import Particles, write_map, write_particles, write_stack
from bioinverse.cryoem.projection import FourierProjector, half_plane_pixels, shift_phases
from bioinverse.cryoem.rotations import euler_to_matrix, random_rotations
from bioinverse.errors import InputError
from bioinverse.fourier import lowpass

__all__ = ["SimulatedParticles", "simulate_particles", "write_simulation"]


@dataclass
class SimulatedParticles:
    """A simulated data set and its ground truth.

    Attributes
    ----------
    images : ndarray, shape (n, N, N), float32
    particles : Particles
        True poses (angles, origins) and CTF parameters, ready for a RELION STAR file.
    ground_truth : ndarray, shape (N, N, N), float32
        The map, scaled as in the images.
    reference : ndarray, shape (N, N, N), float32
        The ground truth low-passed to ``reference_resolution``: the initial reference of a refinement.
    pixel_size : float
        Å per pixel.
    snr : float
        Average per-pixel signal variance of the images (noise variance is 1).
    shifts : ndarray, shape (n, 2)
        True in-plane shifts in pixels (image = projection translated by the shift).
    """

    images: np.ndarray
    particles: Particles
    ground_truth: np.ndarray
    reference: np.ndarray
    pixel_size: float
    snr: float
    shifts: np.ndarray


def simulate_particles(
    volume: np.ndarray,
    pixel_size: float,
    n: int,
    snr: float,
    defocus: tuple[float, float] = (0.5, 2.0),
    max_shift: float = 2.0,
    voltage: float = 300.0,
    spherical_aberration: float = 2.7,
    amplitude_contrast: float = 0.1,
    reference_resolution: float = 30.0,
    seed: int = 0,
    stack_name: str = "particles.mrcs",
) -> SimulatedParticles:
    """Simulate ``n`` particle images of a map.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N)
        The map (e.g. :func:`bioinverse.cryoem.density.atoms_to_map`); its scale is irrelevant.
    pixel_size : float
        Å per pixel.
    n : int
        Number of particles.
    snr : float
        Per-pixel signal variance over noise variance (the seed used 0.001–0.01).
    defocus : (float, float)
        Range in µm of the (underfocus) defocus, drawn uniformly per particle; no astigmatism.
    max_shift : float
        Pixels; shifts are drawn uniformly in [−max_shift, max_shift] on each axis.
    voltage, spherical_aberration, amplitude_contrast : float
        kV, mm and fraction (one optics group).
    reference_resolution : float
        Å; low-pass of the initial reference.
    seed : int
    stack_name : str
        Name of the MRCS stack the STAR file's image names point to.

    Returns
    -------
    SimulatedParticles

    Examples
    --------
    >>> import numpy as np
    >>> blob = np.zeros((16, 16, 16), np.float32); blob[6:10, 7:9, 5:11] = 1.0
    >>> sim = simulate_particles(blob, 2.0, n=200, snr=0.5, seed=1)
    >>> sim.images.shape, round(sim.snr, 3)
    ((200, 16, 16), 0.5)
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1 or volume.shape[0] % 2:
        raise InputError("volume", f"must be a cubic map with an even side, got shape {volume.shape}")
    if not np.isfinite(volume).all() or not volume.any():
        raise InputError("volume", "must be finite and not all zero")
    px = positive_number(pixel_size, "pixel_size", unit="Å")
    snr = positive_number(snr, "snr")
    if int(n) < 1:
        raise InputError("n", f"must be at least 1, got {n}")
    lo, hi = (float(d) for d in defocus)
    if not 0 < lo <= hi:
        raise InputError("defocus", f"needs 0 < min ≤ max (µm), got {lo}:{hi}")
    if max_shift < 0:
        raise InputError("max_shift", f"must be ≥ 0, got {max_shift}")
    n, box = int(n), volume.shape[0]
    rng = np.random.default_rng(seed)
    angles = random_rotations(n, seed=int(rng.integers(2**31)))
    shifts = rng.uniform(-max_shift, max_shift, size=(n, 2))
    defocus_u = rng.uniform(lo, hi, size=n) * 1e4  # µm → Å
    defocus_angle = np.zeros(n)

    projector = FourierProjector(box, padding=2)
    volume_ft = projector.transform(volume)
    pixels, flat_index, _ = half_plane_pixels(box)
    frequencies = pixels / (box * px)
    signal = np.empty((n, box, box), np.float32)
    chunk = 512
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        rotations = torch.as_tensor(euler_to_matrix(*angles[sl].T), dtype=torch.float32)
        slices = projector.A(volume_ft, rotations, pixels)
        contrast = ctf_values(frequencies, defocus_u[sl], defocus_u[sl], defocus_angle[sl], voltage,
                              spherical_aberration, amplitude_contrast)
        slices = slices * torch.as_tensor(contrast) * shift_phases(torch.as_tensor(pixels), torch.as_tensor(
            shifts[sl]), box)
        spectrum = torch.zeros(slices.shape[0], box * (box // 2 + 1), dtype=torch.complex64)
        spectrum[:, flat_index] = slices
        images = torch.fft.irfft2(spectrum.view(-1, box, box // 2 + 1), s=(box, box))
        signal[sl] = torch.fft.fftshift(images, dim=(-2, -1)).numpy()
    variance = float(signal.var(axis=(1, 2)).mean())
    if variance <= 0:
        raise InputError("volume", "projects to blank images")
    scale = np.sqrt(snr / variance)
    images = (scale * signal + rng.standard_normal(signal.shape)).astype(np.float32)
    ground_truth = (scale * volume).astype(np.float32)
    reference = lowpass(ground_truth, px, reference_resolution).astype(np.float32)

    particles = Particles(
        image_names=[f"{i + 1:06d}@{stack_name}" for i in range(n)],
        angles=angles,
        origins=-shifts * px,  # RELION's origin centres the image: s = −origin / pixel size
        defocus_u=defocus_u,
        defocus_v=defocus_u.copy(),
        defocus_angle=defocus_angle,
        optics_group=np.ones(n, np.int64),
        voltage=[voltage],
        spherical_aberration=[spherical_aberration],
        amplitude_contrast=[amplitude_contrast],
        pixel_size=[px],
        image_size=[box],
    )
    return SimulatedParticles(images=images, particles=particles, ground_truth=ground_truth, reference=reference,
                              pixel_size=px, snr=float(scale**2 * variance), shifts=shifts)


def write_simulation(sim: SimulatedParticles, out: str | os.PathLike) -> dict[str, Path]:
    """Write a simulation as RELION reads it: particles.mrcs, particles.star, ground_truth.mrc, reference.mrc.

    Returns
    -------
    dict
        The paths written, by role.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stack = sim.particles.image_names[0].split("@", 1)[1]
    paths = {"stack": out / stack, "star": out / "particles.star", "ground_truth": out / "ground_truth.mrc",
             "reference": out / "reference.mrc"}
    write_stack(paths["stack"], sim.images, sim.pixel_size)
    write_map(paths["ground_truth"], sim.ground_truth, sim.pixel_size)
    write_map(paths["reference"], sim.reference, sim.pixel_size)
    # The STAR file last: it is what makes the set look complete.
    write_particles(paths["star"], sim.particles)
    return paths
