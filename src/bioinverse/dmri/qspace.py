r"""q-space deep learning: voxel-wise neural networks on subsampled diffusion signals.

Golkov et al. (2016) map the signals of a few diffusion-weighted volumes of one voxel directly to
what a full acquisition and a model fit would give: scalar measures (DKI, NODDI), tissue classes,
or the missing volumes themselves. Every voxel is one sample; the network reads the signals of a
fixed subset :math:`\alpha` of the protocol's volumes and never sees q-space coordinates, so one
network serves one sampling scheme.

:class:`QSpaceNet` wraps that recipe as an estimator with NumPy arrays in and out: the network is a
:class:`bioinverse.nn.MLP` (3 hidden layers of 150 ReLU units, dropout 0.1, orthogonal
initialisation, linear outputs), trained by :func:`bioinverse.train.fit` with the schedule of
:func:`qdl_train_config`; every input and output is scaled to [0, 1] with the minima and maxima of
the training set (:class:`MinMaxScaling`), and the same affine maps are applied at prediction.

Reference
---------
V. Golkov, A. Dosovitskiy, J. I. Sperl, M. I. Menzel, M. Czisch, P. Sämann, T. Brox, D. Cremers,
"q-Space deep learning: twelve-fold shorter and model-free diffusion MRI scans",
IEEE Transactions on Medical Imaging 35(5):1344–1351, 2016. doi:10.1109/TMI.2016.2551324.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bioinverse
from bioinverse.dmri.io import GradientTable
from bioinverse.errors import InputError
from bioinverse.io import atomic_path
from bioinverse.nn import MLP
from bioinverse.train import TrainConfig, TrainResult, select_device
from bioinverse.train import fit as train_fit

__all__ = ["MinMaxScaling", "QSpaceNet", "qdl_train_config"]

_FORMAT = "bioinverse.dmri.qspace/1"
_TASKS = ("regression", "classification")
_REGRESSION_LOSSES = ("mse", "l1")
# On the CPU the forward pass runs over blocks of this many voxels: the hidden activations of a
# block (2048 × 150 float32 ≈ 1.2 MB) stay in cache, which makes inference about three times
# faster than whole 65536-voxel batches whose activations spill to main memory.
_CPU_BLOCK = 2048
_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def qdl_train_config(max_epochs: int = 500, **changes: Any) -> TrainConfig:
    r"""The training schedule of q-space deep learning as a :class:`~bioinverse.train.TrainConfig`.

    SGD with momentum 0.9 on minibatches of 128; 10 warm-up epochs at a learning rate of 0.001,
    then 0.01, multiplied by 0.9 after every epoch at which the mean training loss of the last 5
    epochs is not lower than that of the 5 before; 10 % of the training voxels held out; training
    stops when the mean validation loss of the last 10 epochs exceeds that of the 10 before:

    .. math::

        \eta_{e+1} = 0.9\,\eta_e \quad\text{if}\quad
        \tfrac15\textstyle\sum_{i=e-4}^{e} L_i \ \ge\ \tfrac15\sum_{i=e-9}^{e-5} L_i .

    Golkov et al., IEEE TMI 35(5):1344–1351, 2016, §II-C.

    Parameters
    ----------
    max_epochs : int, default 500
        Upper bound on the number of epochs (the paper trains until early stopping).
    **changes
        Any other :class:`~bioinverse.train.TrainConfig` field, overriding the recipe.

    Returns
    -------
    TrainConfig

    Examples
    --------
    >>> cfg = qdl_train_config()
    >>> cfg.optimizer, cfg.lr, cfg.warmup_lr, cfg.schedule, cfg.early_stopping, cfg.patience
    ('sgd', 0.01, 0.001, 'stagnation', 'window', 10)
    >>> qdl_train_config(max_epochs=50, batch_size=256).batch_size
    256
    """
    recipe: dict[str, Any] = {
        "optimizer": "sgd", "momentum": 0.9, "batch_size": 128, "lr": 0.01, "warmup_epochs": 10,
        "warmup_lr": 0.001, "schedule": "stagnation", "schedule_factor": 0.9, "schedule_patience": 5,
        "val_fraction": 0.1, "early_stopping": "window", "patience": 10, "loss": "mse",
        "max_epochs": max_epochs, "progress": False,
    }
    recipe.update(changes)
    return TrainConfig(**recipe)


@dataclasses.dataclass(frozen=True)
class MinMaxScaling:
    r"""Independent affine map of every feature onto [0, 1] over the data it was fitted on.

    .. math::

        z_j = \frac{x_j - \min_i x_{ij}}{s_j}, \qquad
        s_j = \begin{cases} \max_i x_{ij} - \min_i x_{ij} & \text{if positive} \\
                            1 & \text{otherwise (a constant feature maps to 0)} \end{cases}

    Golkov et al. (2016) scale each network input and output this way with the parameters of the
    training set and reuse them on test data.

    Attributes
    ----------
    minimum : ndarray, shape (k,)
        Per-feature minimum of the fitting data, in the feature's units.
    scale : ndarray, shape (k,)
        Per-feature range (1 where the range is zero), in the feature's units.

    Examples
    --------
    >>> s = MinMaxScaling.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> s.transform(np.array([[2.0, 5.0], [4.0, 6.0]]))
    array([[0.5, 0. ],
           [1.5, 1. ]])
    >>> s.inverse(np.array([[0.5, 0.0]]))
    array([[2., 5.]])
    """

    minimum: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> MinMaxScaling:
        """Fit to ``x`` of shape ``(N, k)`` (one sample per row)."""
        x = np.asarray(x, dtype=np.float64)
        low = x.min(axis=0)
        span = x.max(axis=0) - low
        return cls(low, np.where(span > 0, span, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - minimum) / scale``, feature axis last."""
        return (np.asarray(x, dtype=np.float64) - self.minimum) / self.scale

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """``z * scale + minimum``, feature axis last."""
        return np.asarray(z, dtype=np.float64) * self.scale + self.minimum


