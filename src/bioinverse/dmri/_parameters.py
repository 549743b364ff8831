"""What the two trained microstructure estimators (hybrid, fully learned) share: the output
columns, the protocol check, the min-max scaling of the six parameters, and the parts of their
model files that are the same."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError
from bioinverse.train import TrainConfig, TrainResult

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


# ---------------------------------------------------------------------- model files

_PROTOCOL_FIELDS = ("directions", "gradient_strength", "small_delta", "big_delta", "echo_time")


def protocol_record(protocol: PGSEProtocol) -> dict:
    """The protocol's arrays as tensors, for a ``torch.save`` payload read with ``weights_only``."""
    import torch

    return {name: torch.from_numpy(np.array(getattr(protocol, name), dtype=np.float64))
            for name in _PROTOCOL_FIELDS}


def training_record(config: TrainConfig, result: TrainResult) -> dict:
    """``config`` and ``train_result`` entries of a payload: plain numbers, strings, lists, dicts."""
    return {
        "config": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                   for k, v in dataclasses.asdict(config).items()},
        "train_result": {"history": [dict(h) for h in result.history], "best_epoch": int(result.best_epoch),
                         "best_val_loss": float(result.best_val_loss),
                         "stopped_early": bool(result.stopped_early), "epochs_run": int(result.epochs_run)},
    }


def read_model_file(path: Path, file_format: str, what: str) -> dict:
    """The payload of a model file, after checking that it exists, loads and carries ``file_format``."""
    import torch

    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise InputError(path, f"is not a readable model file, corrupt or truncated "
                               f"({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise InputError(path, f"is not a bioinverse {what} (no {file_format!r} format tag)")
    return payload


def stored_protocol(payload: dict) -> PGSEProtocol:
    """The protocol saved in a payload; ValueError if it does not match its recorded digest."""
    saved = PGSEProtocol(**{k: v.numpy() for k, v in payload["protocol"].items()})
    if saved.digest() != payload["protocol_digest"]:
        raise ValueError("the stored protocol does not match its digest")
    return saved


def stored_training(payload: dict) -> tuple[TrainConfig, TrainResult]:
    """Inverse of :func:`training_record` (configuration fields unknown to this version are dropped)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in payload["config"].items() if k in fields})
    tr = payload["train_result"]
    result = TrainResult(history=[dict(h) for h in tr["history"]], best_epoch=int(tr["best_epoch"]),
                         best_val_loss=float(tr["best_val_loss"]), stopped_early=bool(tr["stopped_early"]),
                         epochs_run=int(tr["epochs_run"]))
    return config, result
