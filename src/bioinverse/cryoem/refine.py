r"""Gold-standard MAP-EM refinement of a cryo-EM map (seed 002 §2.2; RELION's 3D auto-refine).

The particles are split into two random halves, refined independently from the same low-pass reference.
Each iteration, for each half :math:`h`:

1. **E-step** (:mod:`bioinverse.cryoem.em`): posterior over poses of every particle (eq. 8), on a HEALPix
   orientation grid × in-plane shifts — a global search at first, then local searches around each
   particle's previous pose on ever finer grids;
2. **M-step** accumulators :math:`B_h, K_h` (eq. 9) by CTF-weighted back-projection;
3. **regularisation** from the gold-standard FSC between the two half maps (regularised with the previous
   iteration's τ², inside the solvent mask; the first τ² is the initial reference's power) (eq. 12),

   .. math:: \tau_h^2 = \frac{1}{\bar K_h}\,\frac{\mathrm{FSC}}{1 - \mathrm{FSC}},

   with :math:`\bar K_h` the average of :math:`K_h` over the Fourier shell;
4. **M-step update**: with the Gaussian prior the Wiener filter (eq. 11) :math:`x_h = B_h / (K_h + \tau_h^{-2})`;
   with RED or CW-RED (:mod:`bioinverse.cryoem.priors`) eq. 17, which adds :math:`\lambda\tau_h^{-2}` times the
   denoised unregularised map :math:`f(B_h / K_h)` to the numerator, λ fixed (RED) or set by the nominal
   resolution of the iteration (CW-RED). A map after the inverse transform and gridding correction, then
   flattened outside a soft spherical solvent mask of the particle diameter.

The noise power per Fourier shell is re-estimated every iteration from the residuals at the particles'
most probable poses (RELION uses the posterior-weighted residuals; at the end of a refinement the posteriors
are peaked and the two agree). The band of frequencies used grows with the resolution reached: the
0.143 crossing of the FSC plus ``extra_shells``. Each time an iteration brings less than one Fourier
shell, the angular sampling is refined one HEALPix order (the shift step halves); searches become local
from ``local_healpix_order`` on, and at the finest order two iterations without gain end the refinement. The final map is the
reconstruction from both halves, regularised with the full-set FSC :math:`2\,\mathrm{FSC}/(1+\mathrm{FSC})`.

Simplifications, against RELION: one noise spectrum for all particles (RELION: one per optics group); no
per-particle intensity-scale or norm correction (particles are expected on RELION's greyscale, unit noise);
no symmetry (C1); the angular prior of local searches is flat inside a cone of two angular steps
(RELION: a Gaussian of σ = two steps, cut at 3σ).

Every iteration is checkpointed (atomically) when an output folder is given, and :func:`refine` resumes
from the checkpoint of a run with the same particles and settings.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bioinverse.cryoem.ctf import ctf as ctf_values
from bioinverse.cryoem.em import Band, global_search, hermitian_sum, local_search
from bioinverse.cryoem.priors import (
    GAUSSIAN,
    WEIGHT_FLOOR,
    Prior,
    nominal_resolution,
    regularised_spectrum,
    resolution_shell,
)
from bioinverse.cryoem.projection import FourierProjector, half_plane_pixels
from bioinverse.cryoem.rotations import euler_to_matrix
from bioinverse.cryoem.sampling import angular_step, local_orientations, orientation_grid, translation_grid
from bioinverse.errors import InputError
from bioinverse.fourier import fsc as fsc_curve

# Half-width of a local search, in angular steps of its grid: one step of the coarser grid before it.
LOCAL_SEARCH_STEPS = 2.0

__all__ = ["RefineConfig", "RefineResult", "image_spectra", "reconstruct_with_poses", "refine", "soft_sphere_mask",
           "unregularised_spectrum"]


@dataclass(frozen=True)
class RefineConfig:
    """Settings of :func:`refine` (RELION's auto-refine defaults where it has one).

    Attributes
    ----------
    particle_diameter : float or None
        Å; the solvent mask's diameter. None: 90 % of the box.
    initial_resolution : float
        Å; the frequencies used in the first iteration (RELION's ``--ini_high``).
    healpix_order : int
        Order of the first, global search (2: 15°; RELION's default 7.5° is order 2 oversampled once).
    max_healpix_order : int
        Finest order of the local searches (5: 1.875°).
    local_healpix_order : int
        Order from which searches are local (RELION's ``--auto_local_healpix_order``, 4 there, where adaptive
        oversampling makes global searches at 7.5° affordable); coarser ones are global.
    offset_range, offset_step : float
        Pixels; the shifts searched in the global search (RELION ``--offset_range 5 --offset_step 1``).
    extra_shells : int
        Fourier shells used beyond the current resolution (RELION's ``incr_size`` is 10 for large boxes).
    adaptive_fraction : float
        Posterior mass kept by pruning in local searches (RELION ``--adaptive_fraction``).
    max_iterations : int
    padding : int
        Oversampling of the 3-D Fourier grid (RELION ``--pad 2``).
    mask_edge : float
        Å; width of the solvent mask's cosine edge.
    seed : int
        Seed of the random half-set split.
    prior : Prior
        The M-step's prior: Gaussian (RELION's), RED or CW-RED (:class:`bioinverse.cryoem.priors.Prior`).
    """

    particle_diameter: float | None = None
    initial_resolution: float = 30.0
    healpix_order: int = 2
    max_healpix_order: int = 5
    local_healpix_order: int = 3
    offset_range: float = 5.0
    offset_step: float = 1.0
    extra_shells: int = 5
    adaptive_fraction: float = 0.999
    max_iterations: int = 25
    padding: int = 2
    mask_edge: float = 6.0
    seed: int = 0
    prior: Prior = GAUSSIAN

    def __post_init__(self) -> None:
        if self.particle_diameter is not None and self.particle_diameter <= 0:
            raise InputError("particle_diameter", f"must be positive, got {self.particle_diameter}")
        if not 0 <= self.healpix_order <= self.max_healpix_order <= 7:
            raise InputError("healpix_order", "needs 0 ≤ healpix_order ≤ max_healpix_order ≤ 7")
        if self.initial_resolution <= 0 or self.offset_range < 0 or self.offset_step <= 0:
            raise InputError("config", "initial_resolution and offset_step must be positive, offset_range ≥ 0")
        if not 0 < self.adaptive_fraction <= 1:
            raise InputError("adaptive_fraction", f"must be in (0, 1], got {self.adaptive_fraction}")
        if not isinstance(self.prior, Prior):
            raise InputError("prior", f"must be a Prior, got {type(self.prior).__name__}")


@dataclass
class RefineResult:
    """The outcome of :func:`refine`.

    Attributes
    ----------
    half_maps : ndarray, shape (2, N, N, N)
        The two independently refined, regularised half maps.
    final_map : ndarray, shape (N, N, N)
        Reconstruction from all particles.
    fsc : ndarray, shape (N // 2 + 1,)
        Gold-standard FSC per Fourier shell of the last iteration (unregularised halves).
    resolution : float
        Å at FSC 0.143.
    angles : ndarray, shape (n, 3)
        Refined (rot, tilt, psi) in degrees.
    shifts : ndarray, shape (n, 2)
        Refined in-plane shifts in pixels (image = projection translated by the shift).
    half : ndarray of int, shape (n,)
        Half set of each particle (1 or 2).
    max_probability : ndarray, shape (n,)
    history : list of dict
        One record per iteration (resolution, sampling, timings, pose changes).
    converged : bool
    """

    half_maps: np.ndarray
    final_map: np.ndarray
    fsc: np.ndarray
    resolution: float
    angles: np.ndarray
    shifts: np.ndarray
    half: np.ndarray
    max_probability: np.ndarray
    history: list = field(default_factory=list)
    converged: bool = False


def soft_sphere_mask(box: int, radius: float, edge: float) -> np.ndarray:
    """A sphere of ``radius`` pixels about the box centre with a raised-cosine edge ``edge`` pixels wide.

    Examples
    --------
    >>> m = soft_sphere_mask(16, 4.0, 2.0)
    >>> float(m[8, 8, 8]), float(m[8, 8, 15])
    (1.0, 0.0)
    """
    grid = np.arange(box) - box // 2
    r = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    t = np.clip((r - radius) / max(edge, 1e-9), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def image_spectra(images: np.ndarray) -> torch.Tensor:
    """Fourier transforms of images with the origin at the box centre, half-plane layout (n, N, N//2+1)."""
    return torch.fft.rfft2(torch.fft.ifftshift(torch.as_tensor(images, dtype=torch.float32), dim=(-2, -1)))


def _shell_radius(box: int) -> np.ndarray:
    """Radius in Fourier pixels of every coefficient of the rfft2 layout of an N-box."""
    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1)
    return np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def _grid_shells(size: int, padding: int, n_shells: int) -> torch.Tensor:
    """Fourier shell (of the unpadded box) of each voxel of the centred padded grid; n_shells beyond."""
    k = torch.arange(size, dtype=torch.float32) - size // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) / padding
    shells = torch.round(r).long()
    return torch.where(shells < n_shells, shells, n_shells)


def _fourier_fsc(a: torch.Tensor, b: torch.Tensor, shells: torch.Tensor, n_shells: int) -> np.ndarray:
    """FSC per shell of two grids on the same (padded) layout."""
    idx = shells.reshape(-1)

    def shell_sum(x):
        return torch.zeros(n_shells + 1, dtype=torch.float64).index_add_(0, idx, x.reshape(-1).double())[:n_shells]

    cross = shell_sum((a * b.conj()).real)
    pa, pb = shell_sum(a.abs().square()), shell_sum(b.abs().square())
    denom = torch.sqrt(pa * pb)
    return torch.where(denom > 0, cross / torch.where(denom > 0, denom, 1.0), 0.0).numpy()


def _tau2_grid(tau2_shell, shells) -> torch.Tensor:
    """τ² per voxel of the padded grid from τ² per shell (0 beyond the last shell)."""
    return torch.as_tensor(np.append(tau2_shell, 0.0), dtype=torch.float32)[shells]


def _wiener(numerator, denominator, tau2_shell, shells) -> torch.Tensor:
    """Eq. 11, x = B / (K + 1/τ²) = B τ² / (K τ² + 1); τ² = 0 (no signal) gives 0."""
    return regularised_spectrum(numerator, denominator, _tau2_grid(tau2_shell, shells))


@dataclass
class _Regulariser:
    """The M-step's prior in one refinement: the prior, its denoiser, an observer of the unregularised maps."""

    prior: Prior = GAUSSIAN
    denoiser: object = None
    observer: object = None

    def maps(self, numerators, denominators, tau2, projector, shells, n_shells, resolution, context):
        """The regularised maps (eq. 11 or 17), one per accumulator pair, and the λ used."""
        weight = self.prior.weight(resolution)
        maps = []
        for i, (b, k, t) in enumerate(zip(numerators, denominators, tau2)):
            denoised = None
            if weight > 0 or self.observer is not None:
                unregularised = projector.reconstruct(unregularised_spectrum(b, k, shells, n_shells))
                if self.observer is not None:
                    self.observer({**context, "half": i + 1 if len(numerators) == 2 else 0,
                                   "map": unregularised, "resolution_A": resolution})
                if weight > 0:
                    denoised = projector.reconstruction_spectrum(self.denoiser(unregularised))
            spectrum = regularised_spectrum(b, k, _tau2_grid(t, shells), denoised, weight)
            maps.append(np.asarray(projector.reconstruct(spectrum)))
        return maps, weight


def _shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> np.ndarray:
    """Mean of a padded-grid quantity over each Fourier shell."""
    idx = shells.reshape(-1)
    total = torch.zeros(n_shells + 1, dtype=torch.float64).index_add_(0, idx, values.reshape(-1).double())
    count = torch.bincount(idx, minlength=n_shells + 1).double()
    return (total / count.clamp(min=1)).numpy()[:n_shells]


def unregularised_spectrum(numerator: torch.Tensor, denominator: torch.Tensor, shells: torch.Tensor,
                           n_shells: int) -> torch.Tensor:
    r""":math:`\tilde x = B / K`, the input of the denoiser (seed 002 eq. 17), with RELION's floor on K.

    K is raised to at least ``WEIGHT_FLOOR`` × its mean over the voxel's Fourier shell, so that the
    few voxels that the particles barely sample do not dominate the map; voxels beyond the last shell,
    and those of a shell in which nothing was inserted (beyond the band of the iteration), are 0.

    Parameters
    ----------
    numerator, denominator : torch.Tensor, shape (P, P, P)
    shells : torch.Tensor of int64, shape (P, P, P)
        Fourier shell of each voxel, ``n_shells`` for voxels beyond the last one.
    n_shells : int
    """
    floor = torch.as_tensor(np.append(WEIGHT_FLOOR * _shell_mean(denominator, shells, n_shells), 0.0),
                            dtype=denominator.dtype)[shells]
    weight = torch.maximum(denominator, floor)
    return torch.where(weight > 0, numerator / torch.where(weight > 0, weight, 1.0), 0.0)


def _tau2(fsc: np.ndarray, denominator: torch.Tensor, shells: torch.Tensor, n_shells: int) -> np.ndarray:
    """Eq. 12: τ² = FSC / (1 − FSC) / mean_shell(K); zero where FSC ≤ 0."""
    k_mean = _shell_mean(denominator, shells, n_shells)
    f = np.clip(fsc, 0.0, 0.999)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau2 = np.where((f > 0) & (k_mean > 0), f / (1.0 - f) / k_mean, 0.0)
    return tau2


def _fingerprint(images: np.ndarray, angles_in: np.ndarray, reference: np.ndarray, config: RefineConfig,
                 denoiser=None) -> str:
    h = hashlib.sha256()
    if denoiser is not None and config.prior.needs_denoiser:
        h.update(str(denoiser.digest() if hasattr(denoiser, "digest") else id(denoiser)).encode())
    for a in (images[: min(len(images), 64)], angles_in, reference):
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    h.update(str(images.shape).encode())
    # max_iterations is left out so that a finished run can be resumed with more iterations.
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "max_iterations"}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def refine(
    images: np.ndarray,
    pixel_size: float,
    ctf_parameters: dict[str, np.ndarray],
    reference: np.ndarray,
    config: RefineConfig = RefineConfig(),
    initial_shifts: np.ndarray | None = None,
    half: np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    log=None,
    denoiser=None,
    observer=None,
) -> RefineResult:
    """Refine a map from particle images by gold-standard MAP-EM.

    Parameters
    ----------
    images : ndarray, shape (n, N, N)
        The particles, on RELION's greyscale (white noise of unit variance).
    pixel_size : float
        Å per pixel.
    ctf_parameters : dict of arrays (n,)
        ``defocus_u``, ``defocus_v`` (Å), ``defocus_angle`` (°), ``voltage`` (kV), ``spherical_aberration``
        (mm), ``amplitude_contrast`` — the arguments of :func:`bioinverse.cryoem.ctf.ctf`.
    reference : ndarray, shape (N, N, N)
        Initial map (it is low-passed to ``config.initial_resolution`` by the band of the first iteration).
    config : RefineConfig
    initial_shifts : ndarray, shape (n, 2), optional
        Pixels; the centre of each particle's first shift search (default 0).
    half : ndarray of int (n,), optional
        1 or 2 per particle (default: a random split with ``config.seed``).
    checkpoint : path, optional
        File written after every iteration; a run finding one of the same inputs resumes from it.
    progress : bool
        Show a progress bar on stderr.
    log : callable, optional
        Receives one line of text per iteration.
    denoiser : callable, optional
        The denoiser of RED and CW-RED (a :class:`bioinverse.cryoem.denoiser.MapDenoiser`; the shipped one
        by default); unused with the Gaussian prior.
    observer : callable, optional
        Receives, every iteration, a dict per half set with the unregularised map B / K (``map``), its
        ``half`` (0 for the final map from both), ``iteration``, the half-map ``fsc`` and ``resolution_A``:
        the training data of a denoiser.

    Returns
    -------
    RefineResult

    Examples
    --------
    See ``docs/cryoem.md`` and :func:`bioinverse.cryoem.simulate.simulate_particles`; a refinement takes
    minutes, too long for a doctest.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 2:
        raise InputError("images", f"must be a stack (n, N, N) with N even, got shape {images.shape}")
    n, box = images.shape[0], images.shape[1]
    reference = np.asarray(reference, dtype=np.float32)
    if reference.shape != (box,) * 3:
        raise InputError("reference", f"has shape {reference.shape}; the particles need a {box}³ map")
    if n < 4:
        raise InputError("images", f"needs at least 4 particles, got {n}")
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "spherical_aberration",
                 "amplitude_contrast"):
        if name not in ctf_parameters:
            raise InputError("ctf_parameters", f"lacks {name}")
    rng = np.random.default_rng(config.seed)
    if half is None:
        half = np.where(rng.permutation(n) < n // 2, 1, 2)
    half = np.asarray(half)
    if set(np.unique(half)) != {1, 2}:
        raise InputError("half", "must assign particles to both half sets 1 and 2")
    shifts = np.zeros((n, 2)) if initial_shifts is None else np.array(initial_shifts, dtype=np.float64)

    n_shells = box // 2 + 1
    diameter = config.particle_diameter if config.particle_diameter is not None else 0.9 * box * pixel_size
    mask = soft_sphere_mask(box, 0.5 * diameter / pixel_size, config.mask_edge / pixel_size)
    projector = FourierProjector(box, padding=config.padding)
    size = projector.padded_box
    grid_shells = _grid_shells(size, projector.padding, n_shells)
    spectra = image_spectra(images).reshape(n, -1)
    radius = _shell_radius(box)
    image_shells = np.minimum(np.round(radius).astype(np.int64), n_shells - 1).reshape(-1)

    # Initial noise spectrum: the particles' power per shell (signal is a small part of it at these SNRs).
    power = (spectra.real.square() + spectra.imag.square()).mean(0).double().numpy()
    sigma2 = np.bincount(image_shells, weights=power, minlength=n_shells) / np.maximum(
        np.bincount(image_shells, minlength=n_shells), 1)

    if config.prior.needs_denoiser and denoiser is None:
        from bioinverse.cryoem.denoiser import load_denoiser

        denoiser = load_denoiser()
    if config.prior.needs_denoiser and hasattr(denoiser, "check_map"):
        denoiser.check_map(reference, pixel_size, "reference")
    regulariser = _Regulariser(config.prior, denoiser, observer)
    fingerprint = _fingerprint(images, shifts, reference, config, denoiser)
    maps = np.stack([reference * mask, reference * mask])
    # The prior's first τ²: the power of the initial reference in each shell (RELION's initialisation).
    reference_power = _shell_mean(projector.transform(maps[0]).abs().square(), grid_shells, n_shells)
    state = {"tau2": [reference_power, reference_power], "iteration": 0, "order": config.healpix_order,
             "local": False, "offset_range": config.offset_range,
             "offset_step": config.offset_step, "best_shell": 0.0, "stall": 0, "history": [],
             "resolution_shell": box * pixel_size / config.initial_resolution, "converged": False}
    orientation_index = np.zeros(n, np.int64)
    max_probability = np.zeros(n)
    fsc = np.zeros(n_shells)
    accumulators = None
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            state, maps, sigma2 = saved["state"], saved["maps"], saved["sigma2"]
            shifts, orientation_index = saved["shifts"], saved["orientation_index"]
            max_probability, fsc, half = saved["max_probability"], saved["fsc"], saved["half"]
            accumulators = saved["accumulators"]
            if log is not None:
                log(f"resuming after iteration {state['iteration']}")

    ctf_cache = {}
    from bioinverse._progress import progress_bar

    while not state["converged"] and state["iteration"] < config.max_iterations:
        iteration = state["iteration"] + 1
        order = state["order"]
        angles_grid = orientation_grid(order)
        rotations = torch.as_tensor(euler_to_matrix(*angles_grid.T), dtype=torch.float32)
        if iteration == 1:
            band_radius = box * pixel_size / config.initial_resolution
        else:
            band_radius = state["resolution_shell"] + config.extra_shells
        band_radius = float(min(box // 2, max(band_radius, 2.0)))
        pixels, flat_index, weight = half_plane_pixels(box, band_radius)
        pixels_t = torch.as_tensor(pixels, dtype=torch.float32)
        flat_index_t = torch.as_tensor(flat_index, dtype=torch.long)
        frequencies = pixels / (box * pixel_size)
        key = band_radius
        if key not in ctf_cache:
            ctf_cache.clear()
            ctf_cache[key] = torch.as_tensor(ctf_values(frequencies, **{k: np.asarray(v) for k, v in
                                                                        ctf_parameters.items()}),
                                             dtype=torch.float32)
        ctf_band = ctf_cache[key]
        shells = torch.as_tensor(image_shells[flat_index], dtype=torch.long)
        inv_sigma2 = torch.as_tensor(1.0 / np.maximum(sigma2, 1e-30), dtype=torch.float32)[shells]
        if state["local"]:
            translations = translation_grid(2.0 * state["offset_step"], state["offset_step"])
        else:
            translations = translation_grid(state["offset_range"], state["offset_step"])
        translations = torch.as_tensor(translations, dtype=torch.float32)
        offset_sigma = max(state["offset_range"], state["offset_step"]) / 2.0

        results = {}
        noise_power = np.zeros(n_shells)
        noise_count = np.zeros(n_shells)
        new_orientation = orientation_index.copy()
        new_shifts = shifts.copy()
        with progress_bar(progress) as bar:
            task = bar.add_task(f"iteration {iteration}", total=n)
            for h in (1, 2):
                members = np.nonzero(half == h)[0]
                band = Band(box=box, pixels=pixels_t, shells=shells,
                            weight=torch.as_tensor(weight, dtype=torch.float32),
                            spectra=spectra[members][:, flat_index_t], ctf=ctf_band[members],
                            inv_sigma2=inv_sigma2)
                volume_ft = projector.transform(maps[h - 1])
                previous = torch.as_tensor(shifts[members], dtype=torch.float32)
                advance = functools.partial(bar.advance, task)
                if state["local"]:
                    previous_angles = state["angles"][members]
                    candidates, valid = _candidates(order, previous_angles, LOCAL_SEARCH_STEPS * angular_step(order))
                    step = local_search(volume_ft, projector, band, rotations, candidates, valid, translations,
                                        previous, offset_sigma, n_shells, config.adaptive_fraction,
                                        progress=advance)
                else:
                    step = global_search(volume_ft, projector, band, rotations, translations, previous,
                                         offset_sigma, n_shells, config.adaptive_fraction, progress=advance)
                results[h] = step
                new_orientation[members] = step.orientation
                new_shifts[members] = step.shift
                max_probability[members] = step.max_probability
                noise_power += step.noise_power
                noise_count += step.noise_count

        new_angles = angles_grid[new_orientation]
        changes = _angular_changes(state.get("angles"), new_angles)
        state["angles"] = new_angles
        orientation_index, shifts = new_orientation, new_shifts
        inside = noise_count > 0
        sigma2 = np.where(inside, noise_power / np.maximum(noise_count, 1), sigma2)

        halves, fsc, state["tau2"], accumulators, prior_weight = _gold_standard_update(
            [results[h].numerator for h in (1, 2)], [results[h].denominator for h in (1, 2)], projector,
            grid_shells, n_shells, band_radius, mask, pixel_size, state["tau2"], regulariser,
            {"iteration": iteration})
        maps = np.stack([m * mask for m in halves])

        shell = resolution_shell(fsc)
        gain = shell - state["best_shell"]
        resolution = box * pixel_size / shell if shell > 0 else math.inf
        record = {"iteration": iteration, "resolution_A": resolution, "band_shells": band_radius,
                  "healpix_order": order, "search": "local" if state["local"] else "global",
                  "angular_step_deg": angular_step(order), "offset_step_px": state["offset_step"],
                  "mean_angle_change_deg": changes, "mean_significant_poses": float(np.mean(np.concatenate(
                      [results[h].significant for h in (1, 2)]))),
                  "mean_max_probability": float(max_probability.mean()), "prior_weight": prior_weight}
        state["history"].append(record)
        if log is not None:
            log(f"iteration {iteration}: {resolution:.2f} Å, {record['search']} search at "
                f"{angular_step(order):g}°, mean pose change {changes:.2f}°")
        state["resolution_shell"] = max(shell, state["resolution_shell"] if iteration > 1 else shell)
        if gain >= 1.0:
            state["best_shell"] = shell
            state["stall"] = 0
        elif order < config.max_healpix_order:
            state["best_shell"] = max(state["best_shell"], shell)
            state["order"] = order + 1
            state["local"] = state["order"] >= config.local_healpix_order
            state["offset_step"] = state["offset_step"] / 2.0
        else:
            state["stall"] += 1
            state["best_shell"] = max(state["best_shell"], shell)
            state["converged"] = state["stall"] >= 2
        state["iteration"] = iteration
        if checkpoint is not None:
            from bioinverse.io import atomic_open

            with atomic_open(checkpoint, "wb") as fh:
                torch.save({"fingerprint": fingerprint, "state": state, "maps": maps, "sigma2": sigma2,
                            "shifts": shifts, "orientation_index": orientation_index,
                            "max_probability": max_probability, "fsc": fsc, "half": half,
                            "accumulators": accumulators}, fh)

    if accumulators is None:
        raise InputError("max_iterations", "must be at least 1")
    final_map = _final_map(accumulators, fsc, projector, grid_shells, n_shells, pixel_size, regulariser) * mask
    shell = resolution_shell(fsc)
    return RefineResult(half_maps=np.stack(maps), final_map=final_map, fsc=fsc,
                        resolution=box * pixel_size / shell if shell > 0 else math.inf,
                        angles=state["angles"], shifts=shifts, half=half, max_probability=max_probability,
                        history=state["history"], converged=bool(state["converged"]))


def _gold_standard_update(numerators, denominators, projector, grid_shells, n_shells, band_radius, mask,
                          pixel_size, tau2_previous=None, regulariser=None, context=None):
    """Steps 3–4 of the module docstring: FSC of the two halves, τ² (eq. 12), regularised maps (eq. 11 or 17).

    The FSC is that of the half maps regularised with the previous τ², inside the solvent mask (a map
    divided by K alone is dominated by the noise of its least-sampled voxels near the CTF zeros and
    underestimates the resolution). Without a previous τ² (a reconstruction from known poses) the first
    τ² comes from the FSC of the unregularised ratios B / K.

    The FSC, and so the nominal resolution, never sees the denoiser of RED: the halves it compares are
    Wiener maps, as RELION's FSC compares unregularised halves.

    Returns the two half maps (unmasked), the FSC per shell, the two τ² per shell, the summed
    accumulators (B₁ + B₂, K₁ + K₂) and the prior's λ.
    """
    numerators = [hermitian_sum(b) for b in numerators]
    denominators = [hermitian_sum(k) for k in denominators]
    if tau2_previous is None:
        unregularised = [b / (k + 1e-3 * k.mean()) for b, k in zip(numerators, denominators)]
        raw = _fourier_fsc(unregularised[0], unregularised[1], grid_shells, n_shells)
        tau2_previous = [_tau2(raw, k, grid_shells, n_shells) for k in denominators]
    halves = [np.asarray(projector.reconstruct(_wiener(b, k, t, grid_shells)))
              for b, k, t in zip(numerators, denominators, tau2_previous)]
    fsc = fsc_curve(halves[0] * mask, halves[1] * mask, pixel_size).values.copy()
    fsc[int(np.floor(band_radius)) + 1:] = 0.0
    tau2 = [_tau2(fsc, k, grid_shells, n_shells) for k in denominators]
    regulariser = regulariser or _Regulariser()
    resolution = nominal_resolution(fsc, projector.box, pixel_size)
    halves, weight = regulariser.maps(numerators, denominators, tau2, projector, grid_shells, n_shells, resolution,
                                      {**(context or {}), "fsc": fsc})
    return halves, fsc, tau2, (numerators[0] + numerators[1], denominators[0] + denominators[1]), weight


def _final_map(accumulators, fsc, projector, grid_shells, n_shells, pixel_size, regulariser=None) -> np.ndarray:
    """Reconstruction from both halves, regularised with the full-set FSC 2·FSC / (1 + FSC), and the
    prior's λ at the half-map resolution."""
    numerator, denominator = accumulators
    full_fsc = np.where(fsc > 0, 2 * fsc / (1 + fsc), 0.0)
    tau2 = _tau2(full_fsc, denominator, grid_shells, n_shells)
    maps, _ = (regulariser or _Regulariser()).maps(
        [numerator], [denominator], [tau2], projector, grid_shells, n_shells,
        nominal_resolution(fsc, projector.box, pixel_size), {"final": True, "fsc": fsc})
    return maps[0]


def reconstruct_with_poses(
    images: np.ndarray,
    pixel_size: float,
    ctf_parameters: dict[str, np.ndarray],
    angles: np.ndarray,
    shifts: np.ndarray,
    half: np.ndarray | None = None,
    padding: float = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gold-standard reconstruction from known poses: one M-step with every posterior a single pose.

    With the true poses of simulated particles this is the upper bound of what a refinement can reach.
    The images are taken to carry white noise of unit variance (RELION's greyscale), so every Fourier
    coefficient has noise power N².

    Parameters
    ----------
    images : ndarray, shape (n, N, N)
    pixel_size : float
        Å per pixel.
    ctf_parameters : dict of arrays (n,)
        As in :func:`refine`.
    angles : ndarray, shape (n, 3)
        (rot, tilt, psi) in degrees.
    shifts : ndarray, shape (n, 2)
        In-plane shifts in pixels (image = projection translated by the shift).
    half : ndarray of int (n,), optional
        Half set (1 or 2) of each particle; random with ``seed`` by default.
    padding : float
    seed : int

    Returns
    -------
    half_maps : ndarray, shape (2, N, N, N)
    final_map : ndarray, shape (N, N, N)
    fsc : ndarray, shape (N // 2 + 1,)
        FSC of the unregularised halves per Fourier shell.

    Examples
    --------
    >>> from bioinverse.cryoem.simulate import simulate_particles
    >>> blob = np.zeros((16, 16, 16), np.float32); blob[5:11, 6:10, 7:9] = 1.0
    >>> sim = simulate_particles(blob, 3.0, n=300, snr=10.0, seed=0)
    >>> halves, final, fsc = reconstruct_with_poses(sim.images, 3.0, sim.particles.ctf_parameters()._asdict(),
    ...                                             sim.particles.angles, sim.shifts)
    >>> bool(fsc[1:5].min() > 0.9)
    True
    """
    images = np.asarray(images, dtype=np.float32)
    n, box = images.shape[0], images.shape[-1]
    if half is None:
        half = np.where(np.random.default_rng(seed).permutation(n) < n // 2, 1, 2)
    projector = FourierProjector(box, padding=padding)
    n_shells = box // 2 + 1
    grid_shells = _grid_shells(projector.padded_box, projector.padding, n_shells)
    pixels, flat_index, weight = half_plane_pixels(box, box // 2)
    radius = _shell_radius(box).reshape(-1)[flat_index]
    shells = torch.as_tensor(np.minimum(np.round(radius), n_shells - 1).astype(np.int64))
    contrast = torch.as_tensor(ctf_values(pixels / (box * pixel_size), **{k: np.asarray(v) for k, v in
                                                                          ctf_parameters.items()}))
    spectra = image_spectra(images).reshape(n, -1)[:, torch.as_tensor(flat_index)]
    rotations = torch.as_tensor(euler_to_matrix(*np.asarray(angles, dtype=np.float64).T), dtype=torch.float32)
    size = projector.padded_box
    empty = torch.zeros((size,) * 3, dtype=torch.complex64)
    numerators, denominators = [], []
    for h in (1, 2):
        members = torch.as_tensor(np.nonzero(np.asarray(half) == h)[0])
        band = Band(box=box, pixels=torch.as_tensor(pixels, dtype=torch.float32), shells=shells,
                    weight=torch.as_tensor(weight, dtype=torch.float32), spectra=spectra[members],
                    ctf=contrast[members], inv_sigma2=torch.full((len(pixels),), 1.0 / box**2))
        # One candidate orientation (its own) and one shift per particle: the posterior is that pose.
        own = torch.arange(len(members))[:, None]
        step = local_search(empty, projector, band, rotations[members], own, torch.ones_like(own, dtype=torch.bool),
                            torch.zeros(1, 2), torch.as_tensor(np.asarray(shifts)[members.numpy()],
                                                               dtype=torch.float32), 1.0, n_shells)
        numerators.append(step.numerator)
        denominators.append(step.denominator)
    mask = soft_sphere_mask(box, 0.45 * box, 0.05 * box)
    halves, fsc, _, accumulators, _ = _gold_standard_update(numerators, denominators, projector, grid_shells,
                                                            n_shells, box // 2, mask, pixel_size)
    return np.stack(halves), _final_map(accumulators, fsc, projector, grid_shells, n_shells, pixel_size), fsc


def _candidates(order: int, angles: np.ndarray, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local candidate orientations of every particle, padded to a common length."""
    found = local_orientations(order, angles, radius)
    if isinstance(found, tuple):  # already padded (indices, mask)
        idx, ok = found
        return torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(ok, dtype=torch.bool)
    m = max(1, max(len(f) for f in found))
    idx = np.zeros((len(found), m), np.int64)
    ok = np.zeros((len(found), m), bool)
    for i, f in enumerate(found):
        idx[i, : len(f)] = f
        ok[i, : len(f)] = True
    return torch.as_tensor(idx), torch.as_tensor(ok)


def _angular_changes(previous: np.ndarray | None, current: np.ndarray) -> float:
    """Mean rotation angle in degrees between each particle's previous and current pose."""
    if previous is None:
        return float("nan")
    from bioinverse.cryoem.rotations import angular_distance

    a = euler_to_matrix(*np.asarray(previous).T)
    b = euler_to_matrix(*np.asarray(current).T)
    return float(np.mean(angular_distance(a, b)))
