r"""Priors of the M-step: Gaussian (eq. 11), regularisation by denoising (RED, eq. 17) and its
confidence-weighted form (CW-RED) (seed 002 §2.3 and §4.3).

With :math:`B, K` the accumulators of eq. 9 and :math:`\tau^2` the signal power per Fourier shell
(eq. 12), the Gaussian prior's M-step is the Wiener filter

.. math:: x = \frac{B}{K + \tau^{-2}} \qquad (11)

and RED replaces the prior's gradient by :math:`\tau^{-2}[f(\tilde x) - x]`, with :math:`f` a denoiser
trained on protein maps, giving

.. math::

    x = \frac{B + \lambda\, \tau^{-2}\, \mathcal F[f(\tilde x)]}{K + \tau^{-2}}, \qquad
    \tilde x = \frac{B}{K}. \qquad (17)

The denoiser acts on :math:`\tilde x`, the unregularised map of the latest E-step, in real space; its
output re-enters Fourier space through :meth:`FourierProjector.reconstruction_spectrum` so that it
stands on the same footing as :math:`B/K`. Both updates are evaluated as

.. math:: x = \frac{\tau^2 B + \lambda D}{\tau^2 K + 1}, \qquad D = \mathcal F[f(\tilde x)],

which is finite where :math:`\tau^2 = 0` (no signal measured: eq. 17 then returns :math:`\lambda D`, eq. 11
returns 0) and is eq. 11 exactly at :math:`\lambda = 0`.

Confidence weighting sets :math:`\lambda` from the nominal resolution :math:`\rho` (Å, the half-map FSC
0.143 crossing) where the denoiser is known to help:

.. math::

    \lambda(\rho) = \operatorname{clip}\!\left(\frac{\rho_{\text{low}} - \rho}
                    {\rho_{\text{low}} - \rho_{\text{high}}},\ 0,\ 1\right),

0 at :math:`\rho_{\text{low}} = 10` Å and worse, 1 at :math:`\rho_{\text{high}} = 4.5` Å and better, the
seed's values for its denoiser at 1.5 Å/pixel, read off the single-pass performance of the denoiser
against nominal resolution (its Fig. 1c: no gain worse than 10 Å, the gain levels off beyond 4.5 Å).
They are properties of a denoiser, not of physics: for another denoiser or sampling, measure its
single-pass curve (:func:`bioinverse.cryoem.denoiser.single_pass_ratio`, plotted by the ``cryoem_red``
benchmark) and place :math:`\rho_{\text{low}}` where the ratio departs from 1 and
:math:`\rho_{\text{high}}` where it stops falling. :math:`\rho_{\text{high}}` must stay coarser than
Nyquist (2 × pixel size) for :math:`\lambda` to reach 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bioinverse.errors import InputError

__all__ = ["GAUSSIAN", "PRIORS", "WEIGHT_FLOOR", "Prior", "cwred_weight", "nominal_resolution",
           "regularised_spectrum", "resolution_shell"]

#: The M-step priors :func:`bioinverse.cryoem.refine.refine` and ``relion-external`` know.
PRIORS = ("gaussian", "red", "cwred")

#: RELION's floor on K for the ratio B / K: this fraction of K's mean over the Fourier shell.
WEIGHT_FLOOR = 1e-3


def resolution_shell(fsc: np.ndarray, threshold: float = 0.143) -> float:
    """Fractional Fourier shell where the FSC first falls below ``threshold`` (linear interpolation).

    Examples
    --------
    >>> resolution_shell(np.array([1.0, 0.9, 0.5, 0.1, 0.0]))
    2.8925
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    below = np.nonzero(fsc[1:] < threshold)[0]
    if below.size == 0:
        return float(len(fsc) - 1)
    s = below[0] + 1
    f0, f1 = fsc[s - 1], fsc[s]
    return float(s - 1 + (f0 - threshold) / (f0 - f1)) if f0 != f1 else float(s)


