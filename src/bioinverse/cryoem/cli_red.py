"""``bioinverse cryoem relion-external`` and ``bioinverse cryoem train-denoiser``: the learned prior (RED).

- ``relion-external STAR``: the executable of RELION 3.1's ``--external_reconstruct``
  (:mod:`bioinverse.cryoem.relion_external`); name it, with its options, in
  ``RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE`` and RELION appends the STAR file::

      export RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE="bioinverse cryoem relion-external --prior cwred"
      mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves … --external_reconstruct

- ``train-denoiser --out denoiser.pt``: the whole recipe of the shipped denoiser: simulate and refine the
  training structures (cached per case under ``--work``), collect the unregularised maps with their
  coarsened truths, and train the U-Net (resumable from ``--work/train.ckpt``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def prior_from_options(kind: str, strength: float, cw_low: float, cw_high: float):
    from bioinverse.cryoem.priors import Prior

    return Prior(kind=kind, strength=strength, low_resolution=cw_low, high_resolution=cw_high)


PriorOption = Annotated[str, typer.Option("--prior", help="gaussian (RELION's), red (eq. 17 with a fixed λ) or "
                                                          "cwred (λ from the nominal resolution).")]
DenoiserOption = Annotated[Path | None, typer.Option("--denoiser", help="Denoiser file (train-denoiser); the "
                                                                          "shipped one (box 64, 1.5 Å) by default.")]
StrengthOption = Annotated[float, typer.Option("--lambda", help="λ of RED; CW-RED's largest λ.")]
LowOption = Annotated[float, typer.Option("--cw-low", help="CW-RED: λ = 0 at this nominal resolution (Å) and "
                                                          "worse.")]
HighOption = Annotated[float, typer.Option("--cw-high", help="CW-RED: λ = 1 at this nominal resolution (Å) and "
                                                            "better.")]


def relion_external_command(
    star: Annotated[Path, typer.Argument(metavar="STAR", help="The *_external_reconstruct.star file RELION "
                                                              "passes.")],
    prior: PriorOption = "cwred",
    denoiser: DenoiserOption = None,
    strength: StrengthOption = 1.0,
    cw_low: LowOption = 10.0,
    cw_high: HighOption = 4.5,
    apix: Annotated[float | None, typer.Option("--apix", help="Pixel size in Å (for the nominal resolution); "
                                                              "the denoiser's by default.")] = None,
) -> None:
    """Reconstruct one RELION M-step with a Gaussian, RED or CW-RED prior; writes the map RELION waits for."""
    from bioinverse.cryoem.denoiser import load_denoiser
    from bioinverse.cryoem.relion_external import run_external

    chosen = prior_from_options(prior, strength, cw_low, cw_high)
    model = load_denoiser(denoiser) if chosen.needs_denoiser else None
    info = run_external(star, chosen, model, apix)
    # One write of the whole line: RELION runs this for both halves at once, into the same log.
    sys.stderr.write(f"bioinverse relion-external: {info['prior']} λ={info['weight']:.2f} at "
                     f"{info['resolution_A']:.2f} Å → {info['result']}\n")


def train_denoiser_command(
    out: Annotated[Path, typer.Option("--out", help="Denoiser file to write (.pt).")],
    work: Annotated[Path, typer.Option("--work", help="Folder for the cached refinements and the training "
                                                      "checkpoint.")],
    structures: Annotated[int, typer.Option("--structures", help="How many of the 50 data/dssp chains of "
                                                                 "MDAnalysisTests to use (in name order).")] = 20,
    snrs: Annotated[str, typer.Option("--snrs", help="Comma-separated image SNRs, one refinement each.")] = "0.5,0.1",
    particles: Annotated[int, typer.Option("--particles", help="Particles per refinement.")] = 500,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (cosine learning-rate decay).")] = 15,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Maps per minibatch.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Adam's initial learning rate.")] = 1e-3,
    crop: Annotated[int, typer.Option("--crop", help="Train on random crops of this size (0: whole maps); "
                                                     "a multiple of 16.")] = 48,
    noise: Annotated[str, typer.Option("--noise", help="refinement (the maps of the refinements) or gaussian "
                                                       "(truth + noise of their spectrum, the seed's "
                                                       "alternative).")] = "refinement",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the simulations and of training.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda, ….")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")] = True,
) -> None:
    """Build the training set from our own refinements and train the RED denoiser (the shipped one's recipe)."""
    import time

    import numpy as np

    from bioinverse.cryoem.denoiser import DenoiserArchitecture, train_denoiser
    from bioinverse.cryoem.denoiser_data import (
        TRAINING_STRUCTURES,
        TrainingRecipe,
        build_training_set,
        gaussian_pairs,
    )
    from bioinverse.errors import InputError
    from bioinverse.train import TrainConfig

    try:
        snr_values = tuple(float(s) for s in snrs.split(","))
    except ValueError:
        raise InputError("--snrs", f"needs comma-separated numbers, got {snrs!r}") from None
    if not 1 <= structures <= len(TRAINING_STRUCTURES):
        raise InputError("--structures", f"must be 1 … {len(TRAINING_STRUCTURES)}, got {structures}")
    if noise not in ("refinement", "gaussian"):
        raise InputError("--noise", f"must be refinement or gaussian, got {noise!r}")
    recipe = TrainingRecipe(structures=TRAINING_STRUCTURES[:structures], snrs=snr_values, n_particles=particles,
                            seed=seed)
    DenoiserArchitecture().check_crop(crop or None, recipe.box, "--crop")  # before hours of refinements
    work = Path(work)
    start = time.perf_counter()
    data = build_training_set(recipe, work / "refinements", progress=progress, log=typer.echo)
    data_seconds = time.perf_counter() - start
    inputs, targets = data["inputs"].astype(np.float32), data["targets"].astype(np.float32)
    if noise == "gaussian":
        from bioinverse.cryoem.refine import soft_sphere_mask

        mask = soft_sphere_mask(recipe.box, 0.4 * recipe.box, 3.0)
        inputs, targets = gaussian_pairs(inputs, data["truths"][data["case"]], mask, recipe.pixel_size, seed=seed)
    typer.echo(f"{len(inputs)} training maps from {len(data['cases'])} refinements ({data_seconds:.0f} s)")
    config = TrainConfig(optimizer="adam", lr=lr, batch_size=batch_size, max_epochs=epochs, schedule="cosine",
                         min_lr=0.01 * lr, early_stopping="none", val_fraction=0.1, seed=seed, device=device,
                         checkpoint=work / "train.ckpt", log=work / "train.json", progress=progress)
    record = {"recipe": {"structures": list(recipe.structures), "snrs": list(recipe.snrs),
                         "n_particles": recipe.n_particles, "seed": recipe.seed, "noise": noise},
              "data_seconds": data_seconds}  # this run's refinements; cached ones cost only their loading
    denoiser, result = train_denoiser(inputs, targets, recipe.pixel_size, config=config, record=record,
                                      groups=data["case"], crop=crop or None)
    denoiser.save(out)
    typer.echo(f"denoiser: {out} (validation loss {result.best_val_loss:.4f} at epoch {result.best_epoch}, "
               f"{denoiser.record['train_seconds']:.0f} s of training)")
