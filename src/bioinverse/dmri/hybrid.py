r"""Hybrid microstructure estimation: sparse codes on a physics dictionary, then a split network.

The hybrid method of Rensonnet, Adam & Macq (2021, Sec. 3.4) in two stages:

1. **NNLS.** The b0-normalised signal y of a voxel is decomposed on the dictionary of both
   populations, rotated to their orientations, :math:`\mathcal{D} = [C(\mathbf{u}_1)\;
   C(\mathbf{u}_2)]` (M × 2N, :meth:`FingerprintDictionary.atoms`):

   .. math::

       \hat{\mathbf{w}} = \arg\min_{\mathbf{w} \ge 0} \lVert \mathbf{y} - \mathcal{D}\mathbf{w} \rVert_2^2 .

   The dictionary differs between voxels (through the orientations), so every voxel is its own
   NNLS problem, solved exactly by :func:`bioinverse.optim.stacked_nnls.nnls_stacked` (or, reduced,
   :func:`~bioinverse.optim.stacked_nnls.nnls_factored`, below). The dictionary is coherent and
   numerically rank-deficient, so the minimiser is not unique to round-off: the objective value
   is, but for a few voxels in a hundred the weights can change with last-bit changes of the
   input (see :mod:`bioinverse.optim.stacked_nnls`).
2. **Network.** A :class:`bioinverse.nn.SplitMLP` reads the two halves :math:`\hat{\mathbf{w}}_1,
   \hat{\mathbf{w}}_2` (one branch per population) and a joint head predicts
   :math:`[\nu_1, r_1, f_1, \nu_2, r_2, f_2]`, population k being the one of orientation k.

Exact compression of smooth dictionaries
----------------------------------------
Rotating the dictionary is linear in its table of fingerprints: with the table
:math:`F` (N atoms × (S·T + 1) shell–angle samples, the last column the G = 0 value 1),
:math:`C(\mathbf{u}) = P(\mathbf{u}) F^\mathsf{T}`, :math:`P(\mathbf{u})` the (sparse) linear
interpolation weights of the M measurements. Fingerprints of the analytic model are smooth in
(r, f, θ), so :math:`F` has a tiny numerical rank (15 singular values above 10 ε σ₁ for the 782
atoms of the default grid on the 552-measurement protocol). With the truncated SVD
:math:`F = U_r\Sigma_r W_r^\mathsf{T}`, :math:`C(\mathbf{u}) = [P(\mathbf{u})W_r]\,\Sigma_r U_r^\mathsf{T}`
to round-off, where :math:`P(\mathbf{u})W_r` is the rotation of a dictionary of r "atoms" (the
columns of :math:`W_r`), and every voxel's problem reduces exactly to 2r rows
(:func:`~bioinverse.optim.stacked_nnls.nnls_factored`) instead of M. When the table has no such
low rank (Monte Carlo fingerprints carry sampling noise), the full M × 2N dictionaries are used.
Measured on 2 cores (552 measurements, 782 atoms, SNR 50): 0.8 ms per voxel for the reduced
problems, 4 ms with the full dictionaries; the network adds 0.01 ms.

Targets are min-max scaled to [0, 1] over the dictionary's grid ranges (ν over [0, 1]); training
runs through :func:`bioinverse.train.fit` with the seed's recipe (Table 1: Adagrad, learning rate
1.5×10⁻³, minibatches of 5000, dropout 0.1, MSE).

Protocol transfer (the seed's future work): the network only sees weights over atoms, so a network
trained with protocol P applies to data from P′ once the codes come from the same atoms simulated
for P′ (:meth:`HybridEstimator.transfer`), without retraining.

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
from bioinverse.dmri.dictionary import FingerprintDictionary
from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError
from bioinverse.io import atomic_path
from bioinverse.nn import SplitMLP
from bioinverse.optim.stacked_nnls import nnls_factored, nnls_stacked
from bioinverse.train import TrainConfig, select_device
from bioinverse.train import fit as train_fit

__all__ = ["BRANCH_HIDDEN", "HEAD_HIDDEN", "PARAMETER_NAMES", "HybridEstimator", "hybrid_train_config"]

_FORMAT = "bioinverse.dmri.hybrid/1"
#: Default hidden widths of each branch and of the head: 1712 hidden units and 461 478 weights
#: for the 782-atom default grid, close to the seed's 1700 and 4.6×10⁵ (Table 1).
BRANCH_HIDDEN = (128, 128, 100)
HEAD_HIDDEN = (200, 200, 200, 200, 200)
# Singular values of the fingerprint table above this fraction of the largest are kept; below,
# they are at the round-off of the table itself.
_RANK_RTOL = 10 * np.finfo(np.float64).eps
# Voxels whose dictionaries are held in memory at once: full (M × 2N, 6.9 MB each for the
# 552-measurement protocol) or reduced (2r × 2N).
_FULL_BATCH = 64
_REDUCED_BATCH = 512


def hybrid_train_config(max_epochs: int = 1000, **changes: Any) -> TrainConfig:
    r"""The training settings of the hybrid network (the seed's Table 1).

    Adagrad (Duchi et al., JMLR 12:2121, 2011) at a learning rate of 1.5×10⁻³ on minibatches of
    5000, mean squared error on the [0, 1]-scaled targets, 10 % of the training voxels held out,
    training stopped once the validation loss has not improved for 20 epochs and the weights of
    the best epoch restored:

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
    >>> cfg = hybrid_train_config()
    >>> cfg.optimizer, cfg.lr, cfg.batch_size, cfg.loss
    ('adagrad', 0.0015, 5000, 'mse')
    """
    recipe: dict[str, Any] = {
        "optimizer": "adagrad", "lr": 1.5e-3, "batch_size": 5000, "loss": "mse", "val_fraction": 0.1,
        "early_stopping": "patience", "patience": 20, "restore_best": True, "max_epochs": max_epochs,
        "progress": False,
    }
    recipe.update(changes)
    return TrainConfig(**recipe)


def _check_widths(widths: Any, name: str) -> tuple[int, ...]:
    try:
        widths = tuple(widths)
    except TypeError:
        raise InputError(name, f"must be a sequence of positive integers, got {widths!r}") from None
    for i, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise InputError(f"{name}[{i}]", f"must be a positive integer, got {width!r}")
    return tuple(int(w) for w in widths)


class _Coder:
    """Sparse codes of voxels for one (dictionary, protocol): the NNLS stage of the hybrid.

    Holds the dictionary restricted to the protocol's shells and, when its fingerprint table has a
    low numerical rank r (2r < M/2), the factors of the exact reduction (module documentation):
    a dictionary of r pseudo-atoms (columns of W_r, whose rotation gives P(u) W_r) and
    ``right = Σ_r U_rᵀ`` (r × N).
    """

    def __init__(self, dictionary: FingerprintDictionary, protocol: PGSEProtocol,
                 factors: dict[str, np.ndarray] | None = None):
        if not isinstance(dictionary, FingerprintDictionary):
            raise InputError("dictionary",
                             f"must be a FingerprintDictionary, got {type(dictionary).__name__}")
        self.protocol = protocol
        self.dictionary = dictionary.for_protocol(protocol)
        self.b0 = self.dictionary.shell_index(protocol) < 0
        if factors is None:
            factors = self.factorise(self.dictionary)
        self.factors = factors
        self.rank = int(factors["singular_values"].size)
        self.reduced = 4 * self.rank < len(protocol)
        if self.reduced:
            n, s, t = self.dictionary.signals.shape
            table = factors["table_vectors"]
            d = self.dictionary
            self.pseudo = FingerprintDictionary(np.zeros(self.rank), np.zeros(self.rank), d.shells,
                                                d.angles, table[:, :-1].reshape(self.rank, s, t),
                                                d.generator, d.settings)
            self.pseudo_b0 = table[:, -1].copy()
            block = factors["singular_values"][:, None] * factors["atom_vectors"]
            self.right = np.zeros((2 * self.rank, 2 * n))
            self.right[:self.rank, :n] = block
            self.right[self.rank:, n:] = block

    @staticmethod
    def factorise(dictionary: FingerprintDictionary) -> dict[str, np.ndarray]:
        """Truncated SVD of the table of fingerprints [signals | 1] (N × (S·T + 1)).

        Stored with a saved estimator: LAPACK may round differently from one call to the next
        (e.g. with the memory alignment of its input), and on coherent dictionaries such last-bit
        differences can change which of several equally optimal codes NNLS returns.
        """
        n, s, t = dictionary.signals.shape
        table = np.concatenate([dictionary.signals.reshape(n, s * t), np.ones((n, 1))], axis=1)
        U, sigma, Wt = np.linalg.svd(table, full_matrices=False)
        rank = int(np.count_nonzero(sigma > _RANK_RTOL * sigma[0]))
        return {"singular_values": sigma[:rank].copy(), "atom_vectors": np.ascontiguousarray(U[:, :rank].T),
                "table_vectors": np.ascontiguousarray(Wt[:rank])}

    def left(self, orientations: np.ndarray) -> np.ndarray:
        """``[P(u₁) W_r, P(u₂) W_r]`` for orientations (V, 2, 3): (V, M, 2r)."""
        halves = []
        for k in range(2):
            half = self.pseudo.atoms(self.protocol, orientations[:, k])
            # The rotation code gives every atom the value 1 at G = 0; the pseudo-atoms' value there
            # is the last entry of the singular vectors.
            half[:, self.b0, :] = self.pseudo_b0
            halves.append(half)
        return np.concatenate(halves, axis=2)

    def full(self, orientations: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``[C(u₁) C(u₂)]``: (V, M, 2N), written into ``out`` when given (a buffer reused from
        batch to batch: first-touching fresh memory costs as much as filling it)."""
        V, n = orientations.shape[0], self.dictionary.n_atoms
        if out is None:
            out = np.empty((V, len(self.protocol), 2 * n))
        half = np.empty((V, len(self.protocol), n))
        for k in range(2):
            out[:, :, k * n:(k + 1) * n] = self.dictionary.atoms(self.protocol, orientations[:, k], out=half)
        return out

    def codes(self, y: np.ndarray, orientations: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """NNLS weights (V, 2N) of the b0-normalised signals ``y`` (V, M), stored as ``dtype``
        (float32 for training sets: 2.5 GB instead of 5 for the seed's 4×10⁵ voxels)."""
        V = y.shape[0]
        out = np.empty((V, 2 * self.dictionary.n_atoms), dtype=dtype)
        batch = _REDUCED_BATCH if self.reduced else _FULL_BATCH
        buffer = (None if self.reduced
                  else np.empty((min(batch, V), len(self.protocol), 2 * self.dictionary.n_atoms)))
        for start in range(0, V, batch):
            part = slice(start, min(start + batch, V))
            if self.reduced:
                out[part] = nnls_factored(self.left(orientations[part]), self.right, y[part])[0]
            else:
                size = part.stop - part.start
                out[part] = nnls_stacked(self.full(orientations[part], buffer[:size]), y[part])[0]
        return out


class HybridEstimator:
    r"""Hybrid estimator: NNLS on the rotated dictionary, then a split MLP (Rensonnet et al. 2021).

    For voxel v with b0-normalised signal :math:`\mathbf{y}_v` and population orientations
    :math:`\mathbf{u}_{v1}, \mathbf{u}_{v2}`,

    .. math::

        \hat{\mathbf{w}}_v = \arg\min_{\mathbf{w} \ge 0}
            \big\lVert \mathbf{y}_v - [C(\mathbf{u}_{v1})\; C(\mathbf{u}_{v2})]\,\mathbf{w} \big\rVert_2^2,
        \qquad
        \hat{\mathbf{z}}_v = g\big([f_1(\hat{\mathbf{w}}_{v,1:N}),\, f_2(\hat{\mathbf{w}}_{v,N+1:2N})]\big),

    with branches :math:`f_k` and head g (:class:`~bioinverse.nn.SplitMLP`, ReLU after every hidden
    layer), trained by least squares on the scaled targets
    :math:`z_c = (\omega_c - \ell_c)/(h_c - \ell_c)`, :math:`\omega = [\nu_1, r_1, f_1, \nu_2, r_2, f_2]`,
    :math:`[\ell_c, h_c]` = [0, 1] for ν and the dictionary's grid ranges for r and f. Predictions
    are projected onto the model's domain: :math:`\hat\nu_1 = \mathrm{clip}((\nu_1 - \nu_2 + 1)/2,
    0, 1)`, :math:`\hat\nu_2 = 1 - \hat\nu_1`, r and f clipped to the grid ranges. Rensonnet, Adam &
    Macq, ICML IMLH workshop 2021, §3.4.

    Parameters
    ----------
    dictionary : FingerprintDictionary
        Fingerprints of single populations; its shells must include those of ``protocol``.
    protocol : PGSEProtocol
        The acquisition of the signals (M measurements, at least one with G = 0).
    branch_hidden : sequence of int, default (128, 128, 100)
        Hidden widths of each branch (one branch of N inputs per population).
    head_hidden : sequence of int, default (200, 200, 200, 200, 200)
        Hidden widths of the joint head.
    dropout : float, default 0.1
        Dropout after every hidden ReLU during training.
    config : TrainConfig, optional
        Training settings; default :func:`hybrid_train_config`. Its ``seed`` is replaced by this
        estimator's.
    seed : int, default 0
        Seeds the weight initialisation, the validation split, the data order and dropout.

    Attributes
    ----------
    model_ : bioinverse.nn.SplitMLP
        The trained network, in eval mode (after :meth:`fit` or :meth:`load`).
    ranges_ : ndarray, shape (6, 2)
        [low, high] of every output column, in the order of :data:`PARAMETER_NAMES`.
    train_result_ : TrainResult
        Losses per epoch, best epoch, whether training stopped early.

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.pgse import PGSEProtocol
    >>> from bioinverse.dmri.dictionary import build_dictionary
    >>> rng = np.random.default_rng(0)
    >>> g = rng.standard_normal((30, 3))
    >>> p = PGSEProtocol(np.vstack([[0, 0, 0], g / np.linalg.norm(g, axis=1)[:, None]]),
    ...                  [0.0] + [150.0] * 30, 12.9, 21.8, 57.0)
    >>> d = build_dictionary(p, radius=[0.5, 1.5, 0.5, 1.5], density=[0.3, 0.3, 0.7, 0.7],
    ...                      n_angles=31, progress=False)
    >>> u = np.tile(np.eye(3)[:2], (40, 1, 1))
    >>> y = 0.5 * (d.atoms(p, u[:, 0])[:, :, 0] + d.atoms(p, u[:, 1])[:, :, 3])
    >>> net = HybridEstimator(d, p, branch_hidden=(8,), head_hidden=(8,), dropout=0.0,
    ...                       config=hybrid_train_config(max_epochs=2, batch_size=20, device="cpu"))
    >>> truth = np.tile([0.5, 0.5, 0.3, 0.5, 1.5, 0.7], (40, 1))
    >>> net.sparse_codes(y[:1], u[:1]).round(3).tolist()
    [[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]]
    >>> estimate = net.fit(y, u, truth).predict(y[:3], u[:3])
    >>> len(estimate), sorted(net.activations(y[:3], u[:3]))
    (3, ['branch1.0', 'branch2.0', 'head.0'])
    """

    def __init__(self, dictionary: FingerprintDictionary, protocol: PGSEProtocol, *,
                 branch_hidden: Sequence[int] = BRANCH_HIDDEN, head_hidden: Sequence[int] = HEAD_HIDDEN,
                 dropout: float = 0.1, config: TrainConfig | None = None, seed: int = 0,
                 _factors: dict[str, np.ndarray] | None = None):
        self.protocol = check_protocol(protocol)
        self.branch_hidden = _check_widths(branch_hidden, "branch_hidden")
        if not self.branch_hidden:
            raise InputError("branch_hidden", "must have at least one width (the branch output width)")
        self.head_hidden = _check_widths(head_hidden, "head_hidden")
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
        self._coder = _Coder(dictionary, self.protocol, factors=_factors)
        self.dictionary = self._coder.dictionary
        r, f = self.dictionary.radius, self.dictionary.density
        if not (r.max() > r.min() and f.max() > f.min()):
            raise InputError("dictionary", "needs at least two radii and two densities (the target ranges)")
        self.ranges_ = np.array([[0.0, 1.0], [r.min(), r.max()], [f.min(), f.max()]] * 2)
        self._digest = self.protocol.digest()

    def __repr__(self) -> str:
        return (f"HybridEstimator(dictionary=<{self.dictionary.n_atoms} atoms>, "
                f"protocol=<{len(self.protocol)} measurements>, branch_hidden={self.branch_hidden!r}, "
                f"head_hidden={self.head_hidden!r}, dropout={self.dropout!r}, seed={self.seed!r})")

    @property
    def n_atoms(self) -> int:
        """Atoms per sub-dictionary N (each branch has N inputs)."""
        return self.dictionary.n_atoms

    @property
    def n_parameters(self) -> int:
        """Number of trainable weights and biases of the network."""
        def dense(sizes: Sequence[int]) -> int:
            return sum((a + 1) * b for a, b in itertools.pairwise(sizes))
        return (2 * dense((self.n_atoms, *self.branch_hidden))
                + dense((2 * self.branch_hidden[-1], *self.head_hidden, len(PARAMETER_NAMES))))

    @property
    def n_hidden_units(self) -> int:
        """Number of hidden units (both branches and the head)."""
        return 2 * sum(self.branch_hidden) + sum(self.head_hidden)

    # ----------------------------------------------------------------------------------------
    # Stage 1: sparse codes
    # ----------------------------------------------------------------------------------------

    def _inputs(self, signals: Any, orientations: Any, names: tuple[str, str] = ("signals", "orientations")
                ) -> tuple[np.ndarray, np.ndarray]:
        m = len(self.protocol)
        y = real_finite_array(signals, names[0])
        if y.ndim != 2 or y.shape[1] != m:
            raise InputError(names[0], f"must have shape (V, {m}) for this {m}-measurement protocol, "
                                       f"got {y.shape}")
        u = real_finite_array(orientations, names[1])
        if u.shape != (y.shape[0], 2, 3):
            raise InputError(names[1], f"must have shape ({y.shape[0]}, 2, 3) (two orientations per voxel), "
                                       f"got {u.shape}")
        norms = np.linalg.norm(u, axis=2)
        if (norms == 0).any():
            raise InputError(names[1], f"voxel {int(np.flatnonzero((norms == 0).any(axis=1))[0])} has a "
                                       "zero-length orientation")
        return normalise_b0(y, self.protocol), u

    def sparse_codes(self, signals: Any, orientations: Any) -> np.ndarray:
        r"""NNLS weights of every voxel over the dictionary rotated to its two orientations.

        .. math::

            \hat{\mathbf{w}}_v = \arg\min_{\mathbf{w} \ge 0}
                \big\lVert \mathbf{y}_v
                - [C(\mathbf{u}_{v1})\; C(\mathbf{u}_{v2})]\,\mathbf{w} \big\rVert_2^2,

        :math:`\mathbf{y}_v` the signal divided by the mean of its G = 0 measurements. Exact
        (certified by the KKT conditions, see :func:`~bioinverse.optim.stacked_nnls.nnls_stacked`).

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol (any scale).
        orientations : array_like, shape (V, 2, 3)
            Orientation of population 1 and 2 in every voxel (normalised here; sign irrelevant).

        Returns
        -------
        ndarray, shape (V, 2N)
            Weights of the N atoms of population 1, then of population 2.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, zero-length orientations or a non-positive b0 signal.
        """
        y, u = self._inputs(signals, orientations)
        return self._coder.codes(y, u)

    # ----------------------------------------------------------------------------------------
    # Stage 2: the network
    # ----------------------------------------------------------------------------------------

    def _build_model(self, init: str = "orthogonal") -> SplitMLP:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return SplitMLP([self.n_atoms, self.n_atoms], len(PARAMETER_NAMES),
                            branch_hidden=self.branch_hidden, head_hidden=self.head_hidden, activation="relu",
                            dropout=self.dropout, init=init)

    def _scale(self, values: np.ndarray) -> np.ndarray:
        return scale(values, self.ranges_)

    def _unscale(self, z: np.ndarray) -> np.ndarray:
        return unscale(z, self.ranges_, nu1_floor=0.0)

    def _targets(self, truth: Any, n_voxels: int, name: str) -> np.ndarray:
        if isinstance(truth, Microstructure):
            values = truth.as_array()
        else:
            values = real_finite_array(truth, name)
            if values.ndim != 2 or values.shape[1] != 6:
                raise InputError(name, f"must be a Microstructure or an array of shape (V, 6) "
                                       f"[nu1, r1, f1, nu2, r2, f2], got shape {values.shape}")
        if values.shape[0] != n_voxels:
            raise InputError(name, f"describes {values.shape[0]} voxels but the signals hold {n_voxels}")
        if not np.isfinite(values).all():
            raise InputError(name, "contains NaN or Inf")
        low, high = self.ranges_[:, 0], self.ranges_[:, 1]
        outside = (values < low - RANGE_SLACK) | (values > high + RANGE_SLACK)
        if outside.any():
            row, column = (int(i[0]) for i in np.nonzero(outside))
            raise InputError(name, f"voxel {row}: {PARAMETER_NAMES[column]} = {values[row, column]:.4g} lies "
                                   f"outside the dictionary's range [{low[column]:.4g}, {high[column]:.4g}]")
        return self._scale(values).astype(np.float32)

    def _check_codes(self, codes: Any, name: str) -> np.ndarray:
        """Codes as a float array, float32 kept as is (no float64 copy of a training set)."""
        w = np.asarray(codes)
        if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
            raise InputError(name, f"must be a real numeric array, got dtype {w.dtype}")
        if w.ndim != 2 or w.shape[1] != 2 * self.n_atoms:
            raise InputError(name, f"must have shape (V, {2 * self.n_atoms}) (weights of both "
                                   f"sub-dictionaries), got {w.shape}")
        if not np.isfinite(w).all():
            raise InputError(name, "contains NaN or Inf")
        return w if np.issubdtype(w.dtype, np.floating) else w.astype(np.float64)

    def fit(self, signals: Any, orientations: Any, truth: Microstructure | np.ndarray, *,
            signals_val: Any = None, orientations_val: Any = None,
            truth_val: Microstructure | np.ndarray | None = None,
            checkpoint: str | os.PathLike | None = None, progress: bool = False) -> HybridEstimator:
        """Compute the sparse codes of labelled voxels and train the network on them.

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol.
        orientations : array_like, shape (V, 2, 3)
            Orientations of populations 1 and 2.
        truth : Microstructure or array_like, shape (V, 6)
            Parameters of every voxel ([ν₁, r₁, f₁, ν₂, r₂, f₂] for an array), population k tied
            to orientation k; r and f within the dictionary's grid ranges.
        signals_val, orientations_val, truth_val : optional
            Validation voxels (all or none), replacing the held-out fraction of ``signals``.
        checkpoint : path, optional
            Training checkpoint; a run with an existing one resumes from it.
        progress : bool, default False
            Show a progress bar on stderr.

        Returns
        -------
        HybridEstimator
            ``self``, fitted.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, non-positive b0, or truths outside the grid ranges.
        """
        given = [v is not None for v in (signals_val, orientations_val, truth_val)]
        if any(given) and not all(given):
            raise InputError("signals_val, orientations_val, truth_val", "pass all three or none")
        codes = self._coder.codes(*self._inputs(signals, orientations), dtype=np.float32)
        codes_val = (None if signals_val is None else
                     self._coder.codes(*self._inputs(signals_val, orientations_val,
                                                     ("signals_val", "orientations_val")), dtype=np.float32))
        return self.fit_codes(codes, truth, codes_val=codes_val, truth_val=truth_val, checkpoint=checkpoint,
                              progress=progress)

    def fit_codes(self, codes: Any, truth: Microstructure | np.ndarray, *, codes_val: Any = None,
                  truth_val: Microstructure | np.ndarray | None = None,
                  checkpoint: str | os.PathLike | None = None, progress: bool = False) -> HybridEstimator:
        """Train the network on precomputed sparse codes (:meth:`sparse_codes`).

        Parameters and returns as in :meth:`fit`, with ``codes`` (V, 2N) in place of signals and
        orientations.
        """
        x = self._check_codes(codes, "codes").astype(np.float32, copy=False)
        y = self._targets(truth, x.shape[0], "truth")
        if (codes_val is None) != (truth_val is None):
            raise InputError("codes_val" if codes_val is None else "truth_val",
                             "is missing: pass both codes_val and truth_val, or neither")
        x_val = y_val = None
        if codes_val is not None:
            x_val = self._check_codes(codes_val, "codes_val").astype(np.float32, copy=False)
            y_val = self._targets(truth_val, x_val.shape[0], "truth_val")
        config = hybrid_train_config() if self.config is None else self.config
        run_config = dataclasses.replace(config, seed=self.seed, progress=bool(progress),
                                         checkpoint=config.checkpoint if checkpoint is None else checkpoint)
        model = self._build_model()
        self.train_result_ = train_fit(model, x, y, run_config, X_val=x_val, y_val=y_val)
        self.model_ = model.eval()
        self._config_used = run_config
        return self

    # ----------------------------------------------------------------------------------------
    # Prediction
    # ----------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this HybridEstimator is not fitted yet; call fit() or HybridEstimator.load()")

    def _forward(self, codes: np.ndarray) -> np.ndarray:
        device = next(self.model_.parameters()).device
        with torch.inference_mode():
            z = self.model_(torch.from_numpy(np.asarray(codes, dtype=np.float32)).to(device))
        return z.float().cpu().numpy()

    def predict_codes(self, codes: Any) -> Microstructure:
        """Parameters predicted from precomputed sparse codes (V, 2N); see :meth:`predict`."""
        self._check_fitted()
        return Microstructure.from_array(self._unscale(self._forward(self._check_codes(codes, "codes"))))

    def predict(self, signals: Any, orientations: Any) -> Microstructure:
        """Estimate (ν, r, f) of both populations, population k the one of orientation k.

        Parameters
        ----------
        signals : array_like, shape (V, M)
            Signals measured with the estimator's protocol.
        orientations : array_like, shape (V, 2, 3)
            Orientations of populations 1 and 2 (true or estimated).

        Returns
        -------
        Microstructure
            ν (V, 2) with ν₁ + ν₂ = 1, r (V, 2) µm and f (V, 2) within the grid ranges.

        Raises
        ------
        InputError
            Wrong shapes, NaN/Inf, zero-length orientations or non-positive b0.
        """
        self._check_fitted()
        return self.predict_codes(self.sparse_codes(signals, orientations))

    def activations(self, signals: Any, orientations: Any) -> dict[str, np.ndarray]:
        """Outputs of every hidden layer after its ReLU, for inspection (t-SNE, the seed's Fig. 4).

        Parameters
        ----------
        signals : array_like, shape (V, M)
        orientations : array_like, shape (V, 2, 3)

        Returns
        -------
        dict of str to ndarray
            ``"branch1.0"``, ``"branch1.1"``, … (hidden layers of the branch of population 1),
            ``"branch2.…"``, then ``"head.0"``, ``"head.1"``, …; each (V, width) float32, in
            network order (eval mode: no dropout).
        """
        self._check_fitted()
        codes = self.sparse_codes(signals, orientations)
        device = next(self.model_.parameters()).device
        result: dict[str, np.ndarray] = {}

        def run(layers: torch.nn.Sequential, h: torch.Tensor, prefix: str) -> torch.Tensor:
            index = 0
            for module in layers:
                h = module(h)
                if isinstance(module, torch.nn.ReLU):
                    result[f"{prefix}.{index}"] = h.float().cpu().numpy()
                    index += 1
            return h

        with torch.inference_mode():
            x = torch.from_numpy(codes.astype(np.float32)).to(device)
            blocks = self.model_.split(x)
            features = [run(branch.layers, block, f"branch{b + 1}")
                        for b, (branch, block) in enumerate(zip(self.model_.branches, blocks))]
            run(self.model_.head.layers, torch.cat(features, dim=-1), "head")
        return result

    # ----------------------------------------------------------------------------------------
    # Protocol transfer
    # ----------------------------------------------------------------------------------------

    def transfer(self, dictionary: FingerprintDictionary, protocol: PGSEProtocol) -> HybridEstimator:
        """The same trained network, with sparse codes from another protocol's fingerprints.

        The network reads weights over atoms, not signals: with a dictionary of the same atoms
        (same radii and densities, same order) simulated for the shells of ``protocol``, its
        inputs keep their meaning and no retraining is needed (the seed's Sec. 5).

        Parameters
        ----------
        dictionary : FingerprintDictionary
            Fingerprints covering the shells of ``protocol``, on the estimator's atom grid.
        protocol : PGSEProtocol
            The new acquisition.

        Returns
        -------
        HybridEstimator
            A new estimator (the network is copied).

        Raises
        ------
        InputError
            The atom grid differs, or the dictionary misses a shell of ``protocol``.
        """
        self._check_fitted()
        if not isinstance(dictionary, FingerprintDictionary):
            raise InputError("dictionary",
                             f"must be a FingerprintDictionary, got {type(dictionary).__name__}")
        if not (np.array_equal(dictionary.radius, self.dictionary.radius)
                and np.array_equal(dictionary.density, self.dictionary.density)):
            raise InputError("dictionary", f"has another atom grid ({dictionary.n_atoms} atoms) than the one "
                                           f"the network was trained on ({self.n_atoms} atoms): the same "
                                           "(radius, density) atoms in the same order are needed")
        other = HybridEstimator(dictionary, protocol, branch_hidden=self.branch_hidden,
                                head_hidden=self.head_hidden, dropout=self.dropout, config=self.config,
                                seed=self.seed)
        other.model_ = copy.deepcopy(self.model_).eval()
        other.train_result_ = copy.deepcopy(self.train_result_)
        other._config_used = self._config_used
        return other

    # ----------------------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted estimator to one file, atomically.

        A :func:`torch.save` of plain tensors, numbers, strings, lists and dicts (read back with
        ``weights_only=True``): format tag, bioinverse version, the network's state dict and
        architecture, the atom grid and target ranges, the dictionary (fingerprints and metadata),
        the protocol (arrays and digest), the training settings and history.

        Parameters
        ----------
        path : str or os.PathLike
            Destination (``.pt`` by convention).

        Returns
        -------
        pathlib.Path
        """
        self._check_fitted()
        d, p = self.dictionary, self.protocol
        payload = {
            "format": _FORMAT,
            "bioinverse_version": bioinverse.__version__,
            "architecture": {"branch_features": [self.n_atoms, self.n_atoms],
                             "out_features": len(PARAMETER_NAMES), "branch_hidden": list(self.branch_hidden),
                             "head_hidden": list(self.head_hidden),
                             "dropout": self.dropout, "activation": "relu"},
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.model_.state_dict().items()},
            "parameters": list(PARAMETER_NAMES),
            "grid": {"radius": torch.from_numpy(d.radius.copy()),
                     "density": torch.from_numpy(d.density.copy())},
            "ranges": torch.from_numpy(self.ranges_.copy()),
            "dictionary": {"shells": torch.from_numpy(d.shells.copy()),
                           "angles": torch.from_numpy(d.angles.copy()),
                           "signals": torch.from_numpy(d.signals.copy()), "generator": d.generator,
                           "settings": d.settings},
            "dictionary_metadata": d.metadata(),
            "dictionary_factors": {k: torch.from_numpy(v.copy()) for k, v in self._coder.factors.items()},
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
             device: str = "cpu") -> HybridEstimator:
        """Read an estimator written by :meth:`save`; it predicts exactly as the saved one did.

        Parameters
        ----------
        path : str or os.PathLike
            The file.
        protocol : PGSEProtocol, optional
            The protocol of the caller's data; refused unless it is the saved one (same digest),
            and then used as given. For another protocol, load without it and call
            :meth:`transfer`.
        device : str, default "cpu"
            Torch device of the network (``"auto"``: CUDA when available).

        Returns
        -------
        HybridEstimator

        Raises
        ------
        InputError
            Missing, foreign, corrupt or truncated file, or ``protocol`` differs from the saved one.
        """
        path = Path(path)
        payload = read_model_file(path, _FORMAT, "hybrid dMRI model")
        try:
            saved = stored_protocol(payload)
            if protocol is not None:
                check_protocol(protocol)
                if protocol.digest() != payload["protocol_digest"]:
                    raise InputError("protocol",
                                     f"differs from the protocol {path} was trained for (digest "
                                     f"{protocol.digest()[:12]}… vs {payload['protocol_digest'][:12]}…); "
                                     "load without a protocol and call transfer(dictionary, protocol) to "
                                     "apply the network to another protocol")
                # The caller's own arrays: the stored ones, renormalised on reading, may differ in
                # the last bit, which can switch between equally optimal codes.
                saved = protocol
            grid, stored = payload["grid"], payload["dictionary"]
            dictionary = FingerprintDictionary(grid["radius"].numpy(), grid["density"].numpy(),
                                               stored["shells"].numpy(), stored["angles"].numpy(),
                                               stored["signals"].numpy(), stored["generator"],
                                               stored["settings"])
            arch = payload["architecture"]
            config, train_result = stored_training(payload)
            factors = {k: v.numpy() for k, v in payload["dictionary_factors"].items()}
            net = cls(dictionary, saved, branch_hidden=tuple(arch["branch_hidden"]),
                      head_hidden=tuple(arch["head_hidden"]), dropout=float(arch["dropout"]), config=config,
                      seed=int(payload["seed"]), _factors=factors)
            if (list(arch["branch_features"]) != [net.n_atoms, net.n_atoms]
                    or int(arch["out_features"]) != len(PARAMETER_NAMES)
                    or not np.array_equal(payload["ranges"].numpy(), net.ranges_)):
                raise ValueError("the architecture, grid and ranges disagree")
            model = net._build_model(init="default")
            model.load_state_dict(payload["state_dict"], strict=True)
            model.to(select_device(device)).eval()
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise InputError(path, f"is a corrupt hybrid model ({type(exc).__name__}: {exc})") from None
        net.model_ = model
        net.train_result_ = train_result
        net._config_used = config
        net.saved_version_ = str(payload.get("bioinverse_version", ""))
        return net
