"""Argument checks shared across modules; they raise :class:`~bioinverse.errors.InputError` (a ValueError)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from bioinverse.errors import InputError


def real_finite_array(x: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a float64 array; InputError if it is non-numeric, complex, NaN, Inf or (unless
    ``allow_empty``) empty."""
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputError(name, f"must be a numeric array, got dtype {a.dtype}")
    if np.iscomplexobj(a):
        raise InputError(name, f"must be real-valued, got dtype {a.dtype}")
    if a.size == 0 and not allow_empty:
        raise InputError(name, "is empty")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise InputError(name, "contains NaN or Inf")
    return a


def positive_number(value: float, name: str, *, unit: str = "", allow_zero: bool = False) -> float:
    """``value`` as a float; InputError unless finite and > 0 (≥ 0 with ``allow_zero``)."""
    what = f"{'non-negative' if allow_zero else 'positive'}, finite number{' of ' + unit if unit else ''}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"must be a {what}, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(name, f"must be a {what}, got {value!r}")
    return v


def nonempty_file(path) -> None:
    """InputError naming ``path`` when it is not an existing, non-empty file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty")
