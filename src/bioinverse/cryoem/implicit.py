r"""Neural implicit representations of density maps: SIREN and random Fourier features.

A coordinate network :math:`f_\theta : [-1, 1]^d \to \mathbb R` stands for a map (d = 3) or an
image (d = 2): it is fitted to the voxel values by least squares,

.. math::

    \min_\theta \frac{1}{n} \sum_{i=1}^{n} \bigl(f_\theta(u_i) - (v_i - \mu)/\sigma\bigr)^2 ,

over shuffled minibatches of voxel coordinates :math:`u_i` and standardised values (Adam, a cosine
learning-rate decay, through :func:`bioinverse.train.fit`), and then evaluated anywhere: on the same
grid, on a finer one, or on a sub-volume. Two networks from :mod:`bioinverse.nn`:

* ``"siren"``: :class:`~bioinverse.nn.SIREN`, sine activations with :math:`\omega_0` (Sitzmann et
  al., NeurIPS 2020), the exact initialisation;
* ``"fourier"``: :class:`~bioinverse.nn.FourierFeatureMLP`, a ReLU MLP on random Fourier features
  :math:`[\cos 2\pi B u, \sin 2\pi B u]`, :math:`B_{ij} \sim \mathcal N(0, \text{scale}^2)` (Tancik
  et al., NeurIPS 2020).

Coordinates
-----------
Voxel :math:`i` of an axis of :math:`N` voxels of size :math:`p` lies at
:math:`u = (i - \lfloor N/2 \rfloor) / (N/2)`, so that the box spans :math:`[-1, 1)` and its
centre (voxel :math:`\lfloor N/2 \rfloor`, the rotation centre of cryo-EM software) is at 0. A
render with box :math:`M`, pixel size :math:`q` and centre offset :math:`s` (Å) evaluates the network
at :math:`u = ((k - \lfloor M/2 \rfloor) q + s) / (N p / 2)`: the same physical points whatever the
sampling, so a 2× render at :math:`q = p/2` lands voxel :math:`2i` on voxel :math:`i` of the input.
Outside :math:`[-1, 1)` the network extrapolates; nothing there was fitted. Network inputs are in
(x, y, z) order; arrays are (z, y, x).

Between the samples
-------------------
Fitted to the grid alone (``supersample=1``, the source's way), a network is free to do anything
between voxels, and a wide SIREN does: it interpolates worse than a cubic spline. The samples of a
map stand for a band-limited function (Shannon), and with ``supersample=s`` the network is fitted
to that function on an s× finer grid, computed exactly by Fourier interpolation
(:func:`band_limited_upsample`, which leaves the input samples unchanged). A render at a finer
sampling then follows the band-limited map; it cannot do better than Fourier interpolation, which
it approximates, because nothing in the samples says what lies beyond their Nyquist frequency.

Importance sampling
-------------------
Proteins fill a small part of their box (adenylate kinase: 4 % of a 96 Å box above 5 % of its
peak). With ``importance=α`` a fraction α of the samples of each epoch come from the molecule
(voxels above :math:`\mu + \sigma`, dilated by one voxel), the rest uniformly from the whole box:
the loss becomes a weighted MSE that spends more of the network on the molecule.

Compression ratio: bytes of the float32 map over bytes of the float32 trainable parameters (the
Fourier features' matrix B is drawn from a stored seed and not counted).

References
----------
V. Sitzmann et al., "Implicit neural representations with periodic activation functions",
NeurIPS 2020. M. Tancik et al., "Fourier features let networks learn high frequency functions in
low dimensional domains", NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bioinverse._checks import positive_number, real_finite_array
from bioinverse.errors import InputError
from bioinverse.fourier import FSCCurve, frc, fsc
from bioinverse.io import atomic_path, read_model_file
from bioinverse.nn import SIREN, FourierFeatureMLP
from bioinverse.train import TrainConfig
from bioinverse.train import fit as train_fit

__all__ = [
    "Architecture",
    "FitSettings",
    "ImplicitMap",
    "band_limited_upsample",
    "central_slice",
    "fit_map",
    "grid_coordinates",
    "load_implicit",
]

_FORMAT = "bioinverse.cryoem.implicit/1"
KINDS = ("siren", "fourier")
# Points per forward pass when rendering: 65536 × 256 float32 activations = 64 MB per layer.
DEFAULT_CHUNK = 65536


@dataclass(frozen=True)
class Architecture:
    """Which coordinate network, and how large.

    Parameters
    ----------
    kind : {"siren", "fourier"}
    hidden_features : int
        Width of every hidden layer.
    hidden_layers : int
        SIREN: sine layers after the first (``SIREN(d, hidden_features, hidden_layers, 1)``).
        Fourier features: number of ReLU hidden layers.
    first_omega0, hidden_omega0 : float
        SIREN's :math:`\\omega_0` of the first and of the later sine layers.
    n_features : int
        Fourier features: number of random frequencies (the embedding has twice as many entries).
    scale : float
        Fourier features: standard deviation of the frequencies, in cycles per unit of u (the box
        spans 2 units, so a map's Nyquist frequency is N/4 cycles per unit).
    seed : int
        Seeds the initial weights and the Fourier features' B.
    """

    kind: str = "siren"
    hidden_features: int = 88
    hidden_layers: int = 3
    first_omega0: float = 30.0
    hidden_omega0: float = 30.0
    n_features: int = 128
    scale: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("hidden_features", "n_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(name, f"must be a positive integer, got {value!r}")
        if isinstance(self.hidden_layers, bool) or not isinstance(self.hidden_layers, int) or self.hidden_layers < 0:
            raise InputError("hidden_layers", f"must be a non-negative integer, got {self.hidden_layers!r}")
        if self.kind == "fourier" and self.hidden_layers < 1:
            raise InputError("hidden_layers", "must be at least 1 for a Fourier-feature network")
        for name in ("first_omega0", "hidden_omega0", "scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(name, f"must be a positive number, got {value!r}")

    def build(self, dimensions: int) -> torch.nn.Module:
        """A freshly initialised network from ``dimensions`` coordinates to one value."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.kind == "siren":
                return SIREN(dimensions, self.hidden_features, self.hidden_layers, 1,
                             first_omega0=self.first_omega0, hidden_omega0=self.hidden_omega0)
            return FourierFeatureMLP(dimensions, 1, n_features=self.n_features, scale=self.scale,
                                     hidden=(self.hidden_features,) * self.hidden_layers, seed=self.seed)

    def n_parameters(self, dimensions: int) -> int:
        """Number of trainable parameters of the network for ``dimensions`` coordinates."""
        h, layers = self.hidden_features, self.hidden_layers
        if self.kind == "siren":
            return (dimensions + 1) * h + layers * (h + 1) * h + (h + 1)
        return (2 * self.n_features + 1) * h + (layers - 1) * (h + 1) * h + (h + 1)


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit_map` fits a network.

    Parameters
    ----------
    steps : int
        Number of minibatch steps; rounded to whole epochs (passes over the training coordinates),
        at least one.
    batch_size : int
        Coordinates per step; at least the number of coordinates means full-batch gradient descent.
    lr : float
        Adam's learning rate at the start; it decays along half a cosine to ``lr × final_lr_fraction``.
    final_lr_fraction : float
        Learning rate at the end, as a fraction of ``lr``.
    supersample : int
        Fit the band-limited map on a grid this many times finer (see the module documentation);
        1 fits the voxels alone.
    importance : float
        Fraction in [0, 1) of the samples drawn from the molecule; 0 samples uniformly.
    seed : int
        Seeds the order of the samples.
    """

    steps: int = 3200
    batch_size: int = 8192
    lr: float = 1e-3
    final_lr_fraction: float = 0.01
    supersample: int = 1
    importance: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "supersample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(name, f"must be a positive integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError("lr", f"must be a positive number, got {self.lr!r}")
        if not 0 < self.final_lr_fraction <= 1:
            raise InputError("final_lr_fraction", f"must be in (0, 1], got {self.final_lr_fraction!r}")
        if not 0 <= self.importance < 1:
            raise InputError("importance", f"must be in [0, 1), got {self.importance!r}")


# --------------------------------------------------------------------------------------------------
# Geometry


def _check_grid(volume: np.ndarray, what: str) -> np.ndarray:
    a = real_finite_array(volume, what)
    if a.ndim not in (2, 3):
        raise InputError(what, f"must be a 2-D image or a 3-D map, got shape {a.shape}")
    if len(set(a.shape)) != 1:
        raise InputError(what, f"must be a square image or a cubic map, got shape {a.shape}")
    if a.shape[0] < 2:
        raise InputError(what, f"is too small: {a.shape}")
    return a.astype(np.float32)


def grid_coordinates(box: int, dimensions: int, extent: float, pixel_size: float,
                     shift: tuple[float, ...] | None = None) -> np.ndarray:
    """Network coordinates of the voxels of a box, in (x, y[, z]) order, C order of the voxels.

    Parameters
    ----------
    box : int
        Voxels per axis of the rendered grid.
    dimensions : int
        2 or 3.
    extent : float
        Half the edge of the fitted box in Å (``N p / 2``): the length that maps to 1.
    pixel_size : float
        Å per voxel of the rendered grid.
    shift : tuple of float, optional
        Offset of the rendered box's centre from the fitted box's centre, Å, in (x, y[, z]) order.

    Returns
    -------
    ndarray, shape (box**dimensions, dimensions), float32

    Examples
    --------
    >>> grid_coordinates(4, 2, extent=3.0, pixel_size=1.5)[:5].tolist()
    [[-1.0, -1.0], [-0.5, -1.0], [0.0, -1.0], [0.5, -1.0], [-1.0, -0.5]]
    """
    shift = (0.0,) * dimensions if shift is None else tuple(float(v) for v in shift)
    if len(shift) != dimensions:
        raise InputError("shift", f"needs {dimensions} values (x, y{', z' if dimensions == 3 else ''}), "
                                  f"got {len(shift)}")
    offsets = (np.arange(box) - box // 2) * pixel_size
    axes = [(offsets + shift[d]) / extent for d in range(dimensions)]  # x, y, z
    mesh = np.meshgrid(*axes[::-1], indexing="ij")  # (z, y, x) voxel order
    return np.stack(mesh[::-1], axis=-1).reshape(-1, dimensions).astype(np.float32)


def band_limited_upsample(volume: np.ndarray, factor: int) -> np.ndarray:
    """The band-limited (trigonometric) interpolant of a square or cubic grid on a finer grid.

    Zero-padding of the spectrum, axis by axis; for an even box the Nyquist coefficient is split in
    half between +N/2 and −N/2, so that the result is real and voxel ``factor·i`` of the output
    equals voxel ``i`` of the input (the centre convention of :func:`grid_coordinates`).

    Examples
    --------
    >>> a = np.random.default_rng(0).normal(size=(8, 8))
    >>> up = band_limited_upsample(a, 2)
    >>> up.shape, bool(np.allclose(up[::2, ::2], a))
    ((16, 16), True)
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InputError("factor", f"must be a positive integer, got {factor!r}")
    out = np.asarray(volume, dtype=np.float64)
    if factor == 1:
        return out.copy()
    for axis in range(out.ndim):
        n = out.shape[axis]
        spectrum = np.moveaxis(np.fft.fft(out, axis=axis), axis, 0)
        padded = np.zeros((n * factor,) + spectrum.shape[1:], dtype=complex)
        half = n // 2
        padded[:half + n % 2] = spectrum[:half + n % 2]
        padded[n * factor - half:] = spectrum[n - half:]
        if n % 2 == 0:
            padded[half] = spectrum[half] / 2
            padded[n * factor - half] = spectrum[half] / 2
        out = np.moveaxis(np.fft.ifft(padded, axis=0).real * factor, 0, axis)
    return out


def central_slice(volume: np.ndarray, axis: str = "z") -> np.ndarray:
    """The central section of a cubic map normal to ``axis`` (index N // 2), as a 2-D image.

    Examples
    --------
    >>> v = np.arange(27.0).reshape(3, 3, 3)
    >>> central_slice(v, "z").tolist() == v[1].tolist(), central_slice(v, "x").shape
    (True, (3, 3))
    """
    axes = {"z": 0, "y": 1, "x": 2}
    if axis not in axes:
        raise InputError("slice", f"must be one of x, y, z, got {axis!r}")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError("slice", f"needs a 3-D map, got shape {volume.shape}")
    return np.take(volume, volume.shape[axes[axis]] // 2, axis=axes[axis])


def _molecule_mask(values: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    mask = values > values.mean() + values.std()
    return ndimage.binary_dilation(mask)


# --------------------------------------------------------------------------------------------------
# The representation


class ImplicitMap:
    """A fitted coordinate network together with the geometry and scaling of its map.

    Parameters
    ----------
    network : torch.nn.Module
        Built by ``architecture.build(dimensions)``; kept in eval mode on the CPU.
    architecture : Architecture
    box : int
        Voxels per axis of the fitted map or image.
    dimensions : int
        2 (an image) or 3 (a map).
    pixel_size : float
        Å per voxel of the fitted map.
    origin : tuple of float
        Position (Å, x y[ z]) of the centre of the fitted map's first voxel, as in its MRC header.
    mean, std : float
        The network predicts ``(value − mean) / std``.
    record : dict, optional
        How it was fitted (settings, seconds, final loss), saved with it.
    """

    def __init__(self, network: torch.nn.Module, architecture: Architecture, *, box: int, dimensions: int,
                 pixel_size: float, origin: tuple[float, ...], mean: float, std: float,
                 record: dict | None = None):
        self.network = network.cpu().eval()
        self.architecture = architecture
        self.box, self.dimensions = int(box), int(dimensions)
        self.pixel_size = float(pixel_size)
        self.origin = tuple(float(v) for v in origin)
        self.mean, self.std = float(mean), float(std)
        self.record = dict(record or {})

    @property
    def extent(self) -> float:
        """Half the edge of the fitted box, Å: the physical length that maps to 1."""
        return self.box * self.pixel_size / 2

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad)

    @property
    def compression_ratio(self) -> float:
        """Bytes of the float32 map over bytes of the float32 trainable parameters."""
        return self.box ** self.dimensions / self.n_parameters

    def render(self, box: int | None = None, pixel_size: float | None = None,
               shift: tuple[float, ...] | None = None, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        """Evaluate the network on a grid: the fitted one by default, or any other.

        Parameters
        ----------
        box : int, optional
            Voxels per axis; by default the fitted box scaled by the change of pixel size.
        pixel_size : float, optional
            Å per voxel; by default that of the fitted map.
        shift : tuple of float, optional
            Centre of the rendered box relative to the fitted box's centre, Å, (x, y[, z]).
        chunk : int
            Points per forward pass; bounds the memory, not the result.

        Returns
        -------
        ndarray, shape (box,) * dimensions, float32, in the units of the fitted map.
        """
        pixel_size = self.pixel_size if pixel_size is None else positive_number(pixel_size, "pixel_size", unit="Å")
        if box is None:
            box = max(1, round(self.box * self.pixel_size / pixel_size))
        if isinstance(box, bool) or not isinstance(box, int) or box < 1:
            raise InputError("box", f"must be a positive integer, got {box!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError("chunk", f"must be a positive integer, got {chunk!r}")
        coords = torch.from_numpy(grid_coordinates(box, self.dimensions, self.extent, pixel_size, shift))
        out = torch.empty(coords.shape[0], dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, coords.shape[0], chunk):
                out[start:start + chunk] = self.network(coords[start:start + chunk])[:, 0]
        return (out.numpy() * self.std + self.mean).astype(np.float32).reshape((box,) * self.dimensions)

    def render_origin(self, box: int, pixel_size: float, shift: tuple[float, ...] | None = None) -> tuple[float, ...]:
        """MRC origin (Å, x y[ z]) of a render, so that it overlays the fitted map in a viewer."""
        shift = (0.0,) * self.dimensions if shift is None else shift
        centre = [o + (self.box // 2) * self.pixel_size for o in self.origin]
        return tuple(c + s - (box // 2) * pixel_size for c, s in zip(centre, shift))

    def evaluate(self, reference: np.ndarray, pixel_size: float | None = None) -> FSCCurve:
        """FSC (3-D) or FRC (2-D) of the render at the reference's sampling against the reference.

        The render takes the reference's box and ``pixel_size`` (Å; by default the fitted map's), so a
        finer reference (an up-sampling test) is compared at its own sampling, centre on centre.
        """
        reference = _check_grid(reference, "reference")
        if reference.ndim != self.dimensions:
            raise InputError("reference", f"is {reference.ndim}-D, the representation {self.dimensions}-D")
        pixel_size = self.pixel_size if pixel_size is None else float(pixel_size)
        rendered = self.render(box=reference.shape[0], pixel_size=pixel_size)
        correlate = fsc if self.dimensions == 3 else frc
        return correlate(rendered, reference, pixel_size)

    # -- files ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the representation atomically (a ``torch.load(weights_only=True)`` file)."""
        payload = {
            "format": _FORMAT,
            "architecture": dataclasses.asdict(self.architecture),
            "box": self.box,
            "dimensions": self.dimensions,
            "pixel_size": self.pixel_size,
            "origin": list(self.origin),
            "mean": self.mean,
            "std": self.std,
            "record": self.record,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path


def load_implicit(path: str | os.PathLike) -> ImplicitMap:
    """Read a representation written by :meth:`ImplicitMap.save`; ``InputError`` if it is not one."""
    path = Path(path)
    payload = read_model_file(path, _FORMAT, "an implicit-map model")
    try:
        architecture = Architecture(**payload["architecture"])
        dimensions = int(payload["dimensions"])
        network = architecture.build(dimensions)
        network.load_state_dict(payload["state_dict"])
        model = ImplicitMap(network, architecture, box=payload["box"], dimensions=dimensions,
                            pixel_size=payload["pixel_size"], origin=tuple(payload["origin"]),
                            mean=payload["mean"], std=payload["std"], record=payload["record"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"is an incomplete or inconsistent model file ({exc})") from None
    if not (model.pixel_size > 0 and model.std > 0 and model.box >= 2 and len(model.origin) == dimensions):
        raise InputError(path, "has an invalid geometry or scaling")
    return model


# --------------------------------------------------------------------------------------------------
# Fitting


def _training_set(values: np.ndarray, pixel_size: float, settings: FitSettings) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates and standardised targets of every training sample (before shuffling)."""
    box, dimensions = values.shape[0], values.ndim
    extent = box * pixel_size / 2
    fine = values if settings.supersample == 1 else band_limited_upsample(values, settings.supersample).astype(np.float32)
    coords = grid_coordinates(box * settings.supersample, dimensions, extent, pixel_size / settings.supersample)
    targets = fine.reshape(-1)
    if settings.importance > 0:
        inside = np.flatnonzero(_molecule_mask(fine).reshape(-1))
        if inside.size:
            copies = round(settings.importance * targets.size / ((1 - settings.importance) * inside.size))
            extra = np.tile(inside, copies)
            coords = np.concatenate([coords, coords[extra]])
            targets = np.concatenate([targets, targets[extra]])
    return coords, targets


def fit_map(values: np.ndarray, pixel_size: float, *, origin: tuple[float, ...] | None = None,
            architecture: Architecture | None = None, settings: FitSettings | None = None,
            checkpoint: str | os.PathLike | None = None, progress: bool = False,
            device: str = "auto") -> ImplicitMap:
    """Fit a coordinate network to a cubic map or a square image.

    Parameters
    ----------
    values : ndarray, shape (N, N, N) or (N, N)
        The map (z, y, x) or image (y, x).
    pixel_size : float
        Å per voxel.
    origin : tuple of float, optional
        MRC origin of the map (Å, x y[ z]); stored so that renders overlay it. Default 0.
    architecture : Architecture, optional
        Default: a SIREN of 3 + 1 sine layers of 88 units (23,937 parameters for a map).
    settings : FitSettings, optional
    checkpoint : path, optional
        Training checkpoint; a run whose checkpoint exists resumes from it.
    progress : bool
        Show a progress bar.
    device : str
        Torch device of the fit: ``"auto"`` (CUDA when available, else CPU) or a device string; the
        result is returned on the CPU.

    Returns
    -------
    ImplicitMap
    """
    values = _check_grid(values, "map")
    pixel_size = positive_number(pixel_size, "pixel_size", unit="Å")
    architecture = Architecture() if architecture is None else architecture
    settings = FitSettings() if settings is None else settings
    dimensions = values.ndim
    origin = (0.0,) * dimensions if origin is None else tuple(float(v) for v in origin)
    if len(origin) != dimensions or not all(math.isfinite(v) for v in origin):
        raise InputError("origin", f"needs {dimensions} finite values, got {origin}")
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise InputError("map", "is constant: there is nothing to represent")

    coords, targets = _training_set(values, pixel_size, settings)
    scaled = ((targets - mean) / std).astype(np.float32)[:, None]
    epochs = max(1, round(settings.steps * settings.batch_size / coords.shape[0]))
    config = TrainConfig(
        optimizer="adam", lr=settings.lr, batch_size=settings.batch_size, max_epochs=epochs,
        val_fraction=0.0, early_stopping="none", restore_best=False, schedule="cosine",
        min_lr=settings.lr * settings.final_lr_fraction, seed=settings.seed, device=device,
        checkpoint=checkpoint, progress=progress,
    )
    network = architecture.build(dimensions)
    result = train_fit(network, coords, scaled, config)
    record = {
        "settings": dataclasses.asdict(settings),
        "epochs": epochs,
        "steps": epochs * math.ceil(coords.shape[0] / settings.batch_size),
        "samples_per_epoch": int(coords.shape[0]),
        "seconds": sum(h["seconds"] for h in result.history),  # resumed runs included
        "final_train_loss": float(result.history[-1]["train_loss"]),
        # Per epoch: seconds and the mean training loss (standardised units) during it.
        "history": [[float(h["seconds"]), float(h["train_loss"])] for h in result.history],
    }
    return ImplicitMap(network, architecture, box=values.shape[0], dimensions=dimensions,
                       pixel_size=pixel_size, origin=origin, mean=mean, std=std, record=record)
