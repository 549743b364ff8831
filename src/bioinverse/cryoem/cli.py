"""``bioinverse cryoem …`` commands: ``density``, ``simulate``, ``refine``, ``fsc``, ``implicit``,
``relion-external`` and ``train-denoiser``.

Lengths are Å, angles degrees, defocus µm on the command line (Å in STAR files). Every file is written
atomically; a user error prints one line, ``error: <file or option>: <what is wrong>``, and exits with
status 2.

- ``simulate``: an atomic model → a map → noisy CTF-modulated particle images with their true poses
  (particles.mrcs, particles.star, ground_truth.mrc, reference.mrc; :mod:`bioinverse.cryoem.simulate`).
- ``refine``: gold-standard MAP-EM refinement of particles against a reference
  (:mod:`bioinverse.cryoem.refine`); resumable from ``OUT/checkpoint.pt``.
- ``density``: an atomic model → its Coulomb potential on any box and voxel size.
- ``fsc``: Fourier shell correlation of half maps, optionally masked, and of a map against a reference.
- ``implicit fit`` / ``implicit render``: neural implicit representations of maps
  (:mod:`bioinverse.cryoem.cli_implicit`).
- ``relion-external`` / ``train-denoiser``: the learned prior of RED, inside RELION and trained
  (:mod:`bioinverse.cryoem.cli_red`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bioinverse.cryoem.cli_red import (
    DenoiserOption,
    HighOption,
    LowOption,
    PriorOption,
    StrengthOption,
    prior_from_options,
    relion_external_command,
    train_denoiser_command,
)
from bioinverse.io import output_dir

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from bioinverse.cryoem.io import Particles

app = typer.Typer(help="Cryo-EM: maps, FSC, particle simulation, refinement.", no_args_is_help=True)

# Width of the soft edge of the spherical mask of `fsc --mask-diameter` (RefineConfig.mask_edge's default).
_MASK_EDGE = 6.0
# Relative tolerance for pixel sizes that must agree (as bioinverse.cryoem.io checks headers).
_PIXEL_RTOL = 1e-3


# --------------------------------------------------------------------------------------------------
# Helpers


def _positive(value: float, option: str, allow_zero: bool = False) -> float:
    import math

    from bioinverse.errors import InputError

    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(option, f"must be {'≥ 0' if allow_zero else 'positive'}, got {value:g}")
    return value


def _parse_defocus(text: str) -> tuple[float, float]:
    """``"lo:hi"`` (µm) → (lo, hi); a single number is a fixed defocus."""
    import math

    from bioinverse.errors import InputError

    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise InputError("--defocus", f"must be a range 'min:max' in µm (e.g. 0.5:2.0), got {text!r}")
    lo, hi = values[0], values[-1]
    if not 0 < lo <= hi:
        raise InputError("--defocus", f"needs 0 < min ≤ max (µm of underfocus), got {text!r}")
    return lo, hi


def _same_pixel_size(a: float, b: float) -> bool:
    return abs(a - b) <= _PIXEL_RTOL * max(a, b)


def _finite_json(value):
    """JSON-ready copy: NumPy scalars and arrays become Python values, NaN and ±Inf become null."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_finite_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _echo_written(path: Path, what: str) -> None:
    typer.echo(f"wrote {path} ({what})")


# --------------------------------------------------------------------------------------------------
# simulate


