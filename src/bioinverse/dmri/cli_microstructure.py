"""``bioinverse dmri …`` commands of axon microstructure (Rensonnet et al., ICML IMLH 2021).

``scheme``, ``crossings``, ``peaks``, ``dictionary build``, ``fingerprint``,
``hybrid train|predict`` and ``learned train|predict``, registered on the ``dmri`` app.

Data are NIfTI images and Camino ``STEJSKALTANNER`` scheme files (one line per volume: direction,
G, Δ, δ, TE in SI units). Fibre orientations are NIfTI images of two peaks per voxel in the MRtrix
layout (X, Y, Z, 6): volumes 0–2 hold u₁, volumes 3–5 hold u₂, in the frame of the scheme's
gradient directions; their lengths are ignored. Parameter maps are one file per parameter,
``<out>/nu.nii.gz``, ``radius.nii.gz`` (µm) and ``density.nii.gz``, each (X, Y, Z, 2): volume k is
population k, the one of orientation k (for the fully learned network, which sees no orientations,
population 1 is the one with the larger ν); voxels outside the mask are 0. Every file is written
atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bioinverse.dmri.cli import app
from bioinverse.io import output_dir

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from bioinverse.dmri.crossing import CrossingSet, Microstructure
    from bioinverse.dmri.dictionary import FingerprintDictionary
    from bioinverse.dmri.io import DiffusionData
    from bioinverse.dmri.pgse import PGSEProtocol

dictionary_app = typer.Typer(help="Dictionaries of single-population fingerprints.", no_args_is_help=True)
hybrid_app = typer.Typer(help="Hybrid estimator: NNLS on the dictionary, then a split MLP.",
                         no_args_is_help=True)
learned_app = typer.Typer(help="Fully learned estimator: an MLP from the raw signal.", no_args_is_help=True)
app.add_typer(dictionary_app, name="dictionary")
app.add_typer(hybrid_app, name="hybrid")
app.add_typer(learned_app, name="learned")

_PARAMETERS = ("nu", "radius", "density")
# Peaks shorter than this are "no peak" (MRtrix writes zeros or NaN where it found none).
_MIN_PEAK_NORM = 1e-6
# Voxels per call of the hybrid's NNLS stage: paces the progress bar; the estimator batches inside.
_BLOCK = 512

SchemeOpt = Annotated[
    Path, typer.Option("--scheme", help="Camino STEJSKALTANNER scheme file, one line per volume.")
]
MaskOpt = Annotated[
    Path | None, typer.Option("--mask", help="Mask NIfTI (non-zero = inside); all voxels if omitted.")
]
PeaksOpt = Annotated[
    Path | None,
    typer.Option("--peaks", help="Fibre orientations (X,Y,Z,6: two peaks, MRtrix layout); estimated by CSD "
                                 "and written to OUT/peaks.nii.gz if omitted."),
]
DictionaryOpt = Annotated[
    Path, typer.Option("--dictionary", help="Dictionary written by `bioinverse dmri dictionary build`.")
]
OutDirOpt = Annotated[
    Path, typer.Option("--out", help="Output directory for the nu, radius and density maps.")
]
SamplesOpt = Annotated[
    int, typer.Option("--samples", help="Simulated training voxels, split evenly over the SNR levels.")
]
SnrListOpt = Annotated[
    str, typer.Option("--snr", help="Comma-separated SNR levels of the training voxels ('inf': noise-free).")
]
EpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", help="Upper bound on training epochs (early stopping may end sooner)."),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of the simulated voxels, initialisation and data order.")
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Training checkpoint; an interrupted run resumes from it.")
]


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def _read_protocol(scheme: Path) -> PGSEProtocol:
    from bioinverse.dmri.pgse import read_scheme

    return read_scheme(scheme)


def _shape_text(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def _read_series(dwi: Path, scheme: Path, mask: Path | None) -> tuple[PGSEProtocol, DiffusionData]:
    """The scheme and the diffusion series, validated against each other and against the mask.

    Every voxel inside the mask must have a positive mean signal without diffusion weighting: all
    estimators divide by it.
    """
    import numpy as np

    from bioinverse.dmri.io import DiffusionData, read_mask, read_nifti
    from bioinverse.errors import InputError

    protocol = _read_protocol(scheme)
    if not protocol.b0s_mask.any():
        raise InputError(scheme, "has no measurement without diffusion weighting (G = 0) to normalise by")
    dwi = Path(dwi)
    data, affine = read_nifti(dwi)
    if data.ndim != 4:
        raise InputError(dwi, f"has shape {_shape_text(data.shape)}; a diffusion series must be 4D "
                              "(X, Y, Z, volumes)")
    if data.shape[3] != len(protocol):
        raise InputError(dwi, f"has {data.shape[3]} volumes but {Path(scheme).name} has {len(protocol)} "
                              "measurements")
    bad = ~np.isfinite(data)
    if bad.any():
        where = [int(i) for i in np.unravel_index(int(np.argmax(bad)), data.shape)]
        raise InputError(dwi, f"contains NaN or Inf (first at voxel {tuple(where[:3])}, volume {where[3]})")
    inside = np.ones(data.shape[:3], dtype=bool) if mask is None else read_mask(mask, shape=data.shape[:3])
    b0 = data[inside][:, protocol.b0s_mask].mean(axis=1)
    if not (b0 > 0).all():
        voxel = tuple(int(i) for i in np.argwhere(inside)[int(np.argmin(b0 > 0))])
        raise InputError(dwi, f"voxel {voxel} has a mean b=0 signal ≤ 0; leave it out with --mask")
    return protocol, DiffusionData(data, protocol.gradient_table(), affine, inside)


def _read_peaks(path: Path, series: DiffusionData) -> np.ndarray:
    """Unit orientations (V, 2, 3) of the mask voxels from an MRtrix-layout peaks image.

    Peak lengths are ignored (MRtrix scales them by the fODF amplitude); a missing peak (zero or
    NaN) inside the mask is an error, since both populations need an orientation.
    """
    import numpy as np

    from bioinverse.dmri.io import read_nifti
    from bioinverse.errors import InputError

    path = Path(path)
    values, affine = read_nifti(path)
    grid = series.mask.shape
    if values.shape != (*grid, 6):
        raise InputError(path, f"has shape {_shape_text(values.shape)}; expected {_shape_text((*grid, 6))} "
                               "(two peaks of 3 volumes each on the DWI grid)")
    if not np.allclose(affine, series.affine, atol=1e-3):
        raise InputError(path, "has another voxel-to-world affine than the diffusion series")
    peaks = values[series.mask].reshape(-1, 2, 3).astype(np.float64)
    with np.errstate(invalid="ignore"):
        norms = np.linalg.norm(peaks, axis=2)
        missing = ~(norms > _MIN_PEAK_NORM) | ~np.isfinite(norms)
    if missing.any():
        v, k = (int(i) for i in np.argwhere(missing)[0])
        voxel = tuple(int(i) for i in np.argwhere(series.mask)[v])
        raise InputError(path, f"peak {k + 1} of voxel {voxel} is zero or NaN; every voxel in the mask needs "
                               "two orientations")
    return peaks / norms[..., None]


def _write_image(path: Path, data, affine) -> Path:
    """Atomic float32 NIfTI of a 4D array (the DWI writer takes any last dimension)."""
    from bioinverse.dmri.io import write_dwi

    return write_dwi(path, data, affine)


def _write_parameter_maps(out: Path, series: DiffusionData, estimate: Microstructure) -> None:
    out = output_dir(out)
    for name in _PARAMETERS:
        path = _write_image(out / f"{name}.nii.gz", series.unmask(getattr(estimate, name)), series.affine)
        typer.echo(f"wrote {path}")


def _orientations(peaks: Path | None, series: DiffusionData, protocol: PGSEProtocol, out: Path) -> np.ndarray:
    """Orientations (V, 2, 3) of the mask voxels: read from ``peaks``, or estimated by CSD and
    written to ``out/peaks.nii.gz`` (population k of the maps is the one of peak k)."""
    if peaks is not None:
        return _read_peaks(peaks, series)
    from bioinverse.dmri.crossing import estimate_orientations

    signals = series.voxels()
    typer.echo(f"estimating two fibre orientations per voxel by CSD ({len(signals)} voxels)", err=True)
    orientations = estimate_orientations(signals, protocol)
    path = _write_image(output_dir(out) / "peaks.nii.gz", series.unmask(orientations.reshape(-1, 6)),
                        series.affine)
    typer.echo(f"wrote {path}")
    return orientations


def _blockwise(description: str, n_voxels: int, compute) -> np.ndarray:
    """``compute(start, stop)`` (an array per block of voxels) under a progress bar, concatenated."""
    import numpy as np

    from bioinverse._progress import progress_bar

    parts = []
    with progress_bar(True) as bar:
        task = bar.add_task(description, total=n_voxels)
        for start in range(0, n_voxels, _BLOCK):
            stop = min(start + _BLOCK, n_voxels)
            parts.append(compute(start, stop))
            bar.update(task, completed=stop)
    return np.concatenate(parts)


def _read_dictionary(path: Path, protocol: PGSEProtocol, scheme: Path) -> FingerprintDictionary:
    """The dictionary of ``path`` restricted to the shells of ``protocol`` (a missing shell names
    both files)."""
    from bioinverse.dmri.dictionary import FingerprintDictionary
    from bioinverse.errors import InputError

    dictionary = FingerprintDictionary.load(path)
    try:
        return dictionary.for_protocol(protocol)
    except InputError as exc:
        raise InputError(path, f"does not cover {Path(scheme).name}: {exc.problem}") from None


def _parse_ints(text: str, option: str, count: int | None = None) -> tuple[int, ...]:
    from bioinverse.errors import InputError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(option, f"must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values) or (count is not None and len(values) != count):
        what = f"{count} positive integers" if count is not None else "positive integers"
        raise InputError(option, f"must be {what}, got {text!r}")
    return values


def _parse_snrs(text: str) -> list[float | None]:
    """SNR levels; ``None`` for noise-free (``inf``)."""
    import math

    from bioinverse.errors import InputError

    levels: list[float | None] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise InputError("--snr", f"must be comma-separated positive numbers (or inf), "
                                      f"got {text!r}") from None
        if not value > 0:
            raise InputError("--snr", f"must be positive (or inf for noise-free), got {item!r}")
        levels.append(None if math.isinf(value) else value)
    return levels


def _positive(value: int, option: str) -> int:
    from bioinverse.errors import InputError

    if value < 1:
        raise InputError(option, f"must be a positive integer, got {value}")
    return value


def _check_seed(seed: int) -> int:
    from bioinverse.errors import InputError

    if seed < 0:
        raise InputError("--seed", f"must be a non-negative integer, got {seed}")
    return seed


def _training_set(protocol: PGSEProtocol, samples: int, snr: str, seed: int, **ranges) -> CrossingSet:
    """Simulated crossings: ``samples`` voxels split evenly over the SNR levels, one seed per level."""
    from bioinverse.dmri.crossing import simulate_training_set
    from bioinverse.errors import InputError

    levels = _parse_snrs(snr)
    if samples < 2 * len(levels):
        raise InputError("--samples", f"must be at least 2 per SNR level ({2 * len(levels)}), got {samples}")
    return simulate_training_set(protocol, samples, levels, seed, **ranges)


def _report_training(estimator, seconds: float) -> None:
    result = estimator.train_result_
    typer.echo(f"trained {result.epochs_run} epochs in {seconds:.1f} s (best {result.best_epoch}, "
               f"validation loss {result.best_val_loss:.4g})")


# --------------------------------------------------------------------------------------------
# scheme, crossings, peaks
# --------------------------------------------------------------------------------------------


@app.command()
def scheme(
    file: Annotated[
        Path | None, typer.Argument(metavar="FILE", help="Camino STEJSKALTANNER scheme file to validate.")
    ] = None,
    hcp_mgh: Annotated[
        Path | None,
        typer.Option("--hcp-mgh", help="Write the 552-measurement HCP MGH-USC protocol to this file."),
    ] = None,
) -> None:
    """Validate a Camino scheme file and print its shells, or write the HCP MGH-USC protocol."""
    import numpy as np

    from bioinverse.dmri.pgse import hcp_mgh_protocol, write_scheme
    from bioinverse.errors import InputError

    if (file is None) == (hcp_mgh is None):
        raise InputError("FILE/--hcp-mgh", "give a scheme file to check, or --hcp-mgh OUT to write one "
                                           "(not both)")
    if hcp_mgh is not None:
        protocol = hcp_mgh_protocol()
        write_scheme(hcp_mgh, protocol)
        typer.echo(f"wrote {hcp_mgh} ({len(protocol)} measurements)")
    else:
        protocol = _read_protocol(file)
        typer.echo(f"{file}: {len(protocol)} measurements")
    shells, shell_of = protocol.shell_table()
    counts = np.bincount(shell_of, minlength=len(shells))
    first = [int(np.argmax(shell_of == s)) for s in range(len(shells))]
    typer.echo(f"  {'b (s/mm²)':>10} {'G (mT/m)':>9} {'δ (ms)':>7} {'Δ (ms)':>7} {'count':>6}")
    for (G, small, big), i, n in zip(shells, first, counts):
        typer.echo(f"  {protocol.bvals[i]:10.1f} {G:9.2f} {small:7.2f} {big:7.2f} {int(n):6d}")
    te = protocol.echo_time
    typer.echo(f"  TE {te.min():g} ms" if te.min() == te.max() else f"  TE {te.min():g}–{te.max():g} ms")


@app.command()
def crossings(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory.")],
    scheme: SchemeOpt,
    voxels: Annotated[
        int | None,
        typer.Option("--voxels", help="Number of voxels N (default 1000, or the product of --shape)."),
    ] = None,
    snr: Annotated[
        float,
        typer.Option("--snr", help="SNR of the b=0 signal: Rician noise σ = 1/SNR ('inf': noise-free)."),
    ] = 50.0,
    seed: SeedOpt = 0,
    shape: Annotated[
        str | None,
        typer.Option("--shape", help="Image grid X,Y,Z (product N) instead of a line of N voxels."),
    ] = None,
) -> None:
    """Simulate voxels of two crossing axon populations: DWI, scheme, true peaks and truth maps."""
    import math

    import numpy as np

    from bioinverse.dmri.crossing import simulate_crossings
    from bioinverse.errors import InputError
    from bioinverse.io import write_bytes

    protocol = _read_protocol(scheme)
    if shape is not None:
        grid = _parse_ints(shape, "--shape", count=3)
        if voxels is not None and voxels != math.prod(grid):
            raise InputError("--voxels", f"is {voxels} but --shape {shape} holds {math.prod(grid)} voxels")
    else:
        grid = (_positive(1000 if voxels is None else voxels, "--voxels"), 1, 1)
    if not snr > 0:
        raise InputError("--snr", f"must be positive (or inf for noise-free), got {snr:g}")
    data = simulate_crossings(protocol, math.prod(grid), None if math.isinf(snr) else snr,
                              seed=_check_seed(seed))
    out = output_dir(out)
    affine = np.eye(4)

    def image(values: np.ndarray) -> np.ndarray:
        return values.reshape(*grid, values.shape[-1])

    written = [_write_image(out / "dwi.nii.gz", image(data.signals), affine),
               write_bytes(out / "protocol.scheme", Path(scheme).read_bytes()),
               _write_image(out / "peaks.nii.gz", image(data.orientations.reshape(-1, 6)), affine)]
    written += [_write_image(out / f"{name}.nii.gz", image(getattr(data.truth, name)), affine)
                for name in _PARAMETERS]
    noise = "noise-free" if math.isinf(data.snr) else f"SNR {data.snr:g}"
    typer.echo(f"{math.prod(grid)} voxels ({_shape_text(grid)}) × {len(protocol)} measurements, {noise}, "
               f"seed {seed}")
    typer.echo(f"wrote {', '.join(p.name for p in written)} in {out}")


@app.command()
def peaks(
    dwi: Annotated[Path, typer.Argument(metavar="DWI", help="4D diffusion series (NIfTI).")],
    scheme: SchemeOpt,
    out: Annotated[Path, typer.Option("--out", help="Peaks image to write (X,Y,Z,6, MRtrix layout).")],
    mask: MaskOpt = None,
    shell_bval: Annotated[
        float,
        typer.Option("--shell-bval", help="b (s/mm²) of the shell to deconvolve (the nearest is used)."),
    ] = 10000.0,
) -> None:
    """Estimate two fibre orientations per voxel by constrained spherical deconvolution (dipy)."""
    from bioinverse.dmri.crossing import estimate_orientations

    protocol, series = _read_series(dwi, scheme, mask)
    orientations = estimate_orientations(series.voxels(), protocol, shell_bval=shell_bval)
    path = _write_image(out, series.unmask(orientations.reshape(-1, 6)), series.affine)
    typer.echo(f"wrote {path} ({len(orientations)} voxels)")


# --------------------------------------------------------------------------------------------
# dictionary build
# --------------------------------------------------------------------------------------------


def _atoms_done(path: Path) -> tuple[int, int] | None:
    """(atoms done, atoms) of the build cache at ``path``; None if there is none or it cannot be read
    (the build then reports the problem)."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            done = np.asarray(npz["done"], dtype=bool)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return int(done.sum()), int(done.size)