def nominal_resolution(fsc: np.ndarray, box: int, pixel_size: float, threshold: float = 0.143) -> float:
    """Å at the half-map FSC's ``threshold`` crossing, ``box · pixel_size / shell`` (inf before shell 1)."""
    shell = resolution_shell(fsc, threshold)
    return box * pixel_size / shell if shell > 0 else math.inf


def cwred_weight(resolution: float, low: float = 10.0, high: float = 4.5) -> float:
    """λ of CW-RED at a nominal resolution (Å): 0 at ``low`` and worse, 1 at ``high`` and better, linear between.

    Examples
    --------
    >>> cwred_weight(12.0), cwred_weight(7.25), cwred_weight(3.0)
    (0.0, 0.5, 1.0)
    """
    if not (math.isfinite(low) and math.isfinite(high) and low > high > 0):
        raise InputError("confidence thresholds", f"need low > high > 0 Å, got low={low}, high={high}")
    if math.isnan(resolution):
        raise InputError("resolution", "is NaN")
    return float(min(1.0, max(0.0, (low - resolution) / (low - high))))


@dataclass(frozen=True)
class Prior:
    """Which M-step prior to apply, and how strongly.

    Attributes
    ----------
    kind : {"gaussian", "red", "cwred"}
    strength : float
        λ of RED in [0, 1]; for CW-RED the largest λ the confidence weighting reaches.
    low_resolution, high_resolution : float
        Å; CW-RED's thresholds (:func:`cwred_weight`).
    """

    kind: str = "gaussian"
    strength: float = 1.0
    low_resolution: float = 10.0
    high_resolution: float = 4.5

    def __post_init__(self) -> None:
        if self.kind not in PRIORS:
            raise InputError("prior", f"must be one of {', '.join(PRIORS)}, got {self.kind!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise InputError("prior strength", f"λ must be in [0, 1], got {self.strength}")
        cwred_weight(self.low_resolution, self.low_resolution, self.high_resolution)  # validates them

    @property
    def needs_denoiser(self) -> bool:
        return self.kind != "gaussian"

    def weight(self, resolution: float) -> float:
        """λ at a nominal resolution (Å): 0 for the Gaussian prior, ``strength`` for RED, confidence-weighted for CW-RED."""
        if self.kind == "gaussian":
            return 0.0
        if self.kind == "red":
            return self.strength
        return self.strength * cwred_weight(resolution, self.low_resolution, self.high_resolution)


#: RELION's prior: the Gaussian of eq. 6.
GAUSSIAN = Prior()


def regularised_spectrum(numerator: torch.Tensor, denominator: torch.Tensor, tau2: torch.Tensor,
                         denoised: torch.Tensor | None = None, weight: float = 0.0) -> torch.Tensor:
    r"""Eq. 17, :math:`(\tau^2 B + \lambda D) / (\tau^2 K + 1)`; eq. 11 when ``weight`` is 0 or ``denoised`` None.

    Parameters
    ----------
    numerator, denominator : torch.Tensor
        B (complex) and K (real) on one grid.
    tau2 : torch.Tensor
        τ² per voxel of that grid (0 where no signal is expected).
    denoised : torch.Tensor, optional
        D, the denoiser's output in the same Fourier layout and units as B / K.
    weight : float
        λ.

    Examples
    --------
    >>> B, K, t = torch.tensor([2.0 + 0j]), torch.tensor([1.0]), torch.tensor([1.0])
    >>> regularised_spectrum(B, K, t), regularised_spectrum(B, K, t, torch.tensor([4.0 + 0j]), 1.0)
    (tensor([1.+0.j]), tensor([3.+0.j]))
    """
    gain = tau2 / (denominator * tau2 + 1.0)
    if denoised is None or weight == 0.0:
        return numerator * gain
    return (numerator * tau2 + weight * denoised) / (denominator * tau2 + 1.0)
