r"""One expectation–maximisation pass over a set of particles (seed 002 §2.2, eqs. 8–9).

For particle :math:`i` with Fourier image :math:`y_i`, CTF :math:`c_i` and a pose :math:`g = (j, k)`
(orientation :math:`R_j`, in-plane shift :math:`s_k`), the forward model is
:math:`H_g x = c_i\, S_k\, P_j x`, with :math:`P_j` the Fourier slice at :math:`R_j` and :math:`S_k` the
phase ramp of the shift. With white Gaussian noise of power :math:`\sigma^2(\xi)` per Fourier coefficient
(eq. 5) the log-likelihood of a pose, up to a constant of the particle, is

.. math::

    \log P(y_i \mid x, g) = \sum_\xi w_\xi \frac{\operatorname{Re}\left[\overline{y_i} c_i S_k P_j x\right]}
                                                  {\sigma^2}
                            - \frac12 \sum_\xi w_\xi \frac{c_i^2 |P_j x|^2}{\sigma^2},

a sum over the half plane of the image spectrum with weights :math:`w_\xi = 2` for the coefficients that
stand for a Hermitian pair and 1 for the column :math:`k_x = 0` (and Nyquist) — the full-plane sum
:math:`-\tfrac12\sum |y - H_g x|^2/\sigma^2` of a real image, without :math:`\|y_i\|^2`. Both terms are
matrix products, so one E-step over many poses is a few GEMMs rather than a loop. The posterior over poses
(eq. 8) is a soft-max of these scores plus the log-prior of the shift (a Gaussian around the particle's
previous offset), computed with the log-sum-exp shift so that it never overflows.

The M-step accumulates (eq. 9)

.. math::

    B = \sum_i \mathbb{E}_g\!\left[H_g^* \sigma^{-2} y_i\right], \qquad
    K = \sum_i \mathbb{E}_g\!\left[\operatorname{diag}(H_g^* \sigma^{-2} H_g)\right]

by inserting, per orientation, the posterior-weighted sum of the CTF-weighted, shift-corrected images into
the padded 3-D Fourier grid (the exact adjoint of the projector). Only the half plane of each image is
inserted; :func:`hermitian_sum` adds the mirror half afterwards.

Two searches share these formulas:

* :func:`global_search`: every particle against every orientation of one grid. The projections are made
  once and shared by all particles, and the M-step sums over particles before it inserts anything, so both
  steps are dense GEMMs.
* :func:`local_search`: each particle against its own few orientations near its previous pose (RELION's local
  searches). The scores are batched matrix products per particle, the posterior is pruned to the poses that
  carry ``adaptive_fraction`` of its mass (RELION's ``--adaptive_fraction``), and only slices of
  orientations with weight left are inserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bioinverse.cryoem.projection import FourierProjector, shift_phases

# Below this share of poses left after pruning, the M-step uses a sparse product.
SPARSE_BELOW = 0.02

__all__ = ["Band", "StepResult", "global_search", "hermitian_sum", "local_search"]


@dataclass
class Band:
    """The particles' data restricted to the Fourier pixels used in this iteration.

    Attributes
    ----------
    box : int
        Image side N in pixels.
    pixels : torch.Tensor, shape (n_pix, 2)
        Half-plane frequencies (kx, ky) in Fourier pixels of the N-box.
    shells : torch.Tensor of int64, shape (n_pix,)
        Fourier shell of each pixel (its rounded radius).
    weight : torch.Tensor, shape (n_pix,)
        Half-plane weight: 2 for a coefficient standing for a Hermitian pair, 1 on kx = 0 and Nyquist.
    spectra : torch.Tensor, complex64, shape (n, n_pix)
        The particles' Fourier images at ``pixels``.
    ctf : torch.Tensor, float32, shape (n, n_pix)
        Each particle's CTF at ``pixels``.
    inv_sigma2 : torch.Tensor, float32, shape (n_pix,)
        1 / noise power of each pixel.
    """

    box: int
    pixels: torch.Tensor
    shells: torch.Tensor
    weight: torch.Tensor
    spectra: torch.Tensor
    ctf: torch.Tensor
    inv_sigma2: torch.Tensor

    def __len__(self) -> int:
        return self.spectra.shape[0]

    @property
    def insertion_factor(self) -> torch.Tensor:
        """Half the likelihood weight: inserted once here, once more by :func:`hermitian_sum`."""
        return 0.5 * self.weight


@dataclass
class StepResult:
    r"""What one E/M pass returns for a set of particles.

    Attributes
    ----------
    numerator, denominator : torch.Tensor, shape (P, P, P)
        The accumulators B (complex64) and K (float32) on the padded Fourier grid, half-plane insertions
        only (see :func:`hermitian_sum`).
    orientation : ndarray of int, shape (n,)
        Index of each particle's most probable orientation in the orientation grid searched.
    shift : ndarray, shape (n, 2)
        Its most probable in-plane shift in pixels (image = projection translated by it).
    max_probability : ndarray, shape (n,)
        Posterior probability of that pose (RELION's rlnMaxValueProbDistribution).
    significant : ndarray of int, shape (n,)
        Number of poses left after pruning (all poses of a global search).
    noise_power, noise_count : ndarray, shape (n_shells,)
        Sum of :math:`|y - H_{\hat g} x|^2` at the most probable pose per Fourier shell, and the number of
        coefficients summed: the noise spectrum estimate is their ratio.
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    orientation: np.ndarray
    shift: np.ndarray
    max_probability: np.ndarray
    significant: np.ndarray
    noise_power: np.ndarray
    noise_count: np.ndarray


def _real_pair(z: torch.Tensor) -> torch.Tensor:
    """[Re z, Im z] along the last axis: a complex inner product's real part as one real GEMM."""
    return torch.cat([z.real, z.imag], dim=-1)


def _score_terms(band: Band, y: torch.Tensor, ctf: torch.Tensor, phase: torch.Tensor):
    """The data side of the two score terms: conj(y)·c·w/σ²·S per shift (c, n_t, n_pix), and c²·w/σ² (c, n_pix)."""
    weight = band.weight * band.inv_sigma2
    return (y.conj() * ctf * weight)[:, None, :] * phase, ctf.square() * weight


def _insertion_terms(band: Band, y: torch.Tensor, ctf: torch.Tensor, phase: torch.Tensor):
    """What eq. 9 back-projects per pose: c·conj(S)·y/σ² (c, n_t, n_pix) into B and c²/σ² (c, n_pix) into K."""
    weight = band.insertion_factor * band.inv_sigma2
    return (ctf * weight)[:, None, :] * phase.conj() * y[:, None, :], ctf.square() * weight


def _noise_sums(band: Band, residual: torch.Tensor, n_shells: int) -> tuple[np.ndarray, np.ndarray]:
    power = (residual.real.square() + residual.imag.square()).sum(0).double()
    sums = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, band.shells, power)
    counts = torch.bincount(band.shells, minlength=n_shells).double() * residual.shape[0]
    return sums.numpy(), counts.numpy()


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise soft-max computed in place (the score tensor is the largest array of an E-step)."""
    scores -= scores.amax(dim=1, keepdim=True)
    scores.exp_()
    scores /= scores.sum(dim=1, keepdim=True)
    return scores


def global_search(
    volume_ft: torch.Tensor,
    projector: FourierProjector,
    band: Band,
    rotations: torch.Tensor,
    translations: torch.Tensor,
    previous_shifts: torch.Tensor,
    offset_sigma: float,
    n_shells: int,
    adaptive_fraction: float = 0.999,
    budget: int = 24_000_000,
    progress: Callable[[int], None] | None = None,
) -> StepResult:
    """E- and M-step of every particle over all ``rotations`` × ``translations``.

    Parameters
    ----------
    volume_ft : torch.Tensor, complex64, shape (P, P, P)
        The reference from :meth:`FourierProjector.transform`.
    projector : FourierProjector
    band : Band
    rotations : torch.Tensor, shape (n_orient, 3, 3)
        The orientation grid.
    translations : torch.Tensor, shape (n_t, 2)
        Shifts in pixels searched around each particle's previous shift.
    previous_shifts : torch.Tensor, shape (n, 2)
    offset_sigma : float
        Width in pixels of the Gaussian prior on the shift change.
    n_shells : int
        Number of Fourier shells for the noise sums.
    adaptive_fraction : float
        Poses are pruned while at most ``1 − adaptive_fraction`` of each posterior is lost (1: none).
    budget : int
        Largest number of pose scores held at once (sets the particle chunk).
    progress : callable, optional
        Called with the number of particles finished after each chunk.

    Returns
    -------
    StepResult
    """
    n_orient, n_t = rotations.shape[0], translations.shape[0]
    projections = projector.A(volume_ft, rotations, band.pixels)  # (n_orient, n_pix)
    proj_pair = _real_pair(projections)  # (n_orient, 2 n_pix)
    proj_power = projections.real.square() + projections.imag.square()
    log_prior = -(translations.square().sum(-1)) / (2.0 * offset_sigma**2)  # (n_t,)
    n_pix = band.pixels.shape[0]

    num_img = torch.zeros(n_orient, 2 * n_pix)
    den_img = torch.zeros(n_orient, n_pix)
    n = len(band)
    orientation = np.empty(n, np.int64)
    shift = np.empty((n, 2))
    max_probability = np.empty(n)
    significant = np.empty(n, np.int64)
    noise_power = np.zeros(n_shells)
    noise_count = np.zeros(n_shells)
    chunk = max(1, budget // (n_t * n_orient))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        y, ctf = band.spectra[sl], band.ctf[sl]
        c = y.shape[0]
        shifts = previous_shifts[sl, None, :] + translations[None]  # (c, n_t, 2)
        phase = torch.as_tensor(shift_phases(band.pixels, shifts, band.box))  # (c, n_t, n_pix)
        data, ctf_power = _score_terms(band, y, ctf, phase)
        data_pair = torch.cat([data.real, -data.imag], dim=-1).reshape(c * n_t, 2 * n_pix)
        scores = (data_pair @ proj_pair.T).view(c, n_t, n_orient)
        norm = ctf_power @ proj_power.T  # (c, n_orient)
        scores -= 0.5 * norm[:, None, :]
        scores += log_prior[None, :, None]
        weights = _softmax_(scores.view(c, -1)).view(c, n_t, n_orient)
        best_p, best = weights.view(c, -1).max(dim=1)
        best_t, best_j = best // n_orient, best % n_orient
        orientation[sl] = best_j.numpy()
        shift[sl] = shifts[torch.arange(c), best_t].numpy()
        max_probability[sl] = best_p.numpy()

        residual = y - ctf * projections[best_j] * phase[torch.arange(c), best_t]
        power, count = _noise_sums(band, residual, n_shells)
        noise_power += power
        noise_count += count

        # Pruning with a guarantee: dropping every pose below (1 − fraction) / n_poses loses at most
        # 1 − fraction of the posterior mass (RELION's --adaptive_fraction), without sorting.
        weights = weights.view(c, -1)
        weights.masked_fill_(weights < (1.0 - adaptive_fraction) / (n_t * n_orient), 0.0)
        weights /= weights.sum(1, keepdim=True)
        significant[sl] = torch.count_nonzero(weights, dim=1).numpy()
        inserted, inserted_power = _insertion_terms(band, y, ctf, phase)
        inserted = _real_pair(inserted).reshape(c * n_t, 2 * n_pix)
        weights = weights.view(c * n_t, n_orient)
        n_kept = int(significant[sl].sum())
        if n_kept < SPARSE_BELOW * weights.numel():
            # Peaked posteriors: a sparse product over the poses left costs a fraction of the dense one.
            rows, cols = weights.nonzero(as_tuple=True)
            sparse = torch.sparse_coo_tensor(torch.stack([cols, rows]), weights[rows, cols], (n_orient, c * n_t),
                                             check_invariants=False)
            num_img += torch.sparse.mm(sparse, inserted)
        else:
            num_img += weights.T @ inserted
        den_img += weights.view(c, n_t, n_orient).sum(1).T @ inserted_power
        del scores, weights, data_pair, inserted
        if progress is not None:
            progress(c)

    numerator_slices = torch.complex(num_img[:, :n_pix], num_img[:, n_pix:])
    size = projector.padded_box
    numerator = torch.zeros((size,) * 3, dtype=torch.complex64)
    denominator = torch.zeros((size,) * 3, dtype=torch.float32)
    projector.insert(numerator_slices, den_img, rotations, band.pixels, numerator, denominator)
    return StepResult(numerator, denominator, orientation, shift, max_probability, significant, noise_power,
                      noise_count)


def local_search(
    volume_ft: torch.Tensor,
    projector: FourierProjector,
    band: Band,
    rotations: torch.Tensor,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    translations: torch.Tensor,
    previous_shifts: torch.Tensor,
    offset_sigma: float,
    n_shells: int,
    adaptive_fraction: float = 0.999,
    budget: int = 24_000_000,
    progress: Callable[[int], None] | None = None,
) -> StepResult:
    """E- and M-step of each particle over its own candidate orientations.

    Parameters
    ----------
    volume_ft, projector, band, translations, previous_shifts, offset_sigma, n_shells, budget, progress
        As in :func:`global_search`.
    rotations : torch.Tensor, shape (n_orient, 3, 3)
        The orientation grid the candidates index.
    candidates : torch.Tensor of int64, shape (n, m)
        Each particle's candidate orientations (indices into ``rotations``), padded to a common length m.
    valid : torch.Tensor of bool, shape (n, m)
        False on padding.
    adaptive_fraction : float
        Each posterior is pruned to its most probable poses that together carry this fraction of it.

    Returns
    -------
    StepResult
        ``orientation`` indexes ``rotations``.
    """
    n, m = candidates.shape
    n_t = translations.shape[0]
    n_pix = band.pixels.shape[0]
    size = projector.padded_box
    numerator = torch.zeros((size,) * 3, dtype=torch.complex64)
    denominator = torch.zeros((size,) * 3, dtype=torch.float32)
    log_prior = -(translations.square().sum(-1)) / (2.0 * offset_sigma**2)
    orientation = np.empty(n, np.int64)
    shift = np.empty((n, 2))
    max_probability = np.empty(n)
    significant = np.empty(n, np.int64)
    noise_power = np.zeros(n_shells)
    noise_count = np.zeros(n_shells)
    # The projections (m per particle) dominate memory here, not the scores.
    chunk = max(1, budget // (m * max(n_t, 2 * n_pix)))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        y, ctf, cand, ok = band.spectra[sl], band.ctf[sl], candidates[sl], valid[sl]
        c = y.shape[0]
        rows = torch.arange(c)
        rot = rotations[cand.reshape(-1)]
        projections = projector.A(volume_ft, rot, band.pixels).view(c, m, n_pix)
        shifts = previous_shifts[sl, None, :] + translations[None]
        phase = torch.as_tensor(shift_phases(band.pixels, shifts, band.box))  # (c, n_t, n_pix)
        data, ctf_power = _score_terms(band, y, ctf, phase)
        scores = torch.bmm(torch.cat([data.real, -data.imag], dim=-1), _real_pair(projections).transpose(1, 2))
        power = projections.real.square() + projections.imag.square()
        norm = torch.einsum("cp,cmp->cm", ctf_power, power)
        scores -= 0.5 * norm[:, None, :]
        scores += log_prior[None, :, None]
        scores.masked_fill_(~ok[:, None, :], -torch.inf)
        weights = torch.softmax(scores.view(c, -1), dim=1)

        # Pruning: keep the smallest set of poses that holds adaptive_fraction of the posterior.
        possible = ok[:, None, :].expand(c, n_t, m).reshape(c, -1)
        if adaptive_fraction >= 1.0:
            keep = possible
        else:
            ordered, order = weights.sort(dim=1, descending=True)
            keep_sorted = (ordered.cumsum(1) - ordered) < adaptive_fraction
            keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted) & possible
        weights = torch.where(keep, weights, 0.0)
        weights /= weights.sum(1, keepdim=True)
        significant[sl] = keep.sum(1).numpy()
        best_p, best = weights.max(dim=1)
        best_t, best_m = best // m, best % m
        orientation[sl] = cand[rows, best_m].numpy()
        shift[sl] = shifts[rows, best_t].numpy()
        max_probability[sl] = best_p.numpy()
        weights = weights.view(c, n_t, m)

        residual = y - ctf * projections[rows, best_m] * phase[rows, best_t]
        p, cnt = _noise_sums(band, residual, n_shells)
        noise_power += p
        noise_count += cnt

        inserted, inserted_power = _insertion_terms(band, y, ctf, phase)
        num_img = torch.bmm(weights.transpose(1, 2), _real_pair(inserted))  # (c, m, 2 n_pix)
        per_orientation = weights.sum(1)  # (c, m)
        used = per_orientation > 0
        num_slices = torch.complex(num_img[..., :n_pix], num_img[..., n_pix:])[used]
        den_slices = per_orientation[used][:, None] * inserted_power[used.nonzero()[:, 0]]
        rot_used = rot.view(c, m, 3, 3)[used]
        projector.insert(num_slices, den_slices, rot_used, band.pixels, numerator, denominator)
        if progress is not None:
            progress(c)
    return StepResult(numerator, denominator, orientation, shift, max_probability, significant,
                      noise_power, noise_count)


def hermitian_sum(grid: torch.Tensor) -> torch.Tensor:
    r"""``grid(k) + conj(grid(-k))`` on a centred even-sided grid: adds the mirror half of the insertions.

    A real map's spectrum satisfies :math:`X(-k) = \overline{X(k)}`, so a half-plane coefficient inserted at
    :math:`k` is also a measurement of :math:`-k`. On a centred grid of even side P, index ``i`` holds
    frequency ``i - P/2`` and its mirror is index ``(P - i) mod P``.

    Examples
    --------
    >>> g = torch.zeros(4, 4, 4, dtype=torch.complex64)
    >>> g[2, 2, 3] = 1 + 2j   # frequency (0, 0, +1)
    >>> s = hermitian_sum(g)
    >>> complex(s[2, 2, 1]), complex(s[2, 2, 3])
    ((1-2j), (1+2j))
    """
    mirrored = torch.roll(torch.flip(grid, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
    return grid + (mirrored.conj() if grid.is_complex() else mirrored)