@app.command("simulate")
def simulate_command(
    model: Annotated[Path, typer.Option("--model", help="Atomic model (PDB or mmCIF, optionally .gz).")],
    n: Annotated[int, typer.Option("--n", help="Number of particles.")],
    snr: Annotated[float, typer.Option("--snr", help="Per-pixel signal variance over noise variance "
                                                      "(CTF applied; typical 0.001–0.1).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    box: Annotated[int, typer.Option("--box", help="Box side in pixels (even).")] = 64,
    apix: Annotated[float, typer.Option("--apix", help="Pixel size in Å.")] = 1.5,
    defocus: Annotated[str, typer.Option("--defocus", help="Defocus range 'min:max' in µm (underfocus), drawn "
                                                           "uniformly per particle; one number: fixed.")] = "0.5:2.0",
    max_shift: Annotated[float, typer.Option("--max-shift", help="Shifts drawn uniformly in ±this many pixels "
                                                                 "on each axis.")] = 2.0,
    bfactor: Annotated[float, typer.Option("--bfactor", help="B-factor in Å² added to every atom.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of poses, defocus and noise.")] = 0,
    ini_high: Annotated[float, typer.Option("--ini-high", help="Low-pass in Å of the initial reference "
                                                               "(reference.mrc).")] = 30.0,
) -> None:
    """Simulate particle images of an atomic model with their true poses, as RELION reads them.

    Writes OUT/particles.mrcs (images, unit-variance noise), OUT/particles.star (true angles, origins and
    CTF; one optics group, 300 kV, Cs 2.7 mm, 10 % amplitude contrast), OUT/ground_truth.mrc (the map at
    the images' scale) and OUT/reference.mrc (the ground truth low-passed to --ini-high).
    """
    from bioinverse.cryoem.density import atoms_to_map
    from bioinverse.cryoem.io import read_atoms
    from bioinverse.cryoem.simulate import simulate_particles, write_simulation
    from bioinverse.errors import InputError

    if box < 8 or box % 2:
        raise InputError("--box", f"must be an even number of pixels ≥ 8, got {box}")
    if n < 1:
        raise InputError("--n", f"must be at least 1, got {n}")
    _positive(apix, "--apix")
    _positive(snr, "--snr")
    _positive(max_shift, "--max-shift", allow_zero=True)
    _positive(bfactor, "--bfactor", allow_zero=True)
    _positive(ini_high, "--ini-high")
    lo, hi = _parse_defocus(defocus)
    out = output_dir(out)

    atoms = read_atoms(model)
    volume = atoms_to_map(atoms, box, apix, bfactor=bfactor, centre=True)
    typer.echo(f"model {Path(model).name}: {len(atoms)} atoms in a {box}³ box of {apix:g} Å/voxel")
    sim = simulate_particles(volume, apix, n, snr, defocus=(lo, hi), max_shift=max_shift,
                             reference_resolution=ini_high, seed=seed)
    paths = write_simulation(sim, out)
    _echo_written(paths["stack"], f"{n} images of {box}×{box} px, {apix:g} Å/px")
    _echo_written(paths["star"], f"true poses and CTF, defocus {lo:g}–{hi:g} µm, shifts ≤ {max_shift:g} px")
    _echo_written(paths["ground_truth"], f"the model's map, B {bfactor:g} Å²")
    _echo_written(paths["reference"], f"ground truth low-passed to {ini_high:g} Å")
    typer.echo(f"SNR: {sim.snr:.4g} (per-pixel signal variance over noise variance 1, mean over the images)")


@app.command("density")
def density_command(
    model: Annotated[Path, typer.Argument(help="Atomic model (PDB or mmCIF, optionally .gz).")],
    out: Annotated[Path, typer.Option("--out", help="Map to write (MRC).")],
    box: Annotated[int, typer.Option("--box", help="Box side in voxels.")] = 64,
    apix: Annotated[float, typer.Option("--apix", help="Voxel size in Å.")] = 1.5,
    bfactor: Annotated[float, typer.Option("--bfactor", help="B-factor in Å² added to every atom.")] = 0.0,
) -> None:
    """The Coulomb potential of an atomic model on a box, centred (the map `simulate` images).

    Peng's five-Gaussian electron form factors with an anti-aliasing blur of 0.7 voxel (see
    bioinverse.cryoem.density.atoms_to_map); the same model at two samplings gives the same centre, so a
    finer map is the truth for an up-sampled render.
    """
    from bioinverse.cryoem.density import atoms_to_map
    from bioinverse.cryoem.io import read_atoms, write_map
    from bioinverse.errors import InputError

    if box < 2:
        raise InputError("--box", f"must be at least 2 voxels, got {box}")
    _positive(apix, "--apix")
    _positive(bfactor, "--bfactor", allow_zero=True)
    atoms = read_atoms(model)
    volume = atoms_to_map(atoms, box, apix, bfactor=bfactor, centre=True)
    write_map(out, volume, apix)
    _echo_written(out, f"{len(atoms)} atoms of {Path(model).name} in a {box}³ box of {apix:g} Å/voxel")


# --------------------------------------------------------------------------------------------------
# refine


def _check_not_inputs(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder where refine's outputs would replace one of its inputs."""
    from bioinverse.errors import InputError

    outputs = {(out / name).resolve() for name in ("particles.star", "map.mrc", "half1.mrc", "half2.mrc")}
    for path in inputs:
        if Path(path).resolve() in outputs:
            raise InputError("--out", f"would overwrite the input {path}; choose another folder")


def _pixel_size_of(star: Path, particles: Particles) -> float:
    import numpy as np

    from bioinverse.errors import InputError

    sizes = particles.per_particle("pixel_size")
    if np.ptp(sizes) > _PIXEL_RTOL * sizes.max():
        raise InputError(star, f"mixes pixel sizes {np.unique(sizes).tolist()} Å; refine one at a time")
    return float(sizes[0])


def _check_reference(path: Path, box: int, pixel_size: float, star: Path) -> np.ndarray:
    from bioinverse.cryoem.io import read_map
    from bioinverse.errors import InputError

    reference, voxel = read_map(path)
    if reference.shape != (box,) * 3:
        raise InputError(path, f"is a {'×'.join(map(str, reference.shape))} map; the particles of {Path(star).name} "
                         f"need a {box}³ box")
    if not _same_pixel_size(voxel, pixel_size):
        raise InputError(path, f"has voxel size {voxel:g} Å; the particles of {Path(star).name} have "
                         f"{pixel_size:g} Å (rlnImagePixelSize)")
    return reference


def _match_truth(truth: Path, particles: Particles) -> Particles:
    """The true poses of ``particles``, in their order, matched by image (stack file and index)."""
    from bioinverse.cryoem.io import read_particles
    from bioinverse.errors import InputError

    known = read_particles(truth)
    if not known.has_poses:
        raise InputError(truth, "has no poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst)")
    # Image names resolve against each STAR file's folder, so the same image may be named differently.
    where = {}
    for k, (index, stack) in enumerate(known.stack_locations()):
        where.setdefault((index, stack.resolve()), k)
    rows = []
    for k, (index, stack) in enumerate(particles.stack_locations()):
        row = where.get((index, stack.resolve()))
        if row is None:
            raise InputError(truth, f"has no pose for particle {k + 1} ({particles.image_names[k]!r})")
        rows.append(row)
    return known.subset(rows)


def _relative_image_names(particles: Particles, folder: Path) -> list[str]:
    """Image names that resolve from ``folder`` to the same images (RELION reads them relative to it)."""
    import os

    names = []
    for index, stack in particles.stack_locations():
        target = stack.resolve()
        try:
            location = os.path.relpath(target, folder.resolve())
        except ValueError:  # another drive (Windows): only an absolute path reaches it
            location = str(target)
        names.append(f"{index + 1:06d}@{location}")
    return names


@app.command("refine")
def refine_command(
    particles_star: Annotated[Path, typer.Argument(metavar="PARTICLES.star",
                                                   help="RELION particle STAR file (3.1, or 3.0) and its stacks.")],
    reference: Annotated[Path, typer.Option("--reference", help="Initial reference map (MRC) on the particles' "
                                                                "box and pixel size.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (also holds checkpoint.pt).")],
    diameter: Annotated[float | None, typer.Option("--diameter", help="Particle diameter in Å (solvent mask); "
                                                                          "default 90 % of the box.")] = None,
    ini_high: Annotated[float, typer.Option("--ini-high", help="Resolution in Å of the first iteration.")] = 30.0,
    healpix_order: Annotated[int, typer.Option("--healpix-order", help="HEALPix order of the global search "
                                                                       "(2: 15°, 3: 7.5°).")] = 2,
    max_healpix_order: Annotated[int, typer.Option("--max-healpix-order", help="Finest HEALPix order of the "
                                                                               "local searches.")] = 5,
    offset_range: Annotated[float, typer.Option("--offset-range", help="Shift search range in pixels.")] = 5.0,
    offset_step: Annotated[float, typer.Option("--offset-step", help="Shift search step in pixels.")] = 1.0,
    max_iterations: Annotated[int, typer.Option("--max-iterations", help="Stop after this many iterations "
                                                                         "(a rerun with more continues).")] = 25,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the half-set split.")] = 0,
    truth: Annotated[Path | None, typer.Option("--truth", help="STAR file with the true poses of the same "
                                                                  "particles (matched by image): report angular "
                                                                  "errors.")] = None,
    ignore_origins: Annotated[bool, typer.Option("--ignore-origins", help="Start every shift search at 0, as "
                                                                         "for freshly picked particles (e.g. a "
                                                                         "blind test on simulated ones).")] = False,
    prior: PriorOption = "gaussian",
    denoiser: DenoiserOption = None,
    strength: StrengthOption = 1.0,
    cw_low: LowOption = 10.0,
    cw_high: HighOption = 4.5,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
) -> None:
    """Gold-standard 3-D refinement (MAP-EM, as RELION's auto-refine) of particles against a reference.

    Input origins (rlnOriginX/YAngst), when the STAR file has poses, centre the first shift search (unless
    --ignore-origins); input angles are not used (the first search is global). Input half sets
    (rlnRandomSubset 1/2) are kept; otherwise particles are split at random (--seed). --prior red or cwred
    replaces the Gaussian prior's M-step by regularisation by denoising (seed 002 eq. 17).
    Rerunning the same command resumes from OUT/checkpoint.pt. Writes OUT/half1.mrc, half2.mrc, map.mrc,
    fsc.star (data_fsc), fsc.png, particles.star (refined angles, origins, rlnRandomSubset,
    rlnMaxValueProbDistribution), history.json and, with --truth, angular_error.png.
    """
    import dataclasses

    import numpy as np

    from bioinverse.cryoem.figures import angular_error_figure, fsc_figure
    from bioinverse.cryoem.io import read_particle_stack, write_fsc_star, write_map, write_particles
    from bioinverse.cryoem.projection import origin_to_shift
    from bioinverse.cryoem.refine import RefineConfig, refine
    from bioinverse.cryoem.rotations import angular_distance, euler_to_matrix
    from bioinverse.errors import InputError
    from bioinverse.fourier import FSCCurve
    from bioinverse.io import write_json

    if diameter is not None:
        _positive(diameter, "--diameter")
    _positive(ini_high, "--ini-high")
    _positive(offset_range, "--offset-range", allow_zero=True)
    _positive(offset_step, "--offset-step")
    if not 0 <= healpix_order <= 7:
        raise InputError("--healpix-order", f"must be 0 … 7, got {healpix_order}")
    if not healpix_order <= max_healpix_order <= 7:
        raise InputError("--max-healpix-order", f"must be {healpix_order} (--healpix-order) … 7, got "
                         f"{max_healpix_order}")
    if max_iterations < 1:
        raise InputError("--max-iterations", f"must be at least 1, got {max_iterations}")
    star = Path(particles_star)
    _check_not_inputs(Path(out), [star, Path(reference)] + ([Path(truth)] if truth is not None else []))

    images, particles = read_particle_stack(star)
    n, box = images.shape[0], images.shape[-1]
    if box % 2:
        raise InputError(star, f"has {box}×{box} px images; refinement needs an even box")
    if n < 4:
        raise InputError(star, f"holds {n} particles; refinement needs at least 4")
    pixel_size = _pixel_size_of(star, particles)
    initial = _check_reference(Path(reference), box, pixel_size, star)
    true_poses = _match_truth(Path(truth), particles) if truth is not None else None
    out = output_dir(out)

    chosen = prior_from_options(prior, strength, cw_low, cw_high)
    model = None
    if chosen.needs_denoiser:
        from bioinverse.cryoem.denoiser import load_denoiser

        model = load_denoiser(denoiser)
        model.check_map(initial, pixel_size, str(reference))
    config = RefineConfig(particle_diameter=diameter, initial_resolution=ini_high, healpix_order=healpix_order,
                          max_healpix_order=max_healpix_order, offset_range=offset_range, offset_step=offset_step,
                          max_iterations=max_iterations, seed=seed, prior=chosen)
    use_origins = particles.has_poses and not ignore_origins
    initial_shifts = origin_to_shift(particles.origins, pixel_size) if use_origins else None
    subsets = particles.random_subset
    half = subsets if set(np.unique(subsets)) == {1, 2} else None
    typer.echo(f"{n} particles of {box}×{box} px, {pixel_size:g} Å/px; half sets "
               f"{'from ' + star.name if half is not None else f'split at random (seed {seed})'}")
    result = refine(images, pixel_size, particles.ctf_parameters()._asdict(), initial, config=config,
                    initial_shifts=initial_shifts, half=half, checkpoint=out / "checkpoint.pt", progress=progress,
                    log=typer.echo, denoiser=model)

    for k in (0, 1):
        path = out / f"half{k + 1}.mrc"
        write_map(path, result.half_maps[k], pixel_size)
        _echo_written(path, f"half map {k + 1}, {int(np.sum(result.half == k + 1))} particles")
    write_map(out / "map.mrc", result.final_map, pixel_size)
    _echo_written(out / "map.mrc", "reconstruction from both halves")
    curve = FSCCurve(frequency=np.arange(box // 2 + 1) / (box * pixel_size), values=result.fsc,
                     n_coefficients=_shell_counts(box), pixel_size=pixel_size)
    write_fsc_star(out / "fsc.star", curve)
    _echo_written(out / "fsc.star", "gold-standard FSC, data_fsc")
    fsc_figure({"gold-standard FSC": curve}, out / "fsc.png", thresholds=(0.143,))
    _echo_written(out / "fsc.png", "FSC curve")
    refined = dataclasses.replace(
        particles, image_names=_relative_image_names(particles, out), angles=result.angles,
        origins=-result.shifts * pixel_size, random_subset=result.half, max_probability=result.max_probability,
        log_likelihood=None, has_poses=True, star_path=out / "particles.star")
    write_particles(out / "particles.star", refined)
    _echo_written(out / "particles.star", "refined poses and half sets")

    summary = {"resolution_A": result.resolution, "converged": result.converged, "iterations": result.history}
    if true_poses is not None:
        errors = angular_distance(euler_to_matrix(*true_poses.angles.T), euler_to_matrix(*result.angles.T))
        origin_errors = np.linalg.norm(refined.origins - true_poses.origins, axis=1)
        summary["truth"] = {"file": str(truth), "median_angular_error_deg": float(np.median(errors)),
                            "mean_angular_error_deg": float(np.mean(errors)),
                            "median_origin_error_A": float(np.median(origin_errors))}
        angular_error_figure({"refined vs true": errors}, out / "angular_error.png")
        _echo_written(out / "angular_error.png", "histogram of angular errors")
    write_json(out / "history.json", _finite_json(summary))
    _echo_written(out / "history.json", "per-iteration record")

    state = "converged" if result.converged else f"not converged after {len(result.history)} iterations"
    typer.echo(f"resolution (FSC 0.143): {result.resolution:.2f} Å ({state})")
    if true_poses is not None:
        truth_summary = summary["truth"]
        typer.echo(f"median angular error: {truth_summary['median_angular_error_deg']:.2f}° (mean "
                   f"{truth_summary['mean_angular_error_deg']:.2f}°), median origin error "
                   f"{truth_summary['median_origin_error_A']:.2f} Å, against {Path(truth).name}")


def _shell_counts(box: int) -> np.ndarray:
    from bioinverse.cryoem.io import _shell_counts as counts

    return counts(box)


# --------------------------------------------------------------------------------------------------
# fsc


@app.command()
def fsc(
    half1: Annotated[Path, typer.Argument(help="First half map (MRC), or a full map with --reference.")],
    half2: Annotated[Path | None, typer.Argument(help="Second half map (MRC); omit to compare HALF1 with "
                                                         "--reference only.")] = None,
    pixel_size: Annotated[
        float | None, typer.Option(help="Å per voxel; default: from the MRC header.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the FSC curve(s) as a PNG.")] = None,
    mask_diameter: Annotated[float | None, typer.Option(
        "--mask-diameter", help=f"Multiply every map by a soft spherical mask of this diameter in Å "
                                f"({_MASK_EDGE:g} Å cosine edge) before the FSC; the mask's own correlation is "
                                "not corrected for (no phase randomisation), so a tight mask raises the FSC.")] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Also report the FSC 0.5 resolution against this map: of the average of the two "
                            "half maps, or of HALF1 when HALF2 is omitted.")] = None,
) -> None:
    """Fourier shell correlation of two maps and the resolution at FSC 0.143 and 0.5.

    With --reference, the map compared with the reference is (HALF1 + HALF2) / 2, or HALF1 alone when it
    is the only map given (a full map); a map against a reference is read at FSC 0.5.
    """
    from bioinverse.cryoem.io import read_map
    from bioinverse.errors import InputError
    from bioinverse.fourier import fsc as compute_fsc

    if half2 is None and reference is None:
        raise InputError("HALF2", "is missing: give two half maps, or one map and --reference")
    map1, px1 = read_map(half1)
    if len(set(map1.shape)) != 1:
        raise InputError(half1, f"is not a cubic box: {map1.shape}")
    others = {}
    for path in (half2, reference):
        if path is None:
            continue
        data, voxel = read_map(path)
        if data.shape != map1.shape:
            raise InputError(path, f"has shape {data.shape}, {half1.name} has {map1.shape}")
        if pixel_size is None and not _same_pixel_size(voxel, px1):
            raise InputError(path, f"has voxel size {voxel:g} Å, {half1.name} has {px1:g} Å")
        others[path] = data
    px = pixel_size if pixel_size is not None else px1
    if px <= 0:
        raise InputError("--pixel-size", "must be positive")
    box = map1.shape[0]
    if mask_diameter is not None:
        from bioinverse.cryoem.refine import soft_sphere_mask

        _positive(mask_diameter, "--mask-diameter")
        mask = soft_sphere_mask(box, 0.5 * mask_diameter / px, _MASK_EDGE / px)
        map1 = map1 * mask
        others = {path: data * mask for path, data in others.items()}
    typer.echo(f"box {box}, {px:g} Å/voxel, Nyquist {2 * px:.2f} Å")
    if mask_diameter is not None:
        typer.echo(f"mask: sphere of {mask_diameter:g} Å diameter, {_MASK_EDGE:g} Å soft edge, on every map")
    curves = {}
    if half2 is not None:
        curve = compute_fsc(map1, others[half2], px)
        curves["half maps"] = curve
        typer.echo(f"resolution (FSC 0.143): {curve.resolution(0.143):.2f} Å")
        typer.echo(f"resolution (FSC 0.5):   {curve.resolution(0.5):.2f} Å")
    if reference is not None:
        compared = 0.5 * (map1 + others[half2]) if half2 is not None else map1
        what = "average of the half maps" if half2 is not None else half1.name
        curve = compute_fsc(compared, others[reference], px)
        curves[f"{what} vs {reference.name}"] = curve
        typer.echo(f"resolution against {reference.name} (FSC 0.5, {what}): {curve.resolution(0.5):.2f} Å")
    if plot is not None:
        from bioinverse.cryoem.figures import fsc_figure

        fsc_figure(curves, plot)
        typer.echo(f"plot: {plot}")


from bioinverse.cryoem.cli_implicit import app as _implicit_app  # last: it imports the helpers above

app.add_typer(_implicit_app, name="implicit")
app.command("relion-external")(relion_external_command)
app.command("train-denoiser")(train_denoiser_command)
