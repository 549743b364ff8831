r"""Training pairs for the RED denoiser from our own refinements (seed 002 §3.1, eqs. 18–19).

The seed refined simulated particle sets of 543 PDB structures with RELION and kept the unregularised
half maps of every iteration. We do the same with :func:`bioinverse.cryoem.refine.refine`: for each training
structure and SNR, simulate particles (CTF, white noise, random poses), refine them from the 30 Å low-passed
truth, and keep :math:`\tilde x = B / K` of each half set at every iteration (and of both halves at the end).
The target of each map is the truth coarsened to what the map knows (:func:`coarsened_truth`, eq. 19).

The seed's alternative, pairs of the truth plus Gaussian noise, is :func:`gaussian_pairs`: noise with the
power spectrum of the refinement maps' errors, damped in the solvent by the ratio measured on them.

Training structures are the single chains of MDAnalysisTests' ``data/dssp`` (80–180 residues);
:data:`TEST_STRUCTURES`, the structures of the ``cryoem_red`` benchmark, are never among them. Each
(structure, SNR) case is cached on disk as it finishes, so an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bioinverse.cryoem.denoiser import coarsened_truth
from bioinverse.errors import InputError
from bioinverse.fourier import shell_index

__all__ = ["TEST_STRUCTURES", "TRAINING_STRUCTURES", "TrainingRecipe", "build_training_set", "gaussian_pairs",
           "refinement_pairs"]

#: The structures the ``cryoem_red`` benchmark tests on: never used for training.
TEST_STRUCTURES = ("adk_open", "4E43", "1hvr", "1a28")


def _training_structures() -> tuple[str, ...]:
    from bioinverse.cryoem.structures import available_structures

    return tuple(name for name in available_structures() if name.startswith("dssp/"))


#: The single protein chains of MDAnalysisTests' data/dssp.
TRAINING_STRUCTURES = _training_structures()


@dataclass(frozen=True)
class TrainingRecipe:
    """What :func:`build_training_set` simulates and refines.

    Attributes
    ----------
    structures : tuple of str
        Names for :func:`bioinverse.cryoem.structures.fetch_structure`.
    snrs : tuple of float
        Image SNRs (per-pixel signal variance over noise variance, CTF applied), one refinement each.
    n_particles : int
    box, pixel_size : int, float
    max_iterations : int
        Of each refinement (RELION-like convergence usually stops it earlier).
    seed : int
    """

    structures: tuple[str, ...] = TRAINING_STRUCTURES
    snrs: tuple[float, ...] = (0.5, 0.1)
    n_particles: int = 500
    box: int = 64
    pixel_size: float = 1.5
    max_iterations: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        overlap = {s.lower() for s in self.structures} & {s.lower() for s in TEST_STRUCTURES}
        if overlap:
            raise InputError("structures", f"{', '.join(sorted(overlap))} are test structures of the benchmark")
        if not self.structures or not self.snrs:
            raise InputError("recipe", "needs at least one structure and one SNR")
        if min(self.snrs) <= 0 or self.n_particles < 4 or self.box % 2 or self.pixel_size <= 0:
            raise InputError("recipe", "needs positive SNRs, at least 4 particles, an even box, a positive pixel size")


def _case_seed(recipe: TrainingRecipe, structure: str, snr: float) -> int:
    text = f"{recipe.seed}/{structure}/{snr:g}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def refinement_pairs(structure: str, snr: float, recipe: TrainingRecipe = TrainingRecipe()) -> dict:
    """Simulate and refine one case; every unregularised map of the refinement with its coarsened truth.

    Returns
    -------
    dict
        ``inputs``, ``targets`` (m, N, N, N) float16; ``resolution_A``, ``iteration``, ``half`` (m,);
        ``truth`` (N, N, N) float32; ``structure``, ``snr``.
    """
    from bioinverse.cryoem.density import atoms_to_map, particle_diameter
    from bioinverse.cryoem.io import read_atoms
    from bioinverse.cryoem.refine import RefineConfig, refine
    from bioinverse.cryoem.simulate import simulate_particles
    from bioinverse.cryoem.structures import fetch_structure

    atoms = read_atoms(fetch_structure(structure))
    box, apix = recipe.box, recipe.pixel_size
    seed = _case_seed(recipe, structure, snr)
    sim = simulate_particles(atoms_to_map(atoms, box, apix), apix, recipe.n_particles, snr, seed=seed)
    config = RefineConfig(particle_diameter=particle_diameter(atoms, 0.9 * box * apix),
                          max_iterations=recipe.max_iterations, seed=seed)
    records: list[dict] = []
    refine(sim.images, apix, sim.particles.ctf_parameters()._asdict(), sim.reference, config,
           observer=records.append)
    inputs = np.stack([r["map"] for r in records]).astype(np.float32)
    targets = np.stack([coarsened_truth(sim.ground_truth, x, apix) for x in inputs])
    return {"inputs": inputs.astype(np.float16), "targets": targets.astype(np.float16),
            "resolution_A": np.array([r["resolution_A"] for r in records]),
            "iteration": np.array([r.get("iteration", -1) for r in records]),
            "half": np.array([r["half"] for r in records]), "truth": sim.ground_truth,
            "structure": structure, "snr": snr}


def _case_file(cache: Path, recipe: TrainingRecipe, structure: str, snr: float) -> Path:
    settings = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("structures", "snrs")}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return cache / f"{structure.replace('/', '_')}_snr{snr:g}_{tag}.npz"


def build_training_set(recipe: TrainingRecipe, cache: str | Path, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> dict:
    """All cases of ``recipe``, each refined once and cached in ``cache`` (an interrupted build resumes).

    Returns the concatenated ``inputs``, ``targets`` (float16), ``resolution_A`` and ``case`` (index into
    ``cases`` and ``truths``) of every map, the ``cases`` (structure, SNR) and their ground ``truths``.
    """
    from bioinverse._progress import progress_bar
    from bioinverse.io import atomic_path

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    cases = [(s, snr) for s in recipe.structures for snr in recipe.snrs]
    parts = []
    with progress_bar(progress) as bar:
        task = bar.add_task("refinements", total=len(cases))
        for structure, snr in cases:
            path = _case_file(cache, recipe, structure, snr)
            if not path.exists():
                pairs = refinement_pairs(structure, snr, recipe)
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **{k: np.asarray(v) for k, v in pairs.items()})
                if log is not None:
                    log(f"{structure} at SNR {snr:g}: {len(pairs['inputs'])} maps, final "
                        f"{pairs['resolution_A'][-1]:.1f} Å")
            with np.load(path) as data:
                parts.append({k: data[k] for k in ("inputs", "targets", "resolution_A", "truth")})
            bar.advance(task)
    return {"inputs": np.concatenate([p["inputs"] for p in parts]),
            "targets": np.concatenate([p["targets"] for p in parts]),
            "resolution_A": np.concatenate([p["resolution_A"] for p in parts]),
            "case": np.concatenate([np.full(len(p["inputs"]), i) for i, p in enumerate(parts)]),
            "truths": np.stack([p["truth"] for p in parts]), "cases": cases}


def gaussian_pairs(inputs: np.ndarray, truths: np.ndarray, mask: np.ndarray, pixel_size: float,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r"""The seed's Gaussian-noise training pairs, one per refinement map: truth + shaped noise.

    For each map :math:`\tilde x` of truth :math:`x`, the error :math:`\tilde x - x` gives the noise power per
    Fourier shell and the ratio of its standard deviation outside and inside ``mask``. The new input is
    :math:`x + n`, with :math:`n` white Gaussian noise coloured to that spectrum and multiplied by
    :math:`m + r (1 - m)`, and rescaled so that its power matches; the target is the coarsened truth.

    Parameters
    ----------
    inputs : ndarray, shape (n, N, N, N)
        Refinement maps.
    truths : ndarray, shape (n, N, N, N) or (N, N, N)
        Their ground truths.
    mask : ndarray, shape (N, N, N)
        Soft solvent mask (1 in the particle).
    pixel_size : float
    seed : int
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    truths = np.broadcast_to(np.asarray(truths, dtype=np.float32), inputs.shape)
    n = inputs.shape[1]
    shells = shell_index((n,) * 3, centred=False)[..., : n // 2 + 1]
    counts = np.bincount(shells.ravel())
    rng = np.random.default_rng(seed)
    inside = mask > 0.5
    noisy, targets = [], []
    for x, truth in zip(inputs, truths):
        error = x - truth
        ratio = error[~inside].std() / max(error[inside].std(), 1e-30)
        power = np.bincount(shells.ravel(), weights=np.abs(np.fft.rfftn(error)).ravel() ** 2) / np.maximum(counts, 1)
        white = np.fft.rfftn(rng.standard_normal((n,) * 3))
        coloured = np.fft.irfftn(white * np.sqrt(power[shells] / n**3), s=(n,) * 3, axes=(0, 1, 2))
        damped = coloured * (mask + ratio * (1.0 - mask))
        damped *= np.sqrt((error**2).sum() / max((damped**2).sum(), 1e-30))
        noisy.append(truth + damped)
        targets.append(coarsened_truth(truth, noisy[-1], pixel_size))
    return np.stack(noisy).astype(np.float32), np.stack(targets).astype(np.float32)