def _signal_matrix(signals: Any, name: str, gtab: GradientTable) -> tuple[np.ndarray, tuple[int, ...]]:
    """``signals`` as ``(M, len(gtab))`` (a view when possible) and its leading shape."""
    if not isinstance(gtab, GradientTable):
        raise InputError("gtab", f"must be a GradientTable, got {type(gtab).__name__}")
    a = np.asarray(signals)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(name, f"must be a real numeric array, got dtype {a.dtype}")
    if a.ndim == 0 or a.shape[-1] != len(gtab):
        got = "a scalar" if a.ndim == 0 else f"{a.shape[-1]} measurements per voxel (shape {a.shape})"
        raise InputError(name, f"has {got} but gtab has {len(gtab)} volumes; the measurement axis "
                               "must be last")
    lead = a.shape[:-1]
    if math.prod(lead) == 0:
        raise InputError(name, f"holds no voxels (shape {a.shape})")
    return a.reshape(-1, a.shape[-1]), lead


def _check_finite_rows(x: np.ndarray, name: str, offset: int = 0) -> None:
    bad = ~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if bad.any():
        row = offset + int(np.flatnonzero(bad)[0])
        raise InputError(name, f"voxel {row} contains NaN or Inf ({int(bad.sum())} voxel(s) do)")


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(name, f"must be a positive integer, got {value!r}")
    return int(value)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True, order="C"))


