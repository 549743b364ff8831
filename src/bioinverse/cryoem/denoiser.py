r"""The learned prior of RED (seed 002 §2.3, §3.1): a 3-D U-Net that denoises intermediate cryo-EM maps.

The denoiser :math:`f` of eq. 17 maps an unregularised map :math:`\tilde x = B / K` of a refinement to an
estimate of the truth it was made from. It is trained (eqs. 18–19) to minimise
:math:`\sum_i \|\hat x_i - f(\tilde x_i)\|^2`, where :math:`\hat x_i` is the ground truth *coarsened* to
what :math:`\tilde x_i` can know: its Fourier transform multiplied, shell by shell, by the Fourier shell
correlation between :math:`\tilde x_i` and the truth (:func:`coarsened_truth`). The minimiser is the
conditional mean :math:`E[\hat x \mid \tilde x]`, the MMSE denoiser that Appendix A relates to the prior's
score.

Network (:class:`bioinverse.nn.UNet3d`): 2 × (BatchNorm + ReLU + 3³ convolution) per level, 4 channels at
the top level doubling at every level, residual output, in real space. The source used 96-pixel boxes and
five down-sampling stages; for the 64-pixel box at 1.5 Å/pixel that we ship, 5 levels (4 poolings,
64 → 4 voxels at the coarsest level, where one voxel spans 24 Å) keep the coarsest level's receptive field
over the whole particle. Max pooling and trilinear up-sampling replace the source's average pooling and
transposed convolutions. The input is standardised (its mean subtracted, divided by its standard
deviation) and the output de-standardised with the same two numbers, as in the source, so one network
serves maps on any grey scale.

Training pairs come from our own refinements (:mod:`bioinverse.cryoem.denoiser_data`); training
augments them with the 48 rotations and reflections of the cube that keep the box centre in place and,
for speed, may train on random crops of the maps (:class:`CubeAugment`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from bioinverse.errors import InputError
from bioinverse.fourier import fsc, shell_index
from bioinverse.io import atomic_path, read_model_file
from bioinverse.nn import UNet3d
from bioinverse.train import TrainConfig, TrainResult, fit

__all__ = ["DEFAULT_DENOISER", "CubeAugment", "DenoiserArchitecture", "MapDenoiser", "coarsened_truth", "cube_symmetry",
           "load_denoiser", "random_cube_symmetries", "single_pass_ratio", "standardise", "train_denoiser"]

_FORMAT = "bioinverse.cryoem.denoiser/1"

#: The shipped denoiser (box 64, 1.5 Å/pixel), a file of the package.
DEFAULT_DENOISER = "denoiser_box64_1.5A.pt"


@dataclass(frozen=True)
class DenoiserArchitecture:
    """Shape of the U-Net: ``levels`` resolution levels, ``base_channels`` at the top, doubling below."""

    levels: int = 5
    base_channels: int = 4
    convs_per_level: int = 2

    def check_crop(self, crop: int | None, box: int, name: str = "crop") -> None:
        """InputError unless ``crop`` is None or a box the network takes: in (0, box], a multiple of 2**(levels − 1)."""
        multiple = 2 ** (self.levels - 1)
        if crop is not None and (not 0 < crop <= box or crop % multiple):
            raise InputError(name, f"must be a multiple of {multiple} up to the box ({box}), got {crop}")

    def build(self) -> UNet3d:
        return UNet3d(levels=self.levels, base_channels=self.base_channels,
                      convs_per_level=self.convs_per_level, residual=True)


def standardise(volumes: np.ndarray | torch.Tensor) -> tuple:
    """Each map minus its mean, over its standard deviation; returns (standardised, mean, std) per map.

    A constant map has std 0; it is left at 0 with std 1 so that de-standardising restores it.
    """
    x = torch.as_tensor(volumes, dtype=torch.float32)
    dims = tuple(range(-3, 0))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean, std


class MapDenoiser:
    """A trained denoiser for maps of one box and sampling.

    Parameters
    ----------
    network : UNet3d
    architecture : DenoiserArchitecture
    box : int
        Side of the maps it was trained on (a multiple of 2**(levels − 1)).
    pixel_size : float
        Å per pixel of those maps.
    record : dict, optional
        How it was trained (data, settings, time, losses), kept in the file.
    """

    def __init__(self, network: UNet3d, architecture: DenoiserArchitecture, box: int, pixel_size: float,
                 record: dict | None = None):
        self.network = network.eval()
        self.architecture = architecture
        self.box = int(box)
        self.pixel_size = float(pixel_size)
        self.record = dict(record or {})

    def __repr__(self) -> str:
        return (f"MapDenoiser(box={self.box}, pixel_size={self.pixel_size:g}, levels={self.architecture.levels}, "
                f"base_channels={self.architecture.base_channels})")

    def check_map(self, volume: np.ndarray, pixel_size: float | None = None, name: str = "map") -> np.ndarray:
        """The map as float32 if this denoiser was made for its box (and sampling, when given)."""
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != (self.box,) * 3:
            raise InputError(name, f"has shape {volume.shape}; the denoiser was trained on {self.box}³ maps")
        if not np.isfinite(volume).all():
            raise InputError(name, "contains NaN or Inf")
        if pixel_size is not None and abs(pixel_size - self.pixel_size) > 1e-3 * self.pixel_size:
            raise InputError(name, f"has {pixel_size:g} Å/pixel; the denoiser was trained at {self.pixel_size:g} Å")
        return volume

    @torch.no_grad()
    def __call__(self, volume: np.ndarray, pixel_size: float | None = None) -> np.ndarray:
        """f(x̃): the denoised map, on the input's grey scale."""
        volume = self.check_map(volume, pixel_size)
        x, mean, std = standardise(volume[None, None])
        device = next(self.network.parameters()).device
        y = self.network(x.to(device)).cpu()
        return (y * std + mean)[0, 0].numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the denoiser atomically (a ``torch.load(weights_only=True)`` file)."""
        payload = {"format": _FORMAT, "architecture": dataclasses.asdict(self.architecture), "box": self.box,
                   "pixel_size": self.pixel_size, "record": self.record,
                   "state_dict": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}}
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    def digest(self) -> str:
        """A short hash of the weights: refinements with different denoisers do not resume each other."""
        import hashlib

        h = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def load_denoiser(path: str | os.PathLike | None = None) -> MapDenoiser:
    """Read a denoiser written by :meth:`MapDenoiser.save`; the shipped one when ``path`` is None."""
    if path is None:
        path = resources.files("bioinverse.cryoem") / "data" / DEFAULT_DENOISER
        if not path.is_file():
            raise InputError(str(path), "the shipped denoiser is missing from this installation")
    path = Path(str(path))
    payload = read_model_file(path, _FORMAT, "a map denoiser")
    try:
        architecture = DenoiserArchitecture(**payload["architecture"])
        network = architecture.build()
        network.load_state_dict(payload["state_dict"])
        denoiser = MapDenoiser(network, architecture, box=payload["box"], pixel_size=payload["pixel_size"],
                               record=payload["record"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"is an incomplete or inconsistent denoiser file ({exc})") from None
    if not (denoiser.pixel_size > 0 and denoiser.box % 2 ** (architecture.levels - 1) == 0):
        raise InputError(path, "has an invalid geometry")
    return denoiser


# --------------------------------------------------------------------------------------------------
# Training data and augmentation


def coarsened_truth(truth: np.ndarray, estimate: np.ndarray, pixel_size: float) -> np.ndarray:
    r"""Eqs. 18–19's target: the truth low-passed to what ``estimate`` knows of it.

    .. math:: \hat x = \mathcal F^{-1}\big[\max(0, \mathrm{FSC}(\tilde x, x)(s))\ \mathcal F[x]\big]

    with the FSC between the estimate and the truth taken per Fourier shell :math:`s` (the corners of the box,
    beyond Nyquist, take the last shell's).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    >>> bool(np.allclose(coarsened_truth(x, x, 1.0), x, atol=1e-5))  # a perfect estimate keeps it all
    True
    """
    truth = np.asarray(truth, dtype=np.float32)
    estimate = np.asarray(estimate, dtype=np.float32)
    weights = np.clip(fsc(estimate, truth, pixel_size).values, 0.0, 1.0)
    n = truth.shape[0]
    shells = shell_index(truth.shape, centred=False)[..., : n // 2 + 1]
    profile = weights[np.minimum(shells, len(weights) - 1)]  # the corners beyond Nyquist as the last shell
    return np.fft.irfftn(np.fft.rfftn(truth) * profile, s=truth.shape, axes=(0, 1, 2)).astype(np.float32)


def cube_symmetry(volumes: torch.Tensor, index: int) -> torch.Tensor:
    """One of the 48 rotations and reflections of the cube, applied to the last three axes.

    ``index // 8`` picks the axis permutation, ``index % 8`` the reflections. A reflection maps voxel i to
    (N − i) mod N, which keeps the box centre N // 2 in place (a plain flip would move it by one voxel).
    """
    if not 0 <= index < 48:
        raise ValueError(f"index must be in [0, 48), got {index}")
    permutations = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    lead = volumes.ndim - 3
    perm = permutations[index // 8]
    out = volumes.permute(*range(lead), *(lead + p for p in perm))
    for axis in range(3):
        if (index % 8) >> axis & 1:
            out = torch.roll(torch.flip(out, dims=(lead + axis,)), shifts=1, dims=lead + axis)
    return out


def random_cube_symmetries(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """The same random cube symmetry on each input map and its target (an ``augment`` of :func:`fit`)."""
    choice = torch.randint(48, (x.shape[0],), generator=generator).tolist()
    return (torch.stack([cube_symmetry(a, c) for a, c in zip(x, choice)]),
            torch.stack([cube_symmetry(b, c) for b, c in zip(y, choice)]))


@dataclass(frozen=True)
class CubeAugment:
    """The training augmentation (an ``augment`` of :func:`fit`): a random cube symmetry, then a random crop.

    Each input map and its target get the same symmetry and, when ``crop`` is set, the same random
    ``crop``³ sub-box. A step on 48³ crops of 64³ maps costs about 2.5 times less than one on the whole
    maps; the network is fully convolutional, so it still denoises whole boxes.
    """

    crop: int | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        x, y = random_cube_symmetries(x, y, generator)
        n = x.shape[-1]
        if self.crop is None or self.crop >= n:
            return x, y
        corners = torch.randint(n - self.crop + 1, (x.shape[0], 3), generator=generator).tolist()
        boxes = [tuple(slice(c, c + self.crop) for c in corner) for corner in corners]
        return (torch.stack([a[(..., *box)] for a, box in zip(x, boxes)]),
                torch.stack([b[(..., *box)] for b, box in zip(y, boxes)]))


def train_denoiser(inputs: np.ndarray, targets: np.ndarray, pixel_size: float,
                   architecture: DenoiserArchitecture = DenoiserArchitecture(),
                   config: TrainConfig | None = None, augment: bool = True, crop: int | None = None,
                   record: dict | None = None, groups: np.ndarray | None = None) -> tuple[MapDenoiser, TrainResult]:
    """Train a denoiser on pairs (unregularised map, coarsened truth) through the shared trainer.

    Each pair is standardised with its input's mean and standard deviation (the network's output is
    de-standardised with them), so the loss is the mean squared error in units of the input's spread.

    Parameters
    ----------
    inputs, targets : ndarray, shape (n, N, N, N)
    pixel_size : float
        Å per pixel, recorded with the denoiser.
    architecture : DenoiserArchitecture
    config : TrainConfig, optional
        Defaults to 15 epochs of Adam at 1e-3 with a cosine decay, minibatches of 8, 10 % held out.
    augment : bool
        Random cube symmetries on every training minibatch.
    crop : int, optional
        Train on random ``crop``³ sub-boxes of the pairs (a multiple of ``2**(levels - 1)``); validation
        still uses whole maps.
    record : dict, optional
        Extra facts saved with the denoiser (where the data came from).
    groups : ndarray of int, shape (n,), optional
        The refinement each pair comes from. Maps of one refinement are alike, so validation then holds
        out whole refinements (``config.val_fraction`` of them, drawn with ``config.seed``) instead of
        random maps, which would flatter the validation loss.
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    if inputs.ndim != 4 or inputs.shape != targets.shape or len(set(inputs.shape[1:])) != 1:
        raise InputError("training pairs", f"need (n, N, N, N) inputs and targets of one shape, got "
                                           f"{inputs.shape} and {targets.shape}")
    box = inputs.shape[1]
    if box % 2 ** (architecture.levels - 1):
        raise InputError("training pairs", f"box {box} is not divisible by 2**{architecture.levels - 1}")
    architecture.check_crop(crop, box)
    if not (np.isfinite(inputs).all() and np.isfinite(targets).all()):
        raise InputError("training pairs", "contain NaN or Inf")
    config = config or TrainConfig(optimizer="adam", lr=1e-3, batch_size=8, max_epochs=15, schedule="cosine",
                                   early_stopping="none", val_fraction=0.1)
    x, mean, std = standardise(inputs)
    y = (torch.as_tensor(targets) - mean) / std
    x, y = x[:, None], y[:, None]
    validation = {}
    if groups is not None and config.val_fraction > 0:
        groups = np.asarray(groups)
        if groups.shape != (len(inputs),):
            raise InputError("groups", f"needs one group per pair ({len(inputs)}), got shape {groups.shape}")
        names = np.unique(groups)
        if len(names) < 2:
            raise InputError("groups", "needs at least two refinements to hold one out for validation")
        n_val = max(1, round(config.val_fraction * len(names)))
        held = np.random.default_rng(config.seed).choice(names, size=min(n_val, len(names) - 1), replace=False)
        val = torch.as_tensor(np.isin(groups, held))
        validation = {"X_val": x[val], "y_val": y[val]}
        x, y = x[~val], y[~val]
    torch.manual_seed(config.seed)
    network = architecture.build()
    if augment:
        augmentation = CubeAugment(crop)
    elif crop is not None:
        raise InputError("crop", "needs augment=True (crops are drawn by the augmentation)")
    else:
        augmentation = None
    result = fit(network, x, y, config, augment=augmentation, **validation)
    network = network.cpu().eval()
    summary = {"n_pairs": len(inputs), "n_validation": len(validation["X_val"]) if validation else None,
               "epochs": result.epochs_run, "best_epoch": result.best_epoch,
               "best_val_loss": result.best_val_loss,
               "train_seconds": float(sum(h["seconds"] for h in result.history)),
               "config": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                          for k, v in dataclasses.asdict(config).items()},
               "augment": augment, "crop": crop, **(record or {})}
    return MapDenoiser(network, architecture, box, pixel_size, summary), result


def single_pass_ratio(denoiser: MapDenoiser, inputs: np.ndarray, truths: np.ndarray, p: int = 2) -> np.ndarray:
    r"""The seed's Fig. 1c measure: :math:`\|f(\tilde x) - x\|_p / \|\tilde x - x\|_p` per map (< 1: it helps).

    Parameters
    ----------
    denoiser : MapDenoiser
    inputs, truths : ndarray, shape (n, N, N, N)
        Unregularised maps and their ground truths.
    p : {1, 2}
    """
    if p not in (1, 2):
        raise InputError("p", f"must be 1 or 2, got {p}")
    ratios = []
    for x, truth in zip(np.asarray(inputs, np.float32), np.asarray(truths, np.float32)):
        before = np.linalg.norm((x - truth).ravel(), ord=p)
        after = np.linalg.norm((denoiser(x) - truth).ravel(), ord=p)
        ratios.append(after / before if before > 0 else np.nan)
    return np.asarray(ratios)
