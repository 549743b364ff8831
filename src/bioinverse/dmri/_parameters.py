"""What the two trained microstructure estimators (hybrid, fully learned) share: the output
columns, the protocol check and the min-max scaling of the six parameters."""

from __future__ import annotations

from typing import Any

import numpy as np

from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError

#: Output columns, in the order of :meth:`bioinverse.dmri.crossing.Microstructure.as_array`.
PARAMETER_NAMES = ("nu1", "r1", "f1", "nu2", "r2", "f2")
#: Targets may exceed their ranges by this much (rounding of stored truths) before fit refuses.
RANGE_SLACK = 1e-9


def check_protocol(protocol: Any, name: str = "protocol") -> PGSEProtocol:
    """``protocol`` if it is a :class:`PGSEProtocol` with a G = 0 measurement to normalise by."""
    if not isinstance(protocol, PGSEProtocol):
        raise InputError(name, f"must be a PGSEProtocol, got {type(protocol).__name__}")
    if not protocol.b0s_mask.any():
        raise InputError(name, "has no measurement without diffusion weighting (G = 0) to normalise by")
    return protocol


def scale(values: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Map (V, 6) parameters to [0, 1] column by column; ``ranges`` is (6, 2) [low, high]."""
    low, high = ranges[:, 0], ranges[:, 1]
    return (values - low) / (high - low)


def unscale(z: np.ndarray, ranges: np.ndarray, nu1_floor: float = 0.0) -> np.ndarray:
    """Inverse of :func:`scale`, projected onto the admissible set.

    ν₁ and ν₂ are replaced by the closest pair with ν₁ + ν₂ = 1 and ν₁ ∈ [``nu1_floor``, 1]
    (``0.5`` for the sorted-by-ν convention); radii and densities are clipped to their ranges.
    """
    low, high = ranges[:, 0], ranges[:, 1]
    omega = np.asarray(z, dtype=np.float64) * (high - low) + low
    nu1 = np.clip(0.5 * (omega[:, 0] - omega[:, 3] + 1.0), nu1_floor, 1.0)
    omega[:, 0], omega[:, 3] = nu1, 1.0 - nu1
    for column in (1, 2, 4, 5):
        np.clip(omega[:, column], low[column], high[column], out=omega[:, column])
    return omega