class QSpaceNet:
    r"""q-space deep learning estimator: an MLP from a fixed subset of DWIs to targets, per voxel.

    The network reads the signals :math:`S_{j,\alpha}` of the volumes of ``scheme`` in voxel
    :math:`j` (each scaled to [0, 1] with the training minima and maxima) and is trained to
    minimise, over the training voxels,

    .. math::

        \sum_j \lVert f_\theta(\tilde S_{j,\alpha}) - \tilde y_j \rVert_2^2
        \quad\text{(regression)},\qquad
        -\sum_j \log \frac{\exp f_\theta(\tilde S_{j,\alpha})_{c_j}}
                          {\sum_c \exp f_\theta(\tilde S_{j,\alpha})_c}
        \quad\text{(classification)},

    where :math:`\tilde y_j` are the targets scaled to [0, 1] and :math:`c_j` the class of voxel
    :math:`j`; predictions are scaled back. Targets are typically model-fit maps of a fully sampled
    training scan (DKI, NODDI), tissue labels, or the full protocol's signals (q-DL-R: the network
    then reconstructs every volume from the subset). Golkov et al., IEEE TMI 35(5):1344–1351, 2016.

    Parameters
    ----------
    scheme : GradientTable
        The subsampled acquisition the network reads: b-values (s/mm²) and directions of its
        :math:`|\alpha|` volumes, in the order of the network's inputs.
    task : {"regression", "classification"}
        Linear outputs with a squared-error loss (``TrainConfig.loss`` may be ``"l1"``), or one
        output per class with softmax cross-entropy.
    outputs : sequence of str, optional
        Names of the regression targets (e.g. ``("mk", "rk", "kfa")``), one per column of ``y``;
        default ``"s0000"``, ``"s0001"``, ...
    hidden : sequence of int, default (150, 150, 150)
        Widths of the hidden ReLU layers.
    dropout : float, default 0.1
        Dropout probability after every hidden layer during training.
    config : TrainConfig, optional
        Training settings; default :func:`qdl_train_config`. Its ``seed`` and ``device`` are
        replaced by this estimator's, its ``progress`` and (when given) ``checkpoint`` by those of
        :meth:`fit`; classification always uses the cross-entropy loss.
    device : str, default "auto"
        Torch device for training and prediction (``"auto"``: CUDA when available).
    seed : int, default 0
        Seeds the weight initialisation, the held-out split, the data order and dropout.

    Attributes
    ----------
    model_ : bioinverse.nn.MLP
        The trained network (after :meth:`fit` or :meth:`load`), in eval mode.
    n_features_in_ : int
        Number of input volumes, ``len(scheme)``.
    input_scale_ : MinMaxScaling
        Input scaling fitted on the training signals.
    output_scale_ : MinMaxScaling or None
        Output scaling fitted on the training targets (``None`` for classification).
    outputs_ : tuple of str
        Names of the regression outputs (empty for classification).
    classes_ : ndarray or None
        The class labels, in the order of :meth:`predict_proba`'s columns.
    train_result_ : TrainResult
        Losses per epoch, best epoch and whether training stopped early.

    Examples
    --------
    Learn the apparent diffusion coefficient (mm²/s) of mono-exponential signals from two volumes:

    >>> rng = np.random.default_rng(0)
    >>> gtab = GradientTable(np.array([0.0, 1000.0, 2000.0]), np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.]]))
    >>> adc = rng.uniform(0.5e-3, 3e-3, 1500)
    >>> signals = rng.uniform(0.5, 2.0, (1500, 1)) * np.exp(-np.outer(adc, gtab.bvals))
    >>> net = QSpaceNet(gtab.subset([0, 2]), outputs=("adc",), hidden=(32, 32), dropout=0.0,
    ...                 config=qdl_train_config(max_epochs=40, optimizer="adam", batch_size=64,
    ...                                         warmup_epochs=0, early_stopping="none"))
    >>> net = net.fit(signals[:1200], gtab, adc[:1200])
    >>> error = net.predict(signals[1200:], gtab) - adc[1200:]
    >>> bool(np.sqrt(np.mean(error**2)) < 0.1 * adc.std())
    True
    >>> sorted(net.predict_maps(signals[1200:], gtab))
    ['adc']
    """

    def __init__(self, scheme: GradientTable, task: str = "regression", outputs: Sequence[str] | None = None,
                 hidden: Sequence[int] = (150, 150, 150), dropout: float = 0.1,
                 config: TrainConfig | None = None, device: str = "auto", seed: int = 0):
        self.scheme = scheme
        self.task = task
        self.outputs = outputs
        self.hidden = hidden
        self.dropout = dropout
        self.config = config
        self.device = device
        self.seed = seed

    def __repr__(self) -> str:
        n = len(self.scheme) if isinstance(self.scheme, GradientTable) else "?"
        return (f"QSpaceNet(scheme=<{n} volumes>, task={self.task!r}, outputs={self.outputs!r}, "
                f"hidden={tuple(self.hidden)!r}, dropout={self.dropout!r}, seed={self.seed!r})")

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------

    def _validate_settings(self) -> tuple[tuple[int, ...], float, TrainConfig]:
        if not isinstance(self.scheme, GradientTable):
            raise InputError("scheme", f"must be a GradientTable, got {type(self.scheme).__name__}")
        if len(self.scheme) == 0:
            raise InputError("scheme", "has no volumes")
        if self.task not in _TASKS:
            raise InputError("task", f"must be one of {', '.join(map(repr, _TASKS))}, got {self.task!r}")
        if self.task == "classification" and self.outputs is not None:
            raise InputError("outputs", "names regression targets; classification takes its names "
                                        "from the labels (leave outputs=None)")
        hidden = tuple(self.hidden)
        for i, width in enumerate(hidden):
            _check_positive_int(width, f"hidden[{i}]")
        try:
            dropout = float(self.dropout)
        except (TypeError, ValueError):
            raise InputError("dropout", f"must be a number in [0, 1), got {self.dropout!r}") from None
        if not 0.0 <= dropout < 1.0:
            raise InputError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError("seed", f"must be a non-negative integer, got {self.seed!r}")
        config = qdl_train_config() if self.config is None else self.config
        if not isinstance(config, TrainConfig):
            raise InputError("config", f"must be a TrainConfig, got {type(config).__name__}")
        if self.task == "regression" and config.loss not in _REGRESSION_LOSSES:
            raise InputError("config", f"regression needs loss 'mse' or 'l1', got {config.loss!r}")
        if self.task == "classification" and config.loss not in ("mse", "cross_entropy"):
            raise InputError("config", f"classification trains with the cross-entropy loss; "
                                       f"loss {config.loss!r} does not apply")
        select_device(self.device)
        return hidden, dropout, config

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this QSpaceNet is not fitted yet; call fit() or QSpaceNet.load() first")

    def _columns(self, gtab: GradientTable) -> np.ndarray:
        """Indices of the scheme's volumes among the columns measured with ``gtab``."""
        return np.asarray(gtab.find(self.scheme), dtype=np.intp)

    def _targets(self, y: Any, name: str, lead: tuple[int, ...]) -> np.ndarray:
        """Regression targets as float64 ``(M, k)``, one row per voxel of leading shape ``lead``."""
        a = np.asarray(y)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise InputError(name, f"must be a real numeric array, got dtype {a.dtype}")
        if a.shape == lead:
            a = a.reshape(-1, 1)
        elif a.ndim == len(lead) + 1 and a.shape[:-1] == lead:
            a = a.reshape(-1, a.shape[-1])
        else:
            raise InputError(name, f"has shape {a.shape} but the signals hold voxels of shape {lead}: "
                                   f"expected {lead} or {lead + ('k',)}")
        if a.shape[1] == 0:
            raise InputError(name, "has no target columns")
        a = a.astype(np.float64, copy=False)
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            raise InputError(name, f"row {int(np.flatnonzero(bad)[0])} contains NaN or Inf "
                                   f"({int(bad.sum())} row(s) do); drop those voxels")
        return a

    def _labels(self, y: Any, name: str, lead: tuple[int, ...]) -> np.ndarray:
        """Class labels as a flat array ``(M,)``."""
        a = np.asarray(y)
        if a.shape != lead:
            raise InputError(name, f"has shape {a.shape} but the signals hold voxels of shape {lead}: "
                                   "classification needs one label per voxel")
        a = a.reshape(-1)
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                row = int(np.flatnonzero(~np.isfinite(a))[0])
                raise InputError(name, f"row {row} is NaN or Inf; drop unlabelled voxels")
            if (a != np.round(a)).any():
                raise InputError(name, "classification needs integer (or string) labels, got "
                                       "non-integral floats")
            a = a.astype(np.int64)
        elif not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)
                  or np.issubdtype(a.dtype, np.str_)):
            raise InputError(name, f"classification needs integer (or string) labels, got dtype {a.dtype}")
        return a

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def fit(self, signals: Any, gtab: GradientTable, y: Any, *, signals_val: Any = None, y_val: Any = None,
            checkpoint: str | os.PathLike | None = None, progress: bool = False) -> QSpaceNet:
        r"""Train the network on voxels measured with ``gtab``.

        Parameters
        ----------
        signals : array_like, shape (..., len(gtab))
            Training signals (any units; scaled internally), measurement axis last, one voxel per
            leading index. Only the columns of ``scheme``'s volumes are used.
        gtab : GradientTable
            Protocol of ``signals``: the full protocol or the scheme itself; the scheme's volumes
            are located with :meth:`GradientTable.find` (order, sign of directions and small
            b-value differences do not matter).
        y : array_like
            Regression: floats of shape ``signals.shape[:-1]`` (one target; :meth:`predict` then
            returns that shape) or ``signals.shape[:-1] + (k,)``. Classification: one label per
            voxel (integers or strings). Voxels with NaN/Inf targets are rejected.
        signals_val, y_val : array_like, optional
            Validation voxels (both or neither; protocol ``gtab``), replacing the held-out
            fraction of the training voxels. The scaling is fitted on ``signals``/``y`` only.
        checkpoint : path, optional
            Training checkpoint; an existing one with the same data and settings is resumed.
        progress : bool, default False
            Show a progress bar on stderr.

        Returns
        -------
        QSpaceNet
            ``self``, fitted.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, a protocol lacking a volume of the scheme, unusable settings.
        """
        hidden, dropout, config = self._validate_settings()
        flat, lead = _signal_matrix(signals, "signals", gtab)
        columns = self._columns(gtab)
        x = flat[:, columns].astype(np.float64)
        _check_finite_rows(x, "signals")

        if self.task == "regression":
            targets = self._targets(y, "y", lead)
            y_1d = np.asarray(y).shape == lead
            if self.outputs is None:
                names = tuple(f"s{i:04d}" for i in range(targets.shape[1]))
            else:
                names = tuple(self.outputs) if not isinstance(self.outputs, str) else (self.outputs,)
                if not all(isinstance(s, str) for s in names) or len(set(names)) != len(names):
                    raise InputError("outputs", f"must be distinct strings, got {self.outputs!r}")
                if len(names) != targets.shape[1]:
                    raise InputError("outputs", f"names {len(names)} target(s) but y has "
                                                f"{targets.shape[1]} column(s)")
            output_scale = MinMaxScaling.fit(targets)
            y_train = output_scale.transform(targets).astype(np.float32)
            classes = None
            n_out = targets.shape[1]
        else:
            labels = self._labels(y, "y", lead)
            classes, codes = np.unique(labels, return_inverse=True)
            if classes.size < 2:
                raise InputError("y", f"holds a single class ({classes[0]!r}); classification needs two "
                                      "or more")
            y_1d, names, output_scale = True, (), None
            y_train = codes.astype(np.int64)
            n_out = classes.size

        input_scale = MinMaxScaling.fit(x)
        x_train = input_scale.transform(x).astype(np.float32)

        if (signals_val is None) != (y_val is None):
            raise InputError("signals_val" if signals_val is None else "y_val",
                             "is missing: pass both signals_val and y_val, or neither")
        x_val = y_val_train = None
        if signals_val is not None:
            flat_val, lead_val = _signal_matrix(signals_val, "signals_val", gtab)
            xv = flat_val[:, columns].astype(np.float64)
            _check_finite_rows(xv, "signals_val")
            x_val = input_scale.transform(xv).astype(np.float32)
            if self.task == "regression":
                tv = self._targets(y_val, "y_val", lead_val)
                if tv.shape[1] != n_out:
                    raise InputError("y_val", f"has {tv.shape[1]} target column(s) but y has {n_out}")
                y_val_train = output_scale.transform(tv).astype(np.float32)
            else:
                lv = self._labels(y_val, "y_val", lead_val)
                unknown = np.setdiff1d(lv, classes)
                if unknown.size:
                    raise InputError("y_val", f"holds label {unknown[0]!r}, absent from y")
                y_val_train = np.searchsorted(classes, lv).astype(np.int64)

        run_config = dataclasses.replace(
            config, seed=int(self.seed), device=self.device, progress=bool(progress),
            checkpoint=config.checkpoint if checkpoint is None else checkpoint,
            loss="cross_entropy" if self.task == "classification" else config.loss)
        # Initialise from the estimator's seed without disturbing the caller's random streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            model = MLP(len(self.scheme), n_out, hidden=hidden, activation="relu", dropout=dropout,
                        init="orthogonal")
        result = train_fit(model, x_train, y_train, run_config, X_val=x_val, y_val=y_val_train)

        self.model_ = model
        self.n_features_in_ = len(self.scheme)
        self.input_scale_ = input_scale
        self.output_scale_ = output_scale
        self.outputs_ = names
        self.classes_ = classes
        self.train_result_ = result
        self._y_1d = bool(y_1d) and self.task == "regression"
        self._hidden, self._dropout = hidden, dropout
        self._config_used = run_config
        return self

    # ----------------------------------------------------------------------------------------
    # Prediction
    # ----------------------------------------------------------------------------------------

    def _network_outputs(self, signals: Any, gtab: GradientTable, batch_size: int,
                         precision: str = "float32") -> tuple[np.ndarray, tuple]:
        """Raw float32 network outputs ``(M, out_features)`` and the leading shape of ``signals``."""
        self._check_fitted()
        batch_size = _check_positive_int(batch_size, "batch_size")
        if precision not in _PRECISIONS:
            raise InputError("precision", f"must be one of {', '.join(map(repr, _PRECISIONS))}, got {precision!r}")
        flat, lead = _signal_matrix(signals, "signals", gtab)
        columns = self._columns(gtab)
        model = self.model_
        dtype = _PRECISIONS[precision]
        if dtype != torch.float32:
            # A reduced-precision copy; the trained float32 weights stay untouched.
            model = copy.deepcopy(model).to(dtype)
        device = next(model.parameters()).device
        low, scale = self.input_scale_.minimum, self.input_scale_.scale
        out = np.empty((flat.shape[0], model.out_features), dtype=np.float32)
        block = min(batch_size, _CPU_BLOCK) if device.type == "cpu" else batch_size
        model.eval()
        with torch.inference_mode():
            for start in range(0, flat.shape[0], batch_size):
                xb = flat[start:start + batch_size, columns]
                z = ((xb - low) / scale).astype(np.float32)
                if not np.isfinite(z).all():
                    _check_finite_rows(np.asarray(xb, dtype=np.float64), "signals", offset=start)
                    raise InputError("signals", "holds values too large for single precision")
                batch = torch.from_numpy(z).to(device=device, dtype=dtype)
                for first in range(0, batch.shape[0], block):
                    result = model(batch[first:first + block])
                    out[start + first:start + first + result.shape[0]] = result.float().cpu().numpy()
        return out, lead

    def predict(self, signals: Any, gtab: GradientTable, batch_size: int = 65536,
                precision: str = "float32") -> np.ndarray:
        """Predict targets (regression) or class labels (classification) voxel by voxel.

        Parameters
        ----------
        signals : array_like, shape (..., len(gtab))
            Signals measured with ``gtab``, measurement axis last; a whole image is fine.
        gtab : GradientTable
            Their protocol; it must contain every volume of ``scheme`` (any order, either sign of
            the directions).
        batch_size : int, default 65536
            Voxels per forward pass (bounds the memory used).
        precision : {"float32", "bfloat16"}
            Arithmetic of the forward pass. ``"bfloat16"`` (8-bit mantissa) runs about twice as
            fast on CPUs with bfloat16 instructions (AVX-512 BF16, AMX) at a relative error of a
            few 1e-3 in the outputs — far below the noise of the maps; training is always float32.

        Returns
        -------
        ndarray
            Regression: float64 of shape ``signals.shape[:-1] + (k,)``, or ``signals.shape[:-1]``
            when fitted on one-dimensional ``y``. Classification: labels of shape
            ``signals.shape[:-1]`` (the most probable class).

        Raises
        ------
        InputError
            Wrong number of columns for ``gtab``, NaN/Inf signals, or a protocol lacking one of the
            scheme's volumes.
        """
        raw, lead = self._network_outputs(signals, gtab, batch_size, precision)
        if self.task == "classification":
            return self.classes_[raw.argmax(axis=1)].reshape(lead)
        values = self.output_scale_.inverse(raw)
        return values.reshape(lead) if self._y_1d else values.reshape(lead + (values.shape[1],))

    def predict_proba(self, signals: Any, gtab: GradientTable, batch_size: int = 65536) -> np.ndarray:
        r"""Class probabilities (softmax of the network outputs) of a classifier.

        .. math:: p_c = \exp z_c \big/ \textstyle\sum_{c'} \exp z_{c'}

        Parameters
        ----------
        signals, gtab, batch_size
            As in :meth:`predict`.

        Returns
        -------
        ndarray, shape signals.shape[:-1] + (n_classes,)
            float64 probabilities, columns in the order of ``classes_``; rows sum to 1.
        """
        if self.task != "classification":
            raise InputError("task", "predict_proba needs a classifier (task='classification')")
        raw, lead = self._network_outputs(signals, gtab, batch_size)
        z = raw.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)  # exp of the shifted logits cannot overflow
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p.reshape(lead + (p.shape[1],))

    def predict_maps(self, signals: Any, gtab: GradientTable, batch_size: int = 65536,
                     precision: str = "float32") -> dict[str, np.ndarray]:
        """Regression predictions as one map per named output.

        Parameters
        ----------
        signals, gtab, batch_size, precision
            As in :meth:`predict`.

        Returns
        -------
        dict of str to ndarray
            ``{name: float64 array of shape signals.shape[:-1]}`` in the order of ``outputs_``.
        """
        if self.task != "regression":
            raise InputError("task", "predict_maps needs a regression network (task='regression')")
        raw, lead = self._network_outputs(signals, gtab, batch_size, precision)
        values = self.output_scale_.inverse(raw)
        return {name: values[:, i].reshape(lead) for i, name in enumerate(self.outputs_)}

    # ----------------------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted estimator to one file (atomically).

        The file is a :func:`torch.save` of plain tensors, numbers, strings, lists and dicts (no
        pickled classes), so :func:`torch.load` reads it with ``weights_only=True``: the network
        weights and architecture, the scheme, the task, output names, classes, both scalings, the
        training settings and history, and the bioinverse version.

        Parameters
        ----------
        path : str or os.PathLike
            Destination (``.pt`` by convention).

        Returns
        -------
        pathlib.Path
        """
        self._check_fitted()
        config = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                  for k, v in dataclasses.asdict(self._config_used).items()}

        def scaling(s: MinMaxScaling | None) -> dict | None:
            return None if s is None else {"minimum": _tensor(s.minimum), "scale": _tensor(s.scale)}

        result = self.train_result_
        payload = {
            "format": _FORMAT,
            "bioinverse_version": bioinverse.__version__,
            "architecture": {"in_features": int(self.model_.in_features),
                             "out_features": int(self.model_.out_features),
                             "hidden": list(self._hidden), "dropout": float(self._dropout),
                             "activation": "relu", "init": "orthogonal"},
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.model_.state_dict().items()},
            "scheme": {"bvals": _tensor(np.asarray(self.scheme.bvals, dtype=np.float64)),
                       "bvecs": _tensor(np.asarray(self.scheme.bvecs, dtype=np.float64)),
                       "b0_threshold": float(self.scheme.b0_threshold)},
            "task": self.task,
            "outputs": list(self.outputs_),
            "y_1d": bool(self._y_1d),
            "classes": None if self.classes_ is None else self.classes_.tolist(),
            "input_scale": scaling(self.input_scale_),
            "output_scale": scaling(self.output_scale_),
            "config": config,
            "seed": int(self.seed),
            "train_result": {"history": [dict(h) for h in result.history],
                             "best_epoch": int(result.best_epoch),
                             "best_val_loss": float(result.best_val_loss),
                             "stopped_early": bool(result.stopped_early),
                             "epochs_run": int(result.epochs_run)},
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> QSpaceNet:
        """Read an estimator written by :meth:`save`; it predicts exactly as the saved one did.

        Parameters
        ----------
        path : str or os.PathLike
            The file.
        device : str, default "auto"
            Torch device for prediction (and further training).

        Returns
        -------
        QSpaceNet

        Raises
        ------
        InputError
            The file is missing, is not a bioinverse q-space model, or is corrupt or truncated.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a truncated or foreign file
            raise InputError(path, f"is not a readable model file, corrupt or truncated "
                                   f"({type(exc).__name__}: {exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise InputError(path, f"is not a bioinverse q-space model (no {_FORMAT!r} format tag)")
        try:
            return cls._from_payload(payload, device)
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise InputError(path, f"is a corrupt q-space model ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_payload(cls, payload: dict, device: str) -> QSpaceNet:
        arch = payload["architecture"]
        scheme_data = payload["scheme"]
        scheme = GradientTable(scheme_data["bvals"].numpy().astype(np.float64),
                               scheme_data["bvecs"].numpy().astype(np.float64),
                               float(scheme_data["b0_threshold"]))
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in payload["config"].items() if k in fields})
        task = payload["task"]
        outputs = list(payload["outputs"])
        net = cls(scheme, task=task, outputs=tuple(outputs) if task == "regression" else None,
                  hidden=tuple(int(h) for h in arch["hidden"]), dropout=float(arch["dropout"]),
                  config=config, device=device, seed=int(payload["seed"]))
        hidden, dropout, _ = net._validate_settings()

        def scaling(d: dict | None) -> MinMaxScaling | None:
            if d is None:
                return None
            return MinMaxScaling(d["minimum"].numpy().astype(np.float64), d["scale"].numpy().astype(np.float64))

        input_scale, output_scale = scaling(payload["input_scale"]), scaling(payload["output_scale"])
        n_in, n_out = int(arch["in_features"]), int(arch["out_features"])
        classes = None if payload["classes"] is None else np.asarray(payload["classes"])
        expected_out = len(outputs) if task == "regression" else (0 if classes is None else classes.size)
        if (n_in != len(scheme) or input_scale is None or input_scale.minimum.shape != (n_in,)
                or n_out != expected_out
                or (task == "regression" and (output_scale is None or output_scale.minimum.shape != (n_out,)))):
            raise ValueError("the architecture, scheme, scalings and outputs disagree in size")
        with torch.random.fork_rng(devices=[]):
            model = MLP(n_in, n_out, hidden=hidden, activation=arch["activation"], dropout=dropout,
                        init="default")
        model.load_state_dict(payload["state_dict"], strict=True)
        model.to(select_device(device)).eval()

        tr = payload["train_result"]
        net.model_ = model
        net.n_features_in_ = n_in
        net.input_scale_ = input_scale
        net.output_scale_ = output_scale
        net.outputs_ = tuple(outputs)
        net.classes_ = classes
        net.train_result_ = TrainResult(history=[dict(h) for h in tr["history"]],
                                        best_epoch=int(tr["best_epoch"]),
                                        best_val_loss=float(tr["best_val_loss"]),
                                        stopped_early=bool(tr["stopped_early"]),
                                        epochs_run=int(tr["epochs_run"]))
        net._y_1d = bool(payload["y_1d"])
        net._hidden, net._dropout = hidden, dropout
        net._config_used = config
        return net
