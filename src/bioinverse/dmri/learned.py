r"""Fully learned microstructure estimation: an MLP from the raw diffusion signal to (ν, r, f).

The black-box baseline of Rensonnet et al. (2021): a multilayer perceptron reads the M signals of a
voxel, divided by the mean of its non-weighted (G = 0) measurements, and predicts the six
parameters of a two-population crossing, :math:`[\nu_1, r_1, f_1, \nu_2, r_2, f_2]`. It sees no
fibre orientations, so nothing tells the two populations apart but their parameters; it labels
them by volume fraction (population 1 is the larger ν, :meth:`Microstructure.sorted_by_nu`), and
is trained on truths sorted the same way.

Recipe (the seed's Table 1): ReLU after every hidden layer, dropout 0.05, 4 hidden layers of 900
units (3600 hidden units, 2.9×10⁶ parameters for M = 552), Adagrad at a learning rate of 5×10⁻⁴,
minibatches of 5000, squared-error loss on targets mapped to [0, 1] by fixed ranges (not fitted to
the data, so that networks trained on different sets share one scale), early stopping on a held-out
validation split. Training runs through :func:`bioinverse.train.fit`.

Reference
---------
G. Rensonnet, L. Adam, B. Macq, "Solving inverse problems with deep neural networks driven by
sparse signal decomposition in a physics-based dictionary", ICML Workshop on Interpretable ML in
Healthcare, 2021 (arXiv:2107.10657).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bioinverse
from bioinverse._checks import real_finite_array
from bioinverse.dmri._parameters import (
    PARAMETER_NAMES,
    RANGE_SLACK,
    check_protocol,
    protocol_record,
    read_model_file,
    scale,
    stored_protocol,
    stored_training,
    training_record,
    unscale,
)
from bioinverse.dmri.crossing import Microstructure, normalise_b0
from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError
from bioinverse.io import atomic_path
from bioinverse.nn import MLP
from bioinverse.train import TrainConfig, select_device
from bioinverse.train import fit as train_fit

__all__ = ["DENSITY_RANGE", "PARAMETER_NAMES", "RADIUS_RANGE", "LearnedEstimator", "learned_train_config"]

_FORMAT = "bioinverse.dmri.learned/1"
#: Default fixed range of the axon radius index, µm (that of the default dictionary grid).
RADIUS_RANGE = (0.25, 2.23)
#: Default fixed range of the fibre density.
DENSITY_RANGE = (0.10, 0.76)
# Voxels per forward pass on the CPU: the 900-wide activations of a block (≈ 7 MB in float32) stay
# in the last-level cache; larger blocks spill to main memory without running any faster.
_CPU_BLOCK = 2048
# Voxels normalised at a time when the training inputs are assembled.
_FIT_BLOCK = 16384
_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def learned_train_config(max_epochs: int = 1000, **changes: Any) -> TrainConfig:
    r"""The training settings of the fully learned network (the seed's Table 1).

    Adagrad (Duchi et al., JMLR 12:2121, 2011) at a learning rate of 5×10⁻⁴ on minibatches of
    5000, mean squared error on the [0, 1]-scaled targets, 10 % of the training voxels held out,
    training stopped once the validation loss has not improved for 20 epochs and the weights of
    the best validation epoch restored. Adagrad's step on weight :math:`\theta_i` shrinks with the
    squared gradients seen so far:

    .. math::

        \theta_{i,t+1} = \theta_{i,t} - \frac{\eta\, g_{i,t}}{\sqrt{\sum_{s \le t} g_{i,s}^2} + \epsilon}.

    Rensonnet, Adam & Macq, ICML IMLH workshop 2021, Table 1.

    Parameters
    ----------
    max_epochs : int, default 1000
        Upper bound on the number of epochs (training normally ends by early stopping).
    **changes
        Any other :class:`~bioinverse.train.TrainConfig` field, overriding the recipe.

    Returns
    -------
    TrainConfig

    Examples
    --------
    >>> cfg = learned_train_config()
    >>> cfg.optimizer, cfg.lr, cfg.batch_size, cfg.loss, cfg.early_stopping
    ('adagrad', 0.0005, 5000, 'mse', 'patience')
    >>> learned_train_config(max_epochs=5, lr=1e-3).lr
    0.001
    """
    recipe: dict[str, Any] = {
        "optimizer": "adagrad", "lr": 5e-4, "batch_size": 5000, "loss": "mse", "val_fraction": 0.1,
        "early_stopping": "patience", "patience": 20, "restore_best": True, "max_epochs": max_epochs,
        "progress": False,
    }
    recipe.update(changes)
    return TrainConfig(**recipe)


def _check_range(value: Any, name: str, low_bound: float) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(name, f"must be a pair (low, high) of numbers, got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low_bound <= low < high):
        raise InputError(name, f"must satisfy {low_bound} <= low < high (finite), got {value!r}")
    return low, high


def _column_ranges(radius_range: tuple[float, float], density_range: tuple[float, float]) -> np.ndarray:
    """(6, 2) [low, high] of every output column.

    With ν₁ + ν₂ = 1 and population 1 the larger, ν₁ ∈ [0.5, 1] and ν₂ ∈ [0, 0.5]: these ranges
    spread both volume fractions over the whole unit interval.
    """
    nu1, nu2 = (0.5, 1.0), (0.0, 0.5)
    return np.array([nu1, radius_range, density_range, nu2, radius_range, density_range], dtype=np.float64)


def _truth_array(truth: Any, n_voxels: int, name: str) -> np.ndarray:
    """Truth as float64 (V, 6) in the sorted-by-ν convention."""
    if isinstance(truth, Microstructure):
        micro = truth
    else:
        a = real_finite_array(truth, name)
        if a.ndim != 2 or a.shape[1] != 6:
            raise InputError(name, f"must be a Microstructure or an array of shape (V, 6) "
                                   f"[nu1, r1, f1, nu2, r2, f2], got shape {a.shape}")
        micro = Microstructure.from_array(a)
    if len(micro) != n_voxels:
        raise InputError(name, f"describes {len(micro)} voxels but the signals hold {n_voxels}")
    values = np.asarray(micro.sorted_by_nu().as_array(), dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError(name, "contains NaN or Inf")
    return values


class LearnedEstimator:
    r"""Fully learned estimator: an MLP from the b0-normalised signal of a voxel to (ν, r, f) ×2.

    For a voxel with signals :math:`S_i` (i = 1…M) the network input is
    :math:`x_i = S_i / \bar S_0`, :math:`\bar S_0` the mean of the measurements with G = 0, and its
    outputs :math:`z_c` are the six parameters mapped to [0, 1] by fixed ranges
    :math:`[\ell_c, h_c]`:

    .. math::

        z_c = \frac{\omega_c - \ell_c}{h_c - \ell_c},\qquad
        \min_\theta \sum_{v} \lVert \mathrm{MLP}_\theta(x_v) - z_v \rVert_2^2,

    with :math:`\omega = [\nu_1, r_1, f_1, \nu_2, r_2, f_2]`, population 1 the one with the larger
    volume fraction. The ranges are [0.5, 1] for :math:`\nu_1`, [0, 0.5] for :math:`\nu_2` (the
    fractions sum to 1), ``radius_range`` and ``density_range`` for r and f. Predictions are
    projected back onto that domain: :math:`\hat\nu_1 = \mathrm{clip}((\nu_1 - \nu_2 + 1)/2,
    0.5, 1)` (the closest point with :math:`\nu_1 + \nu_2 = 1`), :math:`\hat\nu_2 = 1 - \hat\nu_1`,
    r and f clipped to their ranges. Rensonnet, Adam & Macq, ICML IMLH workshop 2021, §3.3.

    Parameters
    ----------
    protocol : PGSEProtocol
        The acquisition the network reads (M measurements, in this order), with at least one
        G = 0 measurement.
    hidden : sequence of int, default (900, 900, 900, 900)
        Widths of the hidden ReLU layers (the seed's 3600 hidden units, 3×10⁶ weights).
    dropout : float, default 0.05
        Dropout probability after every hidden ReLU during training.
    config : TrainConfig, optional
        Training settings; default :func:`learned_train_config`. Its ``seed`` is replaced by this
        estimator's.
    seed : int, default 0
        Seeds the weight initialisation, the validation split, the data order and dropout.
    radius_range : (float, float), default (0.25, 2.23)
        Fixed range of the axon radius index r in µm; training truths must lie inside it.
    density_range : (float, float), default (0.10, 0.76)
        Fixed range of the fibre density f; training truths must lie inside it.

    Attributes
    ----------
    model_ : bioinverse.nn.MLP
        The trained network, in eval mode (after :meth:`fit` or :meth:`load`).
    ranges_ : ndarray, shape (6, 2)
        [low, high] of every output column, in the order of :data:`PARAMETER_NAMES`.
    train_result_ : TrainResult
        Losses per epoch, best epoch, whether training stopped early.

    Examples
    --------
    Train briefly on simulated crossings measured with 6 b0 and 60 directions at b = 3000 s/mm²:

    >>> from bioinverse.dmri.crossing import simulate_crossings
    >>> directions = np.random.default_rng(0).normal(size=(66, 3))
    >>> directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    >>> protocol = PGSEProtocol(directions, np.r_[np.zeros(6), np.full(60, 120.0)], 12.9, 21.8, 57.0)
    >>> data = simulate_crossings(protocol, 200, snr=50, seed=1)
    >>> net = LearnedEstimator(protocol, hidden=(32,), dropout=0.0,
    ...                        config=learned_train_config(max_epochs=3, batch_size=100, device="cpu"))
    >>> estimate = net.fit(data.signals, data.truth).predict(data.signals[:5])
    >>> len(estimate), bool((estimate.nu[:, 0] >= estimate.nu[:, 1]).all())
    (5, True)
    >>> sorted(net.activations(data.signals[:5]))
    ['layer1']
    """

    def __init__(self, protocol: PGSEProtocol, *, hidden: Sequence[int] = (900, 900, 900, 900),
                 dropout: float = 0.05, config: TrainConfig | None = None, seed: int = 0,
                 radius_range: tuple[float, float] = RADIUS_RANGE,
                 density_range: tuple[float, float] = DENSITY_RANGE):
        self.protocol = check_protocol(protocol)
        try:
            self.hidden = tuple(hidden)
        except TypeError:
            raise InputError("hidden", f"must be a sequence of layer widths, got {hidden!r}") from None
        for i, width in enumerate(self.hidden):
            if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
                raise InputError(f"hidden[{i}]", f"must be a positive integer, got {width!r}")
        self.hidden = tuple(int(w) for w in self.hidden)
        try:
            self.dropout = float(dropout)
        except (TypeError, ValueError):
            raise InputError("dropout", f"must be a number in [0, 1), got {dropout!r}") from None
        if not 0.0 <= self.dropout < 1.0:
            raise InputError("dropout", f"must be in [0, 1), got {dropout!r}")
        if config is not None and not isinstance(config, TrainConfig):
            raise InputError("config", f"must be a TrainConfig, got {type(config).__name__}")
        if config is not None and config.loss not in ("mse", "l1"):
            raise InputError("config", f"regression needs loss 'mse' or 'l1', got {config.loss!r}")
        self.config = config
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.radius_range = _check_range(radius_range, "radius_range", 0.0)
        self.density_range = _check_range(density_range, "density_range", 0.0)
        if self.density_range[1] > 1.0:
            raise InputError("density_range", f"must lie within [0, 1], got {density_range!r}")
        self.ranges_ = _column_ranges(self.radius_range, self.density_range)
        self._digest = self.protocol.digest()

    def __repr__(self) -> str:
        return (f"LearnedEstimator(protocol=<{len(self.protocol)} measurements>, hidden={self.hidden!r}, "
                f"dropout={self.dropout!r}, seed={self.seed!r})")

    @property
    def n_parameters(self) -> int:
        """Number of trainable weights and biases of the network."""
        sizes = (len(self.protocol), *self.hidden, len(PARAMETER_NAMES))
        return sum((a + 1) * b for a, b in itertools.pairwise(sizes))

    # ----------------------------------------------------------------------------------------
    # Inputs and outputs
    # ----------------------------------------------------------------------------------------

    def _signals(self, signals: Any, protocol: PGSEProtocol | None, name: str = "signals") -> np.ndarray:
        """Signals as a 2-D float array (a view when possible), checked against the protocol."""
        if protocol is not None:
            check_protocol(protocol)
            if protocol.digest() != self._digest:
                raise InputError("protocol", "differs from the protocol the network was trained for "
                                             f"(digest {protocol.digest()[:12]}… vs {self._digest[:12]}…); "
                                             "a fully learned network must be retrained for a new protocol")
        a = np.asarray(signals)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise InputError(name, f"must be a real numeric array, got dtype {a.dtype}")
        m = len(self.protocol)
        if a.ndim != 2 or a.shape[1] != m:
            raise InputError(name, f"must have shape (V, {m}) for this {m}-measurement protocol, "
                                   f"got {a.shape}")
        if a.shape[0] == 0:
            raise InputError(name, "holds no voxels")
        return a

    def _inputs(self, block: np.ndarray, name: str, offset: int = 0) -> np.ndarray:
        """b0-normalised float32 network inputs of a block of voxels (``offset``: its first voxel)."""
        try:
            return normalise_b0(block, self.protocol).astype(np.float32)
        except InputError:
            pass
        # Only on failure: say which voxel of the whole array is at fault.
        block = np.asarray(block, dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise InputError(name, f"voxel {offset + int(np.flatnonzero(~finite)[0])} contains NaN or Inf")
        b0 = block[:, self.protocol.b0s_mask].mean(axis=1)
        row = offset + int(np.flatnonzero(~(b0 > 0))[0])
        raise InputError(name, f"voxel {row} has a mean b0 signal ≤ 0; mask it out")

    def _all_inputs(self, flat: np.ndarray, name: str) -> np.ndarray:
        """Inputs of every voxel as one float32 array, normalised block by block (4×10⁵ voxels of
        552 signals would need a 1.8 GB float64 intermediate at once)."""
        x = np.empty(flat.shape, dtype=np.float32)
        for start in range(0, flat.shape[0], _FIT_BLOCK):
            x[start:start + _FIT_BLOCK] = self._inputs(flat[start:start + _FIT_BLOCK], name, offset=start)
        return x

    def _scale(self, values: np.ndarray) -> np.ndarray:
        return scale(values, self.ranges_)

    def _unscale(self, z: np.ndarray) -> np.ndarray:
        return unscale(z, self.ranges_, nu1_floor=0.5)

    def _targets(self, truth: Any, n_voxels: int, name: str) -> np.ndarray:
        values = _truth_array(truth, n_voxels, name)
        low, high = self.ranges_[:, 0], self.ranges_[:, 1]
        outside = (values < low - RANGE_SLACK) | (values > high + RANGE_SLACK)
        if outside.any():
            row, column = (int(i[0]) for i in np.nonzero(outside))
            what = {1: "radius_range", 2: "density_range", 4: "radius_range", 5: "density_range"}
            hint = (f"; widen {what[column]}" if column in what
                    else "; volume fractions must lie in [0, 1] and sum to 1")
            raise InputError(name, f"voxel {row}: {PARAMETER_NAMES[column]} = {values[row, column]:.4g} lies "
                                   f"outside the fixed range [{low[column]:.4g}, {high[column]:.4g}]{hint}")
        return self._scale(values).astype(np.float32)

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def fit(self, signals: Any, truth: Microstructure | np.ndarray, *, signals_val: Any = None,
            truth_val: Microstructure | np.ndarray | None = None, protocol: PGSEProtocol | None = None,
            checkpoint: str | os.PathLike | None = None, progress: bool = False) -> LearnedEstimator:
        """Train the network on simulated (or otherwise labelled) voxels.

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol (any scale; each voxel is divided by
            the mean of its G = 0 measurements).
        truth : Microstructure or array_like, shape (V, 6)
            Parameters of every voxel ([ν₁, r₁, f₁, ν₂, r₂, f₂] for an array); populations may
            come in any order, they are sorted by ν (population 1 the larger) before training.
        signals_val, truth_val : optional
            Validation voxels (both or neither), replacing the held-out fraction of ``signals``.
        protocol : PGSEProtocol, optional
            The protocol of ``signals``; when given it must be the estimator's (same digest).
        checkpoint : path, optional
            Training checkpoint; a run with an existing one resumes from it.
        progress : bool, default False
            Show a progress bar on stderr.

        Returns
        -------
        LearnedEstimator
            ``self``, fitted.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, a non-positive b0, truths outside the fixed ranges, or a
            protocol other than the estimator's.
        """
        flat = self._signals(signals, protocol)
        x = self._all_inputs(flat, "signals")
        y = self._targets(truth, flat.shape[0], "truth")
        if (signals_val is None) != (truth_val is None):
            raise InputError("signals_val" if signals_val is None else "truth_val",
                             "is missing: pass both signals_val and truth_val, or neither")
        x_val = y_val = None
        if signals_val is not None:
            flat_val = self._signals(signals_val, None, "signals_val")
            x_val = self._all_inputs(flat_val, "signals_val")
            y_val = self._targets(truth_val, flat_val.shape[0], "truth_val")

        config = learned_train_config() if self.config is None else self.config
        run_config = dataclasses.replace(
            config, seed=self.seed, progress=bool(progress),
            checkpoint=config.checkpoint if checkpoint is None else checkpoint)
        # Initialise from the estimator's seed without disturbing the caller's random streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = MLP(len(self.protocol), len(PARAMETER_NAMES), hidden=self.hidden, activation="relu",
                        dropout=self.dropout, init="orthogonal")
        result = train_fit(model, x, y, run_config, X_val=x_val, y_val=y_val)
        self.model_ = model.eval()
        self.train_result_ = result
        self._config_used = run_config
        return self

    # ----------------------------------------------------------------------------------------
    # Prediction
    # ----------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this LearnedEstimator is not fitted yet; call fit() or LearnedEstimator.load()")

    def _blocks(self, signals: Any, protocol: PGSEProtocol | None, batch_size: int):
        """Yield (first voxel, number of voxels, float32 inputs on the model's device) per block.

        On the CPU blocks hold at most ``_CPU_BLOCK`` voxels, normalised just before their forward
        pass so that the signals, inputs and activations of a block stay in cache.
        """
        self._check_fitted()
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
        flat = self._signals(signals, protocol)
        device = next(self.model_.parameters()).device
        step = min(int(batch_size), _CPU_BLOCK) if device.type == "cpu" else int(batch_size)
        for start in range(0, flat.shape[0], step):
            x = self._inputs(flat[start:start + step], "signals", offset=start)
            yield start, flat.shape[0], torch.from_numpy(x).to(device)

    def predict_array(self, signals: Any, *, protocol: PGSEProtocol | None = None, batch_size: int = 10000,
                      precision: str = "float32") -> np.ndarray:
        """Predicted parameters as a float64 array (V, 6) [ν₁, r₁, f₁, ν₂, r₂, f₂].

        Parameters and convention as in :meth:`predict`.
        """
        self._check_fitted()
        if precision not in _PRECISIONS:
            raise InputError("precision", f"must be one of {', '.join(map(repr, _PRECISIONS))}, got {precision!r}")
        dtype = _PRECISIONS[precision]
        # A reduced-precision copy; the trained float32 weights stay untouched.
        model = self.model_ if dtype == torch.float32 else copy.deepcopy(self.model_).to(dtype)
        model.eval()
        out: np.ndarray | None = None
        with torch.inference_mode():
            for start, total, x in self._blocks(signals, protocol, batch_size):
                if out is None:
                    out = np.empty((total, len(PARAMETER_NAMES)), dtype=np.float32)
                out[start:start + x.shape[0]] = model(x.to(dtype)).float().cpu().numpy()
        return self._unscale(out)

    def predict(self, signals: Any, *, protocol: PGSEProtocol | None = None, batch_size: int = 10000,
                precision: str = "float32") -> Microstructure:
        """Estimate (ν, r, f) of both populations, population 1 the one with the larger ν.

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol (any scale: each voxel is divided by
            the mean of its G = 0 measurements).
        protocol : PGSEProtocol, optional
            Their protocol; when given, one with another digest is refused.
        batch_size : int, default 10000
            Voxels sent to the device at a time (on the CPU, at most 2048 per forward pass).
        precision : {"float32", "bfloat16"}
            Arithmetic of the forward pass. ``"bfloat16"`` (8-bit mantissa) runs about 2.5 times
            faster on CPUs with bfloat16 instructions (AVX-512 BF16, AMX), at errors of a few
            10⁻³ of the parameter ranges, far below the estimation errors.

        Returns
        -------
        Microstructure
            ν (V, 2) with ν₁ ≥ ν₂ and ν₁ + ν₂ = 1, r (V, 2) µm and f (V, 2), within the fixed ranges.

        Raises
        ------
        InputError
            Wrong number of measurements, NaN/Inf, non-positive b0, or another protocol.
        """
        return Microstructure.from_array(self.predict_array(signals, protocol=protocol, batch_size=batch_size,
                                                            precision=precision))

    def activations(self, signals: Any, *, protocol: PGSEProtocol | None = None,
                    batch_size: int = 10000) -> dict[str, np.ndarray]:
        """Outputs of every hidden layer after its ReLU, for inspection (e.g. t-SNE, the seed's Fig. 4).

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol.
        protocol : PGSEProtocol, optional
            Their protocol; when given, one with another digest is refused.
        batch_size : int, default 10000
            Voxels per forward pass.

        Returns
        -------
        dict of str to ndarray
            ``{"layer1": (V, hidden[0]), "layer2": (V, hidden[1]), …}`` float32, in network order
            (eval mode: no dropout).
        """
        self._check_fitted()
        result: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for start, total, x in self._blocks(signals, protocol, batch_size):
                if not result:
                    result = {f"layer{k + 1}": np.empty((total, w), dtype=np.float32)
                              for k, w in enumerate(self.hidden)}
                h, k = x, 0
                for module in self.model_.layers[:-1]:  # the last module is the linear output
                    h = module(h)
                    if isinstance(module, torch.nn.ReLU):
                        k += 1
                        result[f"layer{k}"][start:start + h.shape[0]] = h.cpu().numpy()
        return result

    # ----------------------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted estimator to one file, atomically.

        The file is a :func:`torch.save` of plain tensors, numbers, strings, lists and dicts, read
        back with ``weights_only=True``: format tag, bioinverse version, the network's state dict
        and architecture, the fixed target ranges, the protocol (its arrays and digest), the
        training settings and history.

        Parameters
        ----------
        path : str or os.PathLike
            Destination (``.pt`` by convention).

        Returns
        -------
        pathlib.Path
        """
        self._check_fitted()
        p = self.protocol
        payload = {
            "format": _FORMAT,
            "bioinverse_version": bioinverse.__version__,
            "architecture": {"in_features": len(p), "out_features": len(PARAMETER_NAMES),
                             "hidden": list(self.hidden), "dropout": self.dropout, "activation": "relu"},
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.model_.state_dict().items()},
            "parameters": list(PARAMETER_NAMES),
            "radius_range": list(self.radius_range),
            "density_range": list(self.density_range),
            "ranges": torch.from_numpy(self.ranges_.copy()),
            "protocol": protocol_record(p),
            "protocol_digest": self._digest,
            "seed": self.seed,
            **training_record(self._config_used, self.train_result_),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, protocol: PGSEProtocol | None = None,
             device: str = "cpu") -> LearnedEstimator:
        """Read an estimator written by :meth:`save`; it predicts exactly as the saved one did.

        Parameters
        ----------
        path : str or os.PathLike
            The file.
        protocol : PGSEProtocol, optional
            The protocol the caller's data use; refused unless it is the saved one (same digest).
        device : str, default "cpu"
            Torch device for prediction (``"auto"``: CUDA when available).

        Returns
        -------
        LearnedEstimator

        Raises
        ------
        InputError
            Missing, foreign, corrupt or truncated file, or ``protocol`` differs from the saved one.
        """
        path = Path(path)
        payload = read_model_file(path, _FORMAT, "fully learned dMRI model")
        try:
            saved = stored_protocol(payload)
            if protocol is not None:
                check_protocol(protocol)
                if protocol.digest() != payload["protocol_digest"]:
                    raise InputError("protocol", f"differs from the protocol {path} was trained for "
                                                 f"(digest {protocol.digest()[:12]}… vs "
                                                 f"{payload['protocol_digest'][:12]}…); a fully learned "
                                                 "network must be retrained for a new protocol")
            arch = payload["architecture"]
            config, train_result = stored_training(payload)
            net = cls(saved, hidden=tuple(int(h) for h in arch["hidden"]), dropout=float(arch["dropout"]),
                      config=config, seed=int(payload["seed"]),
                      radius_range=tuple(payload["radius_range"]), density_range=tuple(payload["density_range"]))
            if (int(arch["in_features"]) != len(saved) or int(arch["out_features"]) != len(PARAMETER_NAMES)
                    or not np.array_equal(payload["ranges"].numpy(), net.ranges_)):
                raise ValueError("the architecture, protocol and ranges disagree")
            with torch.random.fork_rng(devices=[]):
                model = MLP(len(saved), len(PARAMETER_NAMES), hidden=net.hidden, activation=arch["activation"],
                            dropout=net.dropout, init="default")
            model.load_state_dict(payload["state_dict"], strict=True)
            model.to(select_device(device)).eval()
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise InputError(path, f"is a corrupt fully learned model ({type(exc).__name__}: {exc})") from None
        net.model_ = model
        net.train_result_ = train_result
        net._config_used = config
        net.saved_version_ = str(payload.get("bioinverse_version", ""))
        return net