@dictionary_app.command("build")
def dictionary_build(
    out: Annotated[
        Path, typer.Argument(metavar="OUT.npz",
                             help="Dictionary file to write (.npz); also the cache a rerun resumes from.")
    ],
    scheme: SchemeOpt,
    generator: Annotated[
        str, typer.Option("--generator", help="analytic (restricted cylinder + zeppelin) or montecarlo.")
    ] = "analytic",
    walkers: Annotated[
        int | None, typer.Option("--walkers", help="Monte Carlo: random walkers per atom.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Monte Carlo: time steps of every walk.")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Monte Carlo: base seed of the substrates and walks.")
    ] = 0,
    grid: Annotated[
        str | None,
        typer.Option("--grid", help="Atom grid NR,NF: NR radii over 0.25–2.23 µm × NF densities over "
                                    "0.10–0.76 (default 34,23: 782 atoms)."),
    ] = None,
    angles: Annotated[
        int, typer.Option("--angles", help="Angles stored per shell on [0°, 90°] (181: 0.5° steps).")
    ] = 181,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an OUT built with other settings instead of refusing it."),
    ] = False,
) -> None:
    """Build a fingerprint dictionary for the shells of a scheme (resumable: rerun to continue)."""
    import numpy as np

    from bioinverse.dmri.dictionary import GENERATORS, build_dictionary
    from bioinverse.errors import InputError

    protocol = _read_protocol(scheme)
    if generator not in GENERATORS:
        raise InputError("--generator", f"must be one of {', '.join(GENERATORS)}, got {generator!r}")
    settings = {}
    for option, name, value in (("--walkers", "n_walkers", walkers), ("--steps", "n_steps", steps)):
        if value is None:
            continue
        if generator != "montecarlo":
            raise InputError(option, "applies to the montecarlo generator only")
        settings[name] = _positive(value, option)
    radius = density = None
    if grid is not None:
        n_radii, n_densities = _parse_ints(grid, "--grid", count=2)
        radius = np.repeat(np.linspace(0.25, 2.23, n_radii), n_densities)
        density = np.tile(np.linspace(0.10, 0.76, n_densities), n_radii)
    out = Path(out)
    resumed = None if overwrite else _atoms_done(out)
    if resumed is not None and resumed[0] < resumed[1]:
        typer.echo(f"resuming from {out}: {resumed[0]} of {resumed[1]} atoms done", err=True)
    start = time.perf_counter()
    try:
        dictionary = build_dictionary(protocol, generator, radius=radius, density=density, n_angles=angles,
                                      cache=out, progress=True, seed=_check_seed(seed), overwrite=overwrite,
                                      **settings)
    except InputError as exc:
        # the library's advice names its keyword argument; here the switch is an option
        raise InputError(exc.source, exc.problem.replace("pass overwrite=True", "pass --overwrite")) from None
    except KeyboardInterrupt:
        saved = _atoms_done(out)
        what = f"{saved[0]} of {saved[1]} atoms are saved in {out}" if saved else "nothing was saved"
        typer.echo(f"interrupted: {what}; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    elapsed = time.perf_counter() - start
    summary = (f"{dictionary.n_atoms} atoms × {len(dictionary.shells)} shells × {dictionary.angles.size} "
               f"angles ({dictionary.generator})")
    if resumed is not None and resumed[0] == resumed[1]:
        typer.echo(f"{out} already holds this dictionary: {summary}")
    else:
        typer.echo(f"built {summary} in {elapsed:.1f} s")
        typer.echo(f"wrote {out}")


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


@app.command()
def fingerprint(
    dwi: Annotated[Path, typer.Argument(metavar="DWI", help="4D diffusion series (NIfTI).")],
    scheme: SchemeOpt,
    dictionary: DictionaryOpt,
    out: OutDirOpt,
    peaks: PeaksOpt = None,
    mask: MaskOpt = None,
) -> None:
    """Exhaustive dictionary fingerprinting; population k of the maps is the one of peak k."""
    from bioinverse.dmri.fingerprint import Fingerprinting

    protocol, series = _read_series(dwi, scheme, mask)
    atoms = _read_dictionary(dictionary, protocol, scheme)
    orientations = _orientations(peaks, series, protocol, out)
    estimate = Fingerprinting(atoms, protocol).fit().predict(series.voxels(), orientations, progress=True)
    _write_parameter_maps(out, series, estimate)


# --------------------------------------------------------------------------------------------
# hybrid train | predict
# --------------------------------------------------------------------------------------------


@hybrid_app.command("train")
def hybrid_train(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to write (.pt).")],
    scheme: SchemeOpt,
    dictionary: DictionaryOpt,
    samples: SamplesOpt = 400_000,
    snr: SnrListOpt = "25,50,100",
    epochs: EpochsOpt = None,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    branch_hidden: Annotated[
        str | None,
        typer.Option("--branch-hidden", help="Hidden widths of each population's branch, comma-separated "
                                             "(default 128,128,100)."),
    ] = None,
    head_hidden: Annotated[
        str | None,
        typer.Option("--head-hidden", help="Hidden widths of the merged head, comma-separated (default "
                                           "200,200,200,200,200)."),
    ] = None,
) -> None:
    """Train the hybrid estimator on simulated crossings (true orientations) at the given SNRs."""
    from bioinverse.dmri.hybrid import HybridEstimator, hybrid_train_config

    protocol = _read_protocol(scheme)
    atoms = _read_dictionary(dictionary, protocol, scheme)
    config = hybrid_train_config(**({} if epochs is None else {"max_epochs": _positive(epochs, "--epochs")}))
    architecture = {name: _parse_ints(text, option) for name, option, text in (
        ("branch_hidden", "--branch-hidden", branch_hidden), ("head_hidden", "--head-hidden", head_hidden))
        if text is not None}
    estimator = HybridEstimator(atoms, protocol, config=config, seed=_check_seed(seed), **architecture)
    # the network's targets are scaled to the dictionary's grid, so the voxels are drawn inside it
    data = _training_set(protocol, samples, snr, seed,
                         radius_range=(float(atoms.radius.min()), float(atoms.radius.max())),
                         density_range=(float(atoms.density.min()), float(atoms.density.max())))
    typer.echo(f"training on {len(data)} simulated voxels (SNR {snr}), {len(protocol)} measurements, "
               f"{atoms.n_atoms} atoms per population", err=True)
    start = time.perf_counter()
    signals, orientations, truth = data.signals, data.orientations, data.truth
    codes = _blockwise("NNLS codes", len(truth),
                       lambda a, b: estimator.sparse_codes(signals[a:b], orientations[a:b]))
    # the network reads the codes only: free the signals (1.8 GB for 4×10⁵ voxels) before training
    data = signals = orientations = None
    estimator.fit_codes(codes, truth, checkpoint=checkpoint, progress=True)
    _report_training(estimator, time.perf_counter() - start)
    estimator.save(model)
    typer.echo(f"wrote {model}")


def _same_fingerprints(a: FingerprintDictionary, b: FingerprintDictionary) -> bool:
    import numpy as np

    return all(np.array_equal(getattr(a, name), getattr(b, name))
               for name in ("radius", "density", "shells", "angles", "signals"))


@hybrid_app.command("predict")
def hybrid_predict(
    dwi: Annotated[Path, typer.Argument(metavar="DWI", help="4D diffusion series (NIfTI).")],
    scheme: SchemeOpt,
    model: Annotated[Path, typer.Option("--model", help="Model written by `bioinverse dmri hybrid train`.")],
    out: OutDirOpt,
    dictionary: Annotated[
        Path | None,
        typer.Option("--dictionary", help="Dictionary covering the scheme (default: the one saved in the "
                                          "model)."),
    ] = None,
    peaks: PeaksOpt = None,
    mask: MaskOpt = None,
    transfer: Annotated[
        bool,
        typer.Option("--transfer", help="Apply a network trained for another protocol (or dictionary) with "
                                        "the --dictionary fingerprints, without retraining."),
    ] = False,
) -> None:
    """Apply a trained hybrid estimator; population k of the maps is the one of peak k."""
    from bioinverse.dmri.crossing import Microstructure
    from bioinverse.dmri.hybrid import HybridEstimator
    from bioinverse.errors import InputError

    protocol, series = _read_series(dwi, scheme, mask)
    estimator = HybridEstimator.load(model)
    atoms = None if dictionary is None else _read_dictionary(dictionary, protocol, scheme)
    if transfer:
        if atoms is None:
            raise InputError("--transfer", "needs --dictionary: the fingerprints of this scheme's shells")
        try:
            estimator = estimator.transfer(atoms, protocol)
        except InputError as exc:
            raise InputError(dictionary, exc.problem) from None
    elif estimator.protocol.digest() != protocol.digest():
        raise InputError(model, f"was trained for another protocol than {Path(scheme).name} "
                                f"({len(estimator.protocol)} vs {len(protocol)} measurements); give "
                                "--dictionary for this protocol and --transfer to apply it without "
                                "retraining")
    elif atoms is not None and not _same_fingerprints(atoms, estimator.dictionary):
        raise InputError(dictionary, f"differs from the dictionary {Path(model).name} was trained with; add "
                                     "--transfer to use it anyway")
    orientations = _orientations(peaks, series, protocol, out)
    signals = series.voxels()
    estimate = _blockwise("hybrid", len(signals),
                          lambda a, b: estimator.predict(signals[a:b], orientations[a:b]).as_array())
    _write_parameter_maps(out, series, Microstructure.from_array(estimate))


# --------------------------------------------------------------------------------------------
# learned train | predict
# --------------------------------------------------------------------------------------------


@learned_app.command("train")
def learned_train(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to write (.pt).")],
    scheme: SchemeOpt,
    samples: SamplesOpt = 400_000,
    snr: SnrListOpt = "25,50,100",
    epochs: EpochsOpt = None,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    hidden: Annotated[
        str | None,
        typer.Option("--hidden", help="Widths of the hidden layers, comma-separated "
                                      "(default 900,900,900,900)."),
    ] = None,
) -> None:
    """Train the fully learned estimator on simulated crossings at the given SNRs."""
    from bioinverse.dmri.learned import LearnedEstimator, learned_train_config

    protocol = _read_protocol(scheme)
    config = learned_train_config(**({} if epochs is None else {"max_epochs": _positive(epochs, "--epochs")}))
    architecture = {} if hidden is None else {"hidden": _parse_ints(hidden, "--hidden")}
    estimator = LearnedEstimator(protocol, config=config, seed=_check_seed(seed), **architecture)
    data = _training_set(protocol, samples, snr, seed)
    typer.echo(f"training on {len(data)} simulated voxels (SNR {snr}), {len(protocol)} measurements",
               err=True)
    start = time.perf_counter()
    estimator.fit(data.signals, data.truth, checkpoint=checkpoint, progress=True)
    _report_training(estimator, time.perf_counter() - start)
    estimator.save(model)
    typer.echo(f"wrote {model}")


@learned_app.command("predict")
def learned_predict(
    dwi: Annotated[Path, typer.Argument(metavar="DWI", help="4D diffusion series (NIfTI).")],
    scheme: SchemeOpt,
    model: Annotated[Path, typer.Option("--model", help="Model written by `bioinverse dmri learned train`.")],
    out: OutDirOpt,
    mask: MaskOpt = None,
) -> None:
    """Apply a trained fully learned estimator; population 1 of the maps is the one with the larger ν."""
    from bioinverse.dmri.learned import LearnedEstimator
    from bioinverse.errors import InputError

    protocol, series = _read_series(dwi, scheme, mask)
    try:
        estimator = LearnedEstimator.load(model, protocol=protocol)
    except InputError as exc:
        if exc.source != "protocol":
            raise
        raise InputError(model, f"was trained for another protocol than {Path(scheme).name}; a fully learned "
                                "network must be retrained for a new protocol") from None
    _write_parameter_maps(out, series, estimator.predict(series.voxels()))
