"""The training loop shared by every learned estimator.

:func:`fit` trains a :class:`torch.nn.Module` in place on arrays that fit in memory. It

* validates the data (matching first dimensions, non-empty, finite) and moves them once to the
  device as tensors;
* holds out a seeded random fraction of the training data for validation, unless validation data
  are given;
* draws minibatches from a fresh permutation every epoch, taken from its own
  :class:`torch.Generator` so that the data order does not depend on anything else that consumes
  random numbers;
* sets the learning rate itself at the start of every epoch (warm-up, then an optional schedule
  driven by the training or validation loss) through ``param_group["lr"]``;
* stops early on the validation loss only, and by default puts back the weights of the best
  validation epoch;
* writes a JSON log and a checkpoint, atomically, so that an interrupted run (Ctrl-C included)
  resumes where it stopped and ends with exactly the weights an uninterrupted run would have
  reached (on the CPU; CUDA kernels are deterministic only under
  ``torch.use_deterministic_algorithms(True)``).

Epochs are numbered from 0 everywhere (history, ``best_epoch``, warm-up).

Learning-rate rules
-------------------
``warmup_epochs`` epochs run at ``warmup_lr``; from then on the rate starts at ``lr`` and the
schedule may lower it after each epoch (never below ``min_lr``). The schedule only sees epochs
after the warm-up, because losses measured at the warm-up rate say nothing about the main rate.

``"plateau"``
    ``lr × schedule_factor`` once the validation loss has not improved on its best for
    ``schedule_patience`` epochs in a row (the count then restarts).
``"stagnation"``
    ``lr × schedule_factor`` after every epoch at which the mean training loss of the last
    ``schedule_patience`` epochs is not lower than the mean of the ``schedule_patience`` epochs
    before them (:func:`window_stagnates`).
``"cosine"``
    Half a cosine from ``lr`` down to ``min_lr`` over the epochs after the warm-up (Loshchilov &
    Hutter, ICLR 2017, without restarts): epoch ``k`` of ``K = max_epochs − warmup_epochs`` runs at
    ``min_lr + (lr − min_lr)(1 + cos(π k / K)) / 2``. It depends on ``max_epochs``, which then
    becomes part of the checkpoint's fingerprint.

Early stopping
--------------
``"patience"``
    Stop once the validation loss has not improved on its best for ``patience`` epochs in a row.
``"window"``
    Stop when the mean validation loss of the last ``patience`` epochs is higher than the mean of
    the ``patience`` epochs before them (:func:`window_rises`).

Example: the q-space deep learning recipe
-----------------------------------------
Golkov et al. (2016) train their q-space networks with SGD (momentum 0.9, minibatches of 128) at
a learning rate of 0.01 after 10 warm-up epochs at 0.001, multiply the rate by 0.9 whenever the
mean training error of the last 5 epochs is not lower than that of the 5 before, hold out 10 % of
the training voxels, and stop when the mean validation error of the last 10 epochs rises::

    TrainConfig(optimizer="sgd", momentum=0.9, batch_size=128, lr=0.01,
                warmup_epochs=10, warmup_lr=0.001,
                schedule="stagnation", schedule_factor=0.9, schedule_patience=5,
                val_fraction=0.1, early_stopping="window", patience=10)

Checkpoints
-----------
A checkpoint holds the model and optimiser states, the current learning rate and the state of the
schedule and of early stopping, the history, the best weights with their epoch and loss, every
random state that training touches (torch's global generator, which dropout uses; CUDA's; the
data-order generator; NumPy's and Python's global generators, which a custom loss may use) and a
fingerprint of everything that shapes the result: the configuration fields that matter, the
model's parameter names and shapes, and a digest of the data. Resuming with a checkpoint whose
fingerprint differs raises a ``ValueError`` that names the first field that differs;
``max_epochs`` (except under the cosine schedule), ``restore_best``, ``device``,
``checkpoint_every``, ``log`` and ``progress`` may change between runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bioinverse.errors import InputError
from bioinverse.io import atomic_path, write_json

__all__ = [
    "TrainConfig",
    "TrainResult",
    "fit",
    "select_device",
    "seed_everything",
    "window_rises",
    "window_stagnates",
    "PlateauSchedule",
    "StagnationSchedule",
    "CosineSchedule",
    "ConstantSchedule",
    "EarlyStopping",
]

log = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = "bioinverse.train/1"
_OPTIMIZERS = ("sgd", "adam", "adagrad")
_SCHEDULES = ("none", "plateau", "stagnation", "cosine")
_STOPPING = ("none", "patience", "window")
_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "cross_entropy": F.cross_entropy,
    "bce_logits": F.binary_cross_entropy_with_logits,
}
# These compare prediction and target element by element; a shape mismatch would broadcast
# silently (an (n, 1) output against (n,) targets gives an n×n loss) instead of failing.
_ELEMENTWISE = ("mse", "l1", "bce_logits")

# Configuration fields that change the trajectory of training; the others (max_epochs,
# restore_best, device, checkpoint, checkpoint_every, log, progress) may differ on resume.
_FINGERPRINT_FIELDS = (
    "optimizer", "lr", "momentum", "weight_decay", "batch_size", "val_fraction", "warmup_epochs",
    "warmup_lr", "schedule", "schedule_factor", "schedule_patience", "min_lr", "early_stopping",
    "patience", "loss", "seed",
)


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How :func:`fit` trains a model.

    Parameters
    ----------
    optimizer : {"sgd", "adam", "adagrad"}
        ``"sgd"`` uses ``momentum``.
    lr : float
        Learning rate after the warm-up (the schedule starts from it).
    momentum : float
        SGD momentum.
    weight_decay : float
        L2 penalty passed to the optimiser.
    batch_size : int
        Minibatch size for training and for evaluating the validation loss.
    max_epochs : int
        Total number of epochs, counting those already run by a resumed checkpoint.
    val_fraction : float
        Fraction of the training samples held out for validation (at least one sample), ignored
        when validation data are given to :func:`fit`. ``0`` trains on everything and has no
        validation loss: early stopping, the plateau schedule and ``restore_best`` then do not
        apply (early stopping must be ``"none"``).
    warmup_epochs : int
        Number of epochs run at ``warmup_lr`` before ``lr``.
    warmup_lr : float or None
        Learning rate of the warm-up; required when ``warmup_epochs > 0``.
    schedule : {"none", "plateau", "stagnation", "cosine"}
        Learning-rate schedule after the warm-up (see the module documentation).
    schedule_factor : float
        Factor in (0, 1] applied to the learning rate when the schedule fires.
    schedule_patience : int
        Plateau: epochs without improvement of the validation loss. Stagnation: the window length
        over which mean training losses are compared.
    min_lr : float
        The schedule never lowers the learning rate below this.
    early_stopping : {"none", "patience", "window"}
        Stopping rule on the validation loss (see the module documentation).
    patience : int
        Epochs without improvement (``"patience"``) or window length (``"window"``).
    restore_best : bool
        Leave the model with the weights of the epoch with the lowest validation loss.
    loss : {"mse", "l1", "cross_entropy", "bce_logits"}
        Training and validation loss; :func:`fit` also accepts a callable.
    seed : int
        Seeds the held-out split, the data order and the global generators (dropout).
    device : str
        ``"auto"`` (CUDA when available, else CPU), or any torch device string.
    checkpoint : str or os.PathLike or None
        Checkpoint file, written every ``checkpoint_every`` epochs, at the end and on Ctrl-C; a
        run whose checkpoint exists resumes from it.
    checkpoint_every : int
        Epochs between checkpoints.
    log : str or os.PathLike or None
        JSON log (configuration, one record per epoch, outcome), rewritten after every epoch.
    progress : bool
        Show a progress bar (on stderr) with the losses and the learning rate.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 100
    val_fraction: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float | None = None
    schedule: str = "none"
    schedule_factor: float = 0.5
    schedule_patience: int = 5
    min_lr: float = 0.0
    early_stopping: str = "patience"
    patience: int = 10
    restore_best: bool = True
    loss: str = "mse"
    seed: int = 0
    device: str = "auto"
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 1
    log: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, problem: str) -> InputError:
            return InputError(f"TrainConfig.{name}", problem)

        for name, choices in (
            ("optimizer", _OPTIMIZERS),
            ("schedule", _SCHEDULES),
            ("early_stopping", _STOPPING),
            ("loss", tuple(_LOSSES)),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(map(repr, choices))}, "
                                f"got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "min_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, f"must be a non-negative number, got {value}")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"({self.min_lr}) is larger than lr ({self.lr})")
        for name, low in (("batch_size", 1), ("max_epochs", 1), ("warmup_epochs", 0),
                          ("schedule_patience", 1), ("patience", 1), ("checkpoint_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"must be an integer >= {low}, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.schedule_factor <= 1.0:
            raise bad("schedule_factor", f"must be in (0, 1], got {self.schedule_factor}")
        if self.warmup_epochs > 0:
            if self.warmup_lr is None:
                raise bad("warmup_lr", f"is required when warmup_epochs={self.warmup_epochs}")
            if not (math.isfinite(self.warmup_lr) and self.warmup_lr > 0):
                raise bad("warmup_lr", f"must be a positive number, got {self.warmup_lr}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", f"must be a non-negative integer, got {self.seed!r}")


@dataclass
class TrainResult:
    """What :func:`fit` reports.

    Attributes
    ----------
    history : list of dict
        One record per epoch run (including those of a resumed checkpoint): ``epoch`` (from 0),
        ``train_loss``, ``val_loss`` (``None`` without validation), ``lr`` (the rate used during
        that epoch) and ``seconds``.
    best_epoch : int
        Epoch with the lowest validation loss (the last epoch without validation).
    best_val_loss : float
        Its validation loss (NaN without validation).
    stopped_early : bool
        Whether early stopping ended training before ``max_epochs``.
    epochs_run : int
        Number of epochs in ``history``.
    """

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.nan
    stopped_early: bool = False
    epochs_run: int = 0


# --------------------------------------------------------------------------------------------
# Devices and seeds
# --------------------------------------------------------------------------------------------


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve a device name, refusing one that this machine cannot use.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` picks ``cuda`` when available, else ``cpu``; anything else is parsed by
        :class:`torch.device` and checked for availability.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        The name is not a device, or the device is not available here.

    Examples
    --------
    >>> select_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError("device", f"{device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                      else "no CUDA device is visible")
            raise InputError("device", f"{str(dev)!r} was requested but {reason}; "
                                       "use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError("device", f"{str(dev)!r} was requested but only "
                                       f"{torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("device", "'mps' was requested but is not available; use 'cpu' or 'auto'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included).

    Examples
    --------
    >>> seed_everything(0); a = torch.rand(2)
    >>> seed_everything(0); torch.equal(a, torch.rand(2))
    True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Window rules, schedules and early stopping
# --------------------------------------------------------------------------------------------


def _window_means(values: Sequence[float], window: int) -> tuple[float, float] | None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(values) < 2 * window:
        return None
    recent = values[len(values) - window:]
    previous = values[len(values) - 2 * window: len(values) - window]
    return float(np.mean(previous)), float(np.mean(recent))


def window_stagnates(values: Sequence[float], window: int) -> bool:
    """Whether the mean of the last ``window`` values is not lower than that of the ``window`` before.

    ``False`` while fewer than ``2 * window`` values are known.

    Examples
    --------
    >>> window_stagnates([4, 3, 2, 1], 2)
    False
    >>> window_stagnates([4, 3, 3, 4], 2)
    True
    """
    means = _window_means(values, window)
    return means is not None and means[1] >= means[0]


def window_rises(values: Sequence[float], window: int) -> bool:
    """Whether the mean of the last ``window`` values is higher than that of the ``window`` before.

    ``False`` while fewer than ``2 * window`` values are known.

    Examples
    --------
    >>> window_rises([1, 2, 2, 1], 2)
    False
    >>> window_rises([1, 2, 2, 2], 2)
    True
    """
    means = _window_means(values, window)
    return means is not None and means[1] > means[0]


class ConstantSchedule:
    """Keeps the learning rate."""

    def step(self, lr: float, *, train_loss: float, val_loss: float | None) -> float:
        return lr

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PlateauSchedule:
    """``lr × factor`` once the validation loss has not improved for ``patience`` epochs.

    Examples
    --------
    >>> s = PlateauSchedule(factor=0.5, patience=2)
    >>> [s.step(1.0, train_loss=0.0, val_loss=v) for v in (3, 2, 2, 2, 1)]
    [1.0, 1.0, 1.0, 0.5, 1.0]
    """

    def __init__(self, factor: float, patience: int, min_lr: float = 0.0):
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, lr: float, *, train_loss: float, val_loss: float | None) -> float:
        if val_loss is None:
            raise ValueError("the plateau schedule needs a validation loss")
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return lr
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.bad_epochs = 0
            return max(lr * self.factor, self.min_lr)
        return lr

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


class StagnationSchedule:
    """``lr × factor`` whenever the windowed mean training loss does not decrease.

    After every epoch, the mean training loss of the last ``window`` epochs is compared with that
    of the ``window`` epochs before (:func:`window_stagnates`).

    Examples
    --------
    >>> s = StagnationSchedule(factor=0.9, window=2)
    >>> [s.step(1.0, train_loss=t, val_loss=None) for t in (4, 3, 2, 1, 2, 2)]
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.9]
    """

    def __init__(self, factor: float, window: int, min_lr: float = 0.0):
        self.factor, self.window, self.min_lr = factor, window, min_lr
        self.losses: list[float] = []

    def step(self, lr: float, *, train_loss: float, val_loss: float | None) -> float:
        self.losses = (self.losses + [float(train_loss)])[-2 * self.window:]
        if window_stagnates(self.losses, self.window):
            return max(lr * self.factor, self.min_lr)
        return lr

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state["losses"]]


class CosineSchedule:
    """Half a cosine from ``lr`` to ``min_lr`` over ``epochs`` epochs.

    ``step`` returns the rate of the next epoch, whatever the losses; the ``lr`` it receives is
    ignored, because the curve is fixed by the starting rate given here.

    Examples
    --------
    >>> s = CosineSchedule(lr=1.0, epochs=4, min_lr=0.0)
    >>> [round(s.step(1.0, train_loss=0.0, val_loss=None), 4) for _ in range(4)]
    [0.8536, 0.5, 0.1464, 0.0]
    """

    def __init__(self, lr: float, epochs: int, min_lr: float = 0.0):
        self.lr, self.epochs, self.min_lr = lr, max(int(epochs), 1), min_lr
        self.done = 0

    def step(self, lr: float, *, train_loss: float, val_loss: float | None) -> float:
        self.done = min(self.done + 1, self.epochs)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * self.done / self.epochs))

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])


class EarlyStopping:
    """Decides after every epoch, from the validation loss alone, whether to stop.

    Parameters
    ----------
    rule : {"none", "patience", "window"}
    patience : int
        Epochs without improvement (``"patience"``) or window length (``"window"``).

    Examples
    --------
    >>> stop = EarlyStopping("patience", 2)
    >>> [stop.step(v) for v in (3, 2, 2.5, 2.1)]
    [False, False, False, True]
    """

    def __init__(self, rule: str, patience: int):
        if rule not in _STOPPING:
            raise ValueError(f"rule must be one of {_STOPPING}, got {rule!r}")
        self.rule, self.patience = rule, patience
        self.best = math.inf
        self.bad_epochs = 0
        self.losses: list[float] = []

    def step(self, val_loss: float) -> bool:
        if self.rule == "none":
            return False
        if self.rule == "window":
            self.losses = (self.losses + [float(val_loss)])[-2 * self.patience:]
            return window_rises(self.losses, self.patience)
        if val_loss < self.best:
            self.best, self.bad_epochs = float(val_loss), 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.losses = [float(v) for v in state["losses"]]


def _make_schedule(config: TrainConfig) -> ConstantSchedule | PlateauSchedule | StagnationSchedule | CosineSchedule:
    if config.schedule == "cosine":
        return CosineSchedule(config.lr, config.max_epochs - config.warmup_epochs, config.min_lr)
    if config.schedule == "plateau":
        return PlateauSchedule(config.schedule_factor, config.schedule_patience, config.min_lr)
    if config.schedule == "stagnation":
        return StagnationSchedule(config.schedule_factor, config.schedule_patience, config.min_lr)
    return ConstantSchedule()


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _to_tensor(name: str, a: Any, dtype: torch.dtype | None) -> torch.Tensor:
    """CPU tensor of ``a``; ``dtype=None`` keeps integers as int64 and makes floats float32."""
    try:
        t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(name, f"cannot be converted to a tensor ({exc})") from None
    if t.ndim == 0:
        raise InputError(name, "must have a first (sample) dimension, got a scalar")
    if t.shape[0] == 0:
        raise InputError(name, f"is empty (shape {tuple(t.shape)})")
    if t.is_complex():
        raise InputError(name, "is complex; split it into real channels first")
    if dtype is None:
        dtype = torch.int64 if not (t.is_floating_point()) else torch.float32
    t = t.to(device="cpu", dtype=dtype)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(name, f"contains {bad} non-finite value(s) (NaN or Inf)")
    return t


def _check_pair(xname: str, X: torch.Tensor, yname: str, y: torch.Tensor) -> None:
    if X.shape[0] != y.shape[0]:
        raise InputError(yname, f"has {y.shape[0]} samples but {xname} has {X.shape[0]}")


def _target_dtype(loss_name: str, y: Any, float_dtype: torch.dtype) -> torch.dtype | None:
    is_float = (y.is_floating_point() if isinstance(y, torch.Tensor)
                else np.issubdtype(np.asarray(y).dtype, np.floating))
    if loss_name == "cross_entropy":
        return float_dtype if is_float else torch.int64  # class indices, or class probabilities
    if loss_name in _ELEMENTWISE:
        return float_dtype
    return float_dtype if is_float else None  # a custom loss gets integers as int64


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _derived_seeds(seed: int) -> tuple[int, int]:
    # Independent streams for the split and the data order: both generators seeded with `seed`
    # itself would start their permutations from the same random numbers.
    split, order = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(split), int(order)


# --------------------------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------------------------


def _resolve_loss(spec: str | Callable) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    if isinstance(spec, str):
        if spec not in _LOSSES:
            raise InputError("loss", f"must be one of {', '.join(map(repr, _LOSSES))} or a callable, "
                                     f"got {spec!r}")
        base = _LOSSES[spec]
        if spec in _ELEMENTWISE:
            def checked(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                if pred.shape != target.shape:
                    raise InputError("y", f"targets of shape {tuple(target.shape)} do not match model "
                                          f"outputs of shape {tuple(pred.shape)} (loss {spec!r} "
                                          "compares them element by element); reshape y")
                return base(pred, target)
            return spec, checked
        return spec, base
    if not callable(spec):
        raise InputError("loss", f"must be a loss name or a callable, got {type(spec).__name__}")
    name = getattr(spec, "__qualname__", None) or type(spec).__qualname__
    return f"callable:{getattr(spec, '__module__', None) or type(spec).__module__}.{name}", spec


def _evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor,
              loss_fn: Callable, batch_size: int) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            xb, yb = X[start:start + batch_size], y[start:start + batch_size]
            total += loss_fn(model(xb), yb).double() * xb.shape[0]
    return float(total) / X.shape[0]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (a snapshot later training cannot alter)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = type(obj)((k, _to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # module versions, which load_state_dict consults
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _random_states(order_gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data_order": order_gen.get_state(),
        # Plain Python values so that the checkpoint loads with torch.load(weights_only=True).
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_random_states(states: dict, order_gen: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
    order_gen.set_state(states["data_order"])
    n = states["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise InputError(path, f"is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise InputError(path, f"is not a {_CHECKPOINT_FORMAT} checkpoint")
    saved = ckpt["fingerprint"]
    for key in dict.fromkeys([*fingerprint, *saved]):  # a setting only one of the two runs has differs too
        value = fingerprint.get(key)
        if saved.get(key) != value:
            if key == "data":
                what = "was trained on different data than these"
            elif key == "model":
                what = "holds a model with different parameters (names or shapes) than this one"
            else:
                what = f"was written with {key}={saved.get(key)!r} but this run has {key}={value!r}"
            raise InputError(path, f"{what}; resume with the original setup, choose another "
                                   "checkpoint path, or pass resume=False to start over")
    return ckpt


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _progress(enabled: bool, total: int, completed: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    # stderr, so that a progress bar never mixes with data a script writes to stdout.
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )
    task = progress.add_task("training", total=total, completed=completed)
    return progress, task


def fit(
    model: torch.nn.Module,
    X: Any,
    y: Any,
    config: TrainConfig | None = None,
    *,
    X_val: Any = None,
    y_val: Any = None,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    resume: bool = True,
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator],
                      tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(X, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; it is moved to the configured device and left there in eval mode.
        Inputs are cast to the dtype of its first floating-point parameter.
    X : array_like or torch.Tensor, shape (n, ...)
        Inputs, one sample per row.
    y : array_like or torch.Tensor, shape (n, ...)
        Targets: floating point, or integer class indices for ``"cross_entropy"``. For the
        element-wise losses (``"mse"``, ``"l1"``, ``"bce_logits"``) they must have the shape of the
        model's output.
    config : TrainConfig, optional
        Defaults to ``TrainConfig()``.
    X_val, y_val : array_like or torch.Tensor, optional
        Validation data (both or neither); replaces the held-out split of ``X``.
    loss : str or callable, optional
        Overrides ``config.loss``; a callable takes ``(prediction, target)`` and returns the mean
        loss of the batch as a scalar tensor. A callable is recorded in checkpoints by its
        qualified name.
    resume : bool
        Continue from ``config.checkpoint`` when that file exists; ``False`` starts over and
        overwrites it.
    augment : callable, optional
        ``augment(x_batch, y_batch, generator) -> (x_batch, y_batch)``, applied to every training
        minibatch (never to validation data). It must draw its random numbers from ``generator``,
        the trainer's data-order generator, so that a resumed run stays identical to an
        uninterrupted one. Recorded in checkpoints by its qualified name.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Unusable data (mismatched sample counts, empty, NaN or Inf), an unusable configuration, or
        a checkpoint written by an incompatible run (the message names what differs).
    FloatingPointError
        The training or validation loss became NaN or infinite (lower the learning rate).
    KeyboardInterrupt
        Re-raised after writing the checkpoint of the last completed epoch, when one is configured.

    Examples
    --------
    >>> import numpy as np, torch
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(512, 3)).astype(np.float32)
    >>> y = X @ np.array([[1.0], [-2.0], [0.5]], dtype=np.float32) + 0.3
    >>> model = torch.nn.Linear(3, 1)
    >>> result = fit(model, X, y, TrainConfig(lr=0.05, batch_size=32, max_epochs=40, progress=False))
    >>> result.best_val_loss < 1e-4
    True
    >>> np.allclose(model.weight.detach().numpy(), [[1.0, -2.0, 0.5]], atol=1e-2)
    True
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    loss_name, loss_fn = _resolve_loss(config.loss if loss is None else loss)
    device = select_device(config.device)

    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model", "has no trainable parameters")
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    # --- data ---------------------------------------------------------------------------------
    Xt = _to_tensor("X", X, float_dtype)
    yt = _to_tensor("y", y, _target_dtype(loss_name, y, float_dtype))
    _check_pair("X", Xt, "y", yt)
    if (X_val is None) != (y_val is None):
        raise InputError("X_val" if X_val is None else "y_val",
                         "is missing: pass both X_val and y_val, or neither")
    split_seed, order_seed = _derived_seeds(config.seed)
    if X_val is not None:
        Xv = _to_tensor("X_val", X_val, float_dtype)
        yv = _to_tensor("y_val", y_val, _target_dtype(loss_name, y_val, float_dtype))
        _check_pair("X_val", Xv, "y_val", yv)
        if Xv.shape[1:] != Xt.shape[1:]:
            raise InputError("X_val", f"has samples of shape {tuple(Xv.shape[1:])} but X has "
                                      f"{tuple(Xt.shape[1:])}")
        validation = "given"
    elif config.val_fraction > 0:
        n = Xt.shape[0]
        n_val = max(1, round(config.val_fraction * n))
        if n_val >= n:
            raise InputError("X", f"has {n} sample(s): too few to hold out {n_val} for validation "
                                  "and still train")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        Xv, yv = Xt[perm[:n_val]], yt[perm[:n_val]]
        Xt, yt = Xt[perm[n_val:]], yt[perm[n_val:]]
        validation = "split"
    else:
        Xv = yv = None
        validation = "none"
    if validation == "none":
        if config.early_stopping != "none":
            raise InputError("TrainConfig.early_stopping", "needs validation data (val_fraction is 0 "
                                                           "and no X_val was given); set it to 'none'")
        if config.schedule == "plateau":
            raise InputError("TrainConfig.schedule", "'plateau' needs validation data (val_fraction "
                                                     "is 0 and no X_val was given)")

    checkpoint = None if config.checkpoint is None else Path(config.checkpoint)
    fingerprint: dict[str, Any] = {
        f: getattr(config, f) for f in _FINGERPRINT_FIELDS if f not in ("loss", "val_fraction")
    }
    fingerprint["loss"] = loss_name
    fingerprint["validation"] = validation
    if config.schedule == "cosine":  # the curve is stretched over max_epochs
        fingerprint["max_epochs"] = config.max_epochs
    if validation == "split":
        fingerprint["val_fraction"] = config.val_fraction
    fingerprint["model"] = [[name, list(p.shape)] for name, p in model.named_parameters()]
    if augment is not None:
        fingerprint["augment"] = getattr(augment, "__qualname__", repr(augment))
    if checkpoint is not None:  # hashing the data costs a pass over them; only resuming needs it
        tensors = [Xt, yt] + ([Xv, yv] if Xv is not None else [])
        fingerprint["data"] = _digest(*tensors)

    Xt, yt = Xt.to(device), yt.to(device)
    if Xv is not None:
        Xv, yv = Xv.to(device), yv.to(device)
    n_train = Xt.shape[0]

    # --- state --------------------------------------------------------------------------------
    optimizer = _make_optimizer(config, params)
    schedule = _make_schedule(config)
    stopper = EarlyStopping(config.early_stopping, config.patience)
    order_gen = torch.Generator()
    history: list[dict] = []
    lr = config.lr  # the post-warm-up rate, as lowered by the schedule so far
    best_epoch, best_loss, best_state = -1, math.inf, None
    stopped_early = False
    start_epoch = 0

    if checkpoint is not None and resume and checkpoint.exists():
        ckpt = _load_checkpoint(checkpoint, fingerprint)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        stopper.load_state_dict(ckpt["early_stopping"])
        lr = float(ckpt["lr"])
        history = [dict(h) for h in ckpt["history"]]
        best_epoch, best_loss = int(ckpt["best"]["epoch"]), float(ckpt["best"]["loss"])
        best_state = ckpt["best"]["state"]
        stopped_early = bool(ckpt["stopped_early"])
        start_epoch = int(ckpt["epoch"]) + 1
        _set_random_states(ckpt["rng"], order_gen)
        log.info("resuming from %s after epoch %d", checkpoint, start_epoch - 1)
    else:
        seed_everything(config.seed)
        order_gen.manual_seed(order_seed)

    def snapshot(epoch: int) -> dict:
        return {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "lr": lr,
            "model": _to_cpu(model.state_dict()),
            "optimizer": _to_cpu(optimizer.state_dict()),
            "schedule": schedule.state_dict(),
            "early_stopping": stopper.state_dict(),
            "history": [dict(h) for h in history],
            "best": {"epoch": best_epoch, "loss": best_loss, "state": best_state},
            "stopped_early": stopped_early,
            "rng": _to_cpu(_random_states(order_gen)),
        }

    def save(payload: dict) -> None:
        assert checkpoint is not None
        with atomic_path(checkpoint) as tmp:
            torch.save(payload, tmp)

    config_record = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                     for k, v in dataclasses.asdict(config).items()}
    config_record["loss"] = loss_name

    def write_log(finished: bool) -> None:
        if config.log is None:
            return
        write_json(config.log, {
            "config": config_record,
            "validation": validation,
            "n_train": n_train,
            "n_val": 0 if Xv is None else int(Xv.shape[0]),
            "history": history,
            "best_epoch": best_epoch if best_epoch >= 0 else None,
            "best_val_loss": best_loss if math.isfinite(best_loss) else None,
            "stopped_early": stopped_early,
            "finished": finished,
        })

    # --- epochs -------------------------------------------------------------------------------
    pending: dict | None = None  # snapshot of the last completed epoch not yet on disk
    progress, task = _progress(config.progress, config.max_epochs, min(start_epoch, config.max_epochs))
    try:
        with progress:
            epoch = start_epoch
            while epoch < config.max_epochs and not stopped_early:
                t0 = time.perf_counter()
                epoch_lr = config.warmup_lr if epoch < config.warmup_epochs else lr
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr

                model.train()
                order = torch.randperm(n_train, generator=order_gen).to(device)
                total = torch.zeros((), dtype=torch.float64, device=device)
                for start in range(0, n_train, config.batch_size):
                    idx = order[start:start + config.batch_size]
                    xb, yb = Xt[idx], yt[idx]
                    if augment is not None:
                        xb, yb = augment(xb, yb, order_gen)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss = loss_fn(model(xb), yb)
                    if batch_loss.ndim != 0:
                        raise InputError("loss", f"must return a scalar, got shape "
                                                 f"{tuple(batch_loss.shape)}")
                    batch_loss.backward()
                    optimizer.step()
                    # Accumulated on the device: a .item() per batch would synchronise a GPU.
                    total += batch_loss.detach().double() * xb.shape[0]
                train_loss = float(total) / n_train
                val_loss = None if Xv is None else _evaluate(model, Xv, yv, loss_fn, config.batch_size)
                for name, value in (("training", train_loss), ("validation", val_loss)):
                    if value is not None and not math.isfinite(value):
                        raise FloatingPointError(f"the {name} loss is {value} at epoch {epoch}: "
                                                 "training diverged; lower the learning rate")

                history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                "lr": epoch_lr, "seconds": time.perf_counter() - t0})
                if val_loss is None:
                    best_epoch = epoch
                elif val_loss < best_loss:
                    best_epoch, best_loss = epoch, val_loss
                    best_state = _to_cpu(model.state_dict())
                if val_loss is not None:
                    stopped_early = stopper.step(val_loss)
                if epoch >= config.warmup_epochs:
                    lr = schedule.step(lr, train_loss=train_loss, val_loss=val_loss)

                if checkpoint is not None:
                    pending = snapshot(epoch)
                    last = stopped_early or epoch + 1 == config.max_epochs
                    if (epoch + 1) % config.checkpoint_every == 0 or last:
                        save(pending)
                        pending = None
                write_log(finished=False)

                val_text = "—" if val_loss is None else f"{val_loss:.4g}"
                log.info("epoch %d: train %.6g, val %s, lr %.3g", epoch, train_loss, val_text, epoch_lr)
                progress.update(task, advance=1, description=(
                    f"train {train_loss:.4g} · val {val_text} · lr {epoch_lr:.3g}"))
                epoch += 1
    except KeyboardInterrupt:
        if pending is not None:
            save(pending)
            log.warning("interrupted; checkpoint of epoch %d written to %s",
                        pending["epoch"], checkpoint)
        raise

    if stopped_early:
        log.info("stopped early after epoch %d; best epoch %d", history[-1]["epoch"], best_epoch)
    if config.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    write_log(finished=True)
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_loss if math.isfinite(best_loss) else math.nan,
        stopped_early=stopped_early,
        epochs_run=len(history),
    )
