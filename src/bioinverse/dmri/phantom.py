"""A brain-like diffusion phantom with exact ground truth for DKI and NODDI measures.

With the default ``tissue_model="noddi"`` every voxel is a NODDI-type tissue (Zhang et al. 2012):
one or two bundles of Watson-dispersed sticks with their tortuosity-constrained extra-neurite
zeppelin, plus free water,

.. math::

    S(b, \\mathbf g) = S_0 \\Big[(1-\\nu_\\text{iso})\\sum_k w_k
        \\big(\\nu_\\text{ic} E_\\text{ic}(\\kappa_k, \\boldsymbol\\mu_k)
        + (1-\\nu_\\text{ic}) E_\\text{ec}(\\kappa_k, \\boldsymbol\\mu_k)\\big)
        + \\nu_\\text{iso}\\, e^{-b d_\\text{iso}}\\Big],

with Rician noise of standard deviation :math:`\\sigma = 1/\\mathrm{SNR}` (the SNR is relative to
the b = 0 signal of white matter, :math:`S_0 = 1`; grey matter and CSF are brighter, as on a
T2-weighted b = 0 image, and a smooth receive-coil field modulates all of them by ±8 %).

``tissue_model="multi-tensor"`` replaces the sticks and zeppelins by Gaussian tensors (see
:func:`simulate_phantom`). Either tissue is a mixture of Gaussian compartments, so its diffusion
and kurtosis tensors follow exactly from the first two moments of the compartment diffusion tensors
(:func:`bioinverse.dmri.noddi.noddi_moments`, :func:`bioinverse.dmri.signal.cumulant_tensors`).
The DKI ground truth is therefore the true cumulant expansion at b → 0, which a DKI fit at
b ≤ 3000 s/mm² only approximates; the NODDI ground truth is the generating parameters.

Geometry (in an ellipsoidal brain of the requested grid, 2.5 mm voxels): an outer CSF rim, a
folded cortical ribbon of grey matter whose neurites run radially, white matter whose main
bundle follows concentric arcs in the axial plane, a band where a second bundle crosses it at
90° (radially), and two ventricles. Microstructure varies smoothly inside each tissue
(low-pass filtered random fields). A different ``seed`` gives a different "subject": other
random fields, slightly different size, position, folding and crossing band.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from bioinverse.dmri.dki import kurtosis_measures
from bioinverse.dmri.io import GradientTable
from bioinverse.dmri.noddi import neurite_signal, noddi_moments, odi_to_kappa
from bioinverse.dmri.signal import cumulant_tensors, rician_noise
from bioinverse.errors import InputError

__all__ = ["Phantom", "TISSUE_LABELS", "simulate_phantom"]

#: Label values of the ``tissue`` map.
TISSUE_LABELS = {"background": 0, "wm": 1, "gm": 2, "csf": 3}

#: b = 0 signal per tissue relative to white matter (T2 weighting at TE ≈ 80 ms).
_S0 = {"wm": 1.0, "gm": 1.15, "csf": 2.0}

D_PAR = 1.7e-3  # mm²/s, intrinsic neurite diffusivity (NODDI default)
D_ISO = 3.0e-3  # mm²/s, free water at body temperature
D_PERP_AXON = 0.1e-3  # mm²/s, radial diffusivity of the intra-axonal tensor (multi-tensor tissue)

# Maps written as ground truth, in this order.
_DKI_MAPS = ("md", "fa", "ad", "rd", "mk", "ak", "rk", "kfa")
_NODDI_MAPS = ("icvf", "odi", "isovf")


@dataclass(frozen=True)
class Phantom:
    """A simulated diffusion scan with its ground truth.

    Attributes
    ----------
    dwi : ndarray, shape (X, Y, Z, n), float32
        Noisy magnitude signals.
    gtab : GradientTable
        The protocol of the ``n`` volumes.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask (WM, GM and CSF).
    maps : dict of str to ndarray (X, Y, Z), float32
        Ground truth: DKI measures ``md, ad, rd`` (mm²/s), ``fa, mk, ak, rk, kfa``; NODDI
        parameters ``icvf, odi, isovf`` (``odi`` is that of the main bundle; in crossing voxels no
        single-Watson ODI exists, see ``crossing``); ``s0``; ``tissue`` (labels of
        :data:`TISSUE_LABELS`); ``crossing`` (1 where two bundles cross).
    affine : ndarray, shape (4, 4)
        Voxel-to-world (mm) transform.
    snr : float
        SNR of the b = 0 white-matter signal.
    seed : int
        The subject's seed.
    """

    dwi: np.ndarray
    gtab: GradientTable
    mask: np.ndarray
    maps: dict[str, np.ndarray] = field(repr=False)
    affine: np.ndarray = field(repr=False)
    snr: float = 20.0
    seed: int = 0

    def voxels(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Signals of the voxels in ``mask`` (default: the brain mask), shape (N, n)."""
        return self.dwi[self.mask if mask is None else mask]

    def unmask(self, values: np.ndarray) -> np.ndarray:
        """Values at the brain-mask voxels, shape (N, ...), back on the grid (X, Y, Z, ...); 0 outside."""
        values = np.asarray(values)
        image = np.zeros(self.mask.shape + values.shape[1:], np.float32)
        image[self.mask] = values
        return image

    def truth(self, name: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Ground-truth map ``name`` at the voxels of ``mask`` (default: the brain mask), (N,)."""
        if name not in self.maps:
            raise InputError("map", f"unknown ground-truth map {name!r}; choose from {', '.join(self.maps)}")
        return self.maps[name][self.mask if mask is None else mask]

    def write(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write the scan as NIfTI + FSL files and the truth maps, each atomically.

        Files: ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``, ``mask.nii.gz`` and
        ``truth_<map>.nii.gz`` for every map. Returns the written paths by name.
        """
        from bioinverse.dmri.io import write_bvals_bvecs, write_dwi, write_map, write_mask

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"dwi": directory / "dwi.nii.gz", "bvals": directory / "dwi.bval",
                 "bvecs": directory / "dwi.bvec", "mask": directory / "mask.nii.gz"}
        write_dwi(paths["dwi"], self.dwi, self.affine)
        write_bvals_bvecs(self.gtab, paths["bvals"], paths["bvecs"])
        write_mask(paths["mask"], self.mask, self.affine)
        for name, values in self.maps.items():
            paths[name] = directory / f"truth_{name}.nii.gz"
            write_map(paths[name], values, self.affine)
        return paths


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation."""
    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / f.std()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def simulate_phantom(gtab: GradientTable, snr: float = 20.0, seed: int = 0,
                     shape: tuple[int, int, int] = (56, 64, 16), voxel_size: float = 2.5,
                     tissue_model: str = "noddi") -> Phantom:
    """Simulate a brain-like diffusion scan of protocol ``gtab`` with exact ground truth.

    Parameters
    ----------
    gtab : GradientTable
        The protocol (b in s/mm²).
    snr : float
        SNR of the white-matter b = 0 signal; ``np.inf`` gives noise-free signals.
    seed : int
        The subject: geometry perturbation, microstructure fields and noise.
    shape : tuple of 3 int
        Grid size (X, Y, Z); each at least 8.
    voxel_size : float
        Isotropic voxel size in mm (for the affine only).
    tissue_model : {"noddi", "multi-tensor"}
        ``"noddi"``: Watson-dispersed sticks, zeppelin and free water (see the module docstring);
        the NODDI maps are the generating parameters. ``"multi-tensor"``: a discrete mixture of
        Gaussian tensors — per bundle, along each of six directions on a cone that carries the
        bundle's dispersion (its ⟨nnᵀ⟩ equals the Watson's), an intra-axonal tensor
        (d∥ = 1.7e-3, d⊥ = 0.1e-3 mm²/s) and the tortuous extra-axonal tensor; no free water
        inside tissue. Its cumulant kurtosis is close to what a DKI fit at b ≤ 3000 s/mm²
        measures; its truth has the DKI maps only. The sticks of ``"noddi"`` (zero radial diffusivity) and the free water inside tissue
        give a much higher exact kurtosis than any finite-b DKI fit reports.

    Returns
    -------
    Phantom

    Examples
    --------
    >>> from bioinverse.dmri.acquisition import three_shell_protocol
    >>> p = simulate_phantom(three_shell_protocol(), snr=20, seed=1, shape=(16, 18, 8))
    >>> p.dwi.shape, p.dwi.dtype
    ((16, 18, 8, 148), dtype('float32'))
    >>> sorted(np.unique(p.maps["tissue"]).astype(int).tolist())
    [0, 1, 2, 3]
    """
    if not isinstance(gtab, GradientTable):
        raise InputError("gtab", "must be a GradientTable")
    if not (isinstance(snr, (int, float, np.floating)) and snr > 0 and not np.isnan(snr)):
        raise InputError("snr", f"must be a positive number (or inf for noise-free signals), got {snr!r}")
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise InputError("shape", f"must be three sizes of at least 8 voxels, got {tuple(shape)}")
    if tissue_model not in ("noddi", "multi-tensor"):
        raise InputError("tissue_model", f"must be 'noddi' or 'multi-tensor', got {tissue_model!r}")
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)

    # Subject-specific geometry: size, position, in-plane rotation, folding phase, crossing band.
    radii = np.array(shape, float) / 2 * 0.92 * rng.uniform(0.94, 1.0, 3)
    centre = (np.array(shape, float) - 1) / 2 + rng.uniform(-0.7, 0.7, 3) * [1, 1, 0.3]
    angle = rng.uniform(-0.1, 0.1)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), axis=-1)
    rel = grid - centre
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    u = (rel @ rot) / radii  # ellipsoidal coordinates, |u| = 1 on the brain surface
    r = np.linalg.norm(u, axis=-1)
    theta = np.arctan2(u[..., 1], u[..., 0])

    phase = rng.uniform(0, 2 * np.pi)
    csf_start = 0.93 + 0.025 * np.sin(7 * theta + phase)
    gm_start = 0.74 + 0.06 * np.sin(7 * theta + phase) + 0.02 * np.sin(3 * theta - phase)
    brain = r <= 1.0
    ventricle_centre = np.array([0.0, 0.18 * rng.uniform(0.8, 1.2), 0.0])
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        c = ventricle_centre + [side * 0.13, 0, 0]
        ventricles |= np.linalg.norm((u - c) / [0.08, 0.28, 0.5], axis=-1) <= 1
    csf = brain & ((r > csf_start) | ventricles)
    gm = brain & ~csf & (r > gm_start)
    wm = brain & ~csf & ~gm

    # The crossing band: a sector of white matter where a radial bundle crosses the arcs.
    band_angle = rng.uniform(0, 2 * np.pi)
    band = np.abs(np.angle(np.exp(1j * (theta - band_angle)))) < 0.45
    crossing = wm & band & (r > 0.3)

    tangent = _unit(np.stack([-u[..., 1], u[..., 0], 0.25 * np.sin(np.pi * u[..., 2])], axis=-1) + 1e-9)
    radial = _unit(np.stack([u[..., 0], u[..., 1], 0.5 * u[..., 2]], axis=-1) + 1e-9)
    tangent, radial = tangent @ rot.T, radial @ rot.T  # back to the grid frame

    fields = [_smooth_field(rng, shape, sigma=max(shape) / 12) for _ in range(4)]
    icvf = np.where(wm, 0.62 + 0.10 * fields[0], 0.36 + 0.07 * fields[0])
    odi = np.where(wm, 0.12 + 0.05 * fields[1], 0.55 + 0.10 * fields[1])
    isovf = np.where(wm, 0.04 + 0.02 * fields[2], 0.10 + 0.04 * fields[2])
    icvf, odi = np.clip(icvf, 0.15, 0.9), np.clip(odi, 0.03, 0.9)
    isovf = np.clip(isovf, 0.0, 0.3) if tissue_model == "noddi" else np.zeros(shape)
    isovf[csf] = 1.0
    icvf[csf], odi[csf] = 0.0, 0.0
    weight2 = np.where(crossing, 0.45 + 0.05 * fields[3].clip(-1, 1), 0.0)
    mu1 = np.where(gm[..., None], radial, tangent)
    coil = 1.0 + 0.08 * fields[3]
    s0 = coil * np.select([wm, gm, csf], [_S0["wm"], _S0["gm"], _S0["csf"]], 0.0)

    # Signals and exact moments, voxel-wise on the brain.
    v_ic, v_iso, w2 = icvf[brain], isovf[brain], weight2[brain]
    odi_b = np.maximum(odi[brain], 0.03)
    bundles = ((mu1[brain], 1 - w2), (radial[brain], w2))
    if tissue_model == "noddi":
        attenuation, (M1, M2) = _noddi_tissue(gtab, v_ic, odi_b, v_iso, bundles)
    else:
        attenuation, (M1, M2) = _multi_tensor_tissue(gtab, v_ic, odi_b, v_iso, bundles)
    clean = s0[brain][:, None] * attenuation
    D, W = cumulant_tensors(M1, M2)
    measures = kurtosis_measures(D, W)

    dwi = np.zeros(shape + (len(gtab),), np.float32)
    noisy = clean if snr == np.inf else rician_noise(clean, snr, s0=1.0, rng=rng)
    dwi[brain] = noisy
    maps: dict[str, np.ndarray] = {}
    for name in _DKI_MAPS:
        m = np.zeros(shape, np.float32)
        m[brain] = measures[name]
        maps[name] = m
    if tissue_model == "noddi":
        for name, values in (("icvf", icvf), ("odi", odi), ("isovf", isovf)):
            maps[name] = np.where(brain, values, 0).astype(np.float32)
    maps["s0"] = np.where(brain, s0, 0).astype(np.float32)
    maps["tissue"] = np.select([wm, gm, csf], [1, 2, 3], 0).astype(np.float32)
    maps["crossing"] = crossing.astype(np.float32)
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -voxel_size * (np.array(shape) - 1) / 2
    return Phantom(dwi=dwi, gtab=gtab, mask=brain, maps=maps, affine=affine, snr=float(snr), seed=seed)


def _noddi_tissue(gtab, icvf, odi, isovf, bundles):
    """Attenuation (N, n) and exact compartment moments of NODDI tissue with weighted bundles."""
    kappa = odi_to_kappa(odi)
    attenuation = isovf[:, None] * np.exp(-gtab.bvals * D_ISO)[None, :]
    tissue = isovf < 1
    M1 = np.zeros((len(icvf), 3, 3))
    M2 = np.zeros((len(icvf), 3, 3, 3, 3))
    for mu, w in bundles:
        active = tissue & (w > 0)
        attenuation[active] += ((1 - isovf[active]) * w[active])[:, None] * neurite_signal(
            gtab, icvf[active], kappa[active], mu[active], d_par=D_PAR)
        m1, m2 = noddi_moments(icvf, odi, isovf, mu, d_par=D_PAR, d_iso=D_ISO, weight=w)
        M1 += m1
        M2 += m2
    return attenuation, (M1, M2)


def _ring_directions(mu: np.ndarray, m2: np.ndarray, n: int = 6) -> np.ndarray:
    """``n`` unit vectors on a cone around each ``mu`` (N, 3) whose mean ⟨(μ·n)²⟩ equals ``m2``.

    A ring of n ≥ 5 equally spaced directions at polar angle θ, cos²θ = m2, has the second
    moment tensor m2 μμᵀ + (1 − m2)/2 (I − μμᵀ) of the Watson distribution with that m2:
    a discrete orientation dispersion. Returns (N, n, 3).
    """
    helper = np.where(np.abs(mu[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    e1 = _unit(np.cross(mu, helper))
    e2 = np.cross(mu, e1)
    cos_t, sin_t = np.sqrt(m2)[:, None, None], np.sqrt(1 - m2)[:, None, None]
    phi = 2 * np.pi * np.arange(n) / n
    ring = np.cos(phi)[None, :, None] * e1[:, None, :] + np.sin(phi)[None, :, None] * e2[:, None, :]
    return cos_t * mu[:, None, :] + sin_t * ring


def _multi_tensor_tissue(gtab, icvf, odi, isovf, bundles):
    """Attenuation and exact moments of the Gaussian mixture: per bundle, an intra-axonal and a
    tortuous extra-axonal tensor along each direction of a ring that carries the bundle's
    dispersion (:func:`_ring_directions`), plus free water."""
    from bioinverse.dmri.noddi import watson_moments
    from bioinverse.dmri.signal import axially_symmetric_tensor, multi_tensor_moments, multi_tensor_signal

    m2, _ = watson_moments(odi_to_kappa(odi))
    n_vox = len(icvf)
    fractions, tensors = [isovf[:, None]], [np.broadcast_to(D_ISO * np.eye(3), (n_vox, 1, 3, 3))]
    for mu, w in bundles:
        directions = _ring_directions(mu, m2)
        share = ((1 - isovf) * w)[:, None] / directions.shape[1]
        for fraction, d_perp in ((icvf, np.full_like(icvf, D_PERP_AXON)), (1 - icvf, D_PAR * (1 - icvf))):
            fractions.append(share * fraction[:, None] * np.ones(directions.shape[1]))
            tensors.append(axially_symmetric_tensor(directions, D_PAR, d_perp[:, None]))
    fractions, tensors = np.concatenate(fractions, axis=1), np.concatenate(tensors, axis=1)
    return multi_tensor_signal(gtab, fractions, tensors), multi_tensor_moments(fractions, tensors)
