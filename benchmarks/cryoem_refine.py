"""Gold-standard MAP-EM refinement (bioinverse) against RELION 3.1.3 auto-refine on the same particles.

Claim (seed 002 §2.2): :func:`bioinverse.cryoem.refine.refine` reaches RELION's accuracy — the resolution of
the final map against the ground truth within one Fourier shell — in less time on the same CPU cores.

Data: real protein models (MDAnalysisTests' ``adk_open``, ``4E43``, ``1hvr``, fetched by
:func:`bioinverse.cryoem.structures.fetch_structure`) → Coulomb potential (:func:`atoms_to_map`, box 64,
1.5 Å/px) → particles with random poses, shifts of up to ±2 px, CTF (defocus 0.5–2 µm, 300 kV) and unit
white noise at a given SNR (:func:`simulate_particles`). Both programs get the same stack, a STAR file
WITHOUT poses, the same initial reference (the ground truth low-passed to 30 Å, on the particles'
greyscale), the same particle diameter, the same first angular sampling (HEALPix order 2, 15°, evaluated
once per pose: RELION ``--oversampling 0``), local searches from order 3 on, and the same offset search
(range and step in pixels), on the same two cores: RELION as 3 MPI ranks (1 leader + 2 workers of 1
thread), bioinverse as one process with 2 torch threads. RELION's first iteration is its cross-correlation
one (``--firstiter_cc``): without it RELION does not find the poses on these data (the Markdown's notes).
The true poses are kept for scoring.

Scoring, identical for both: every map is multiplied by the same soft spherical mask (the particle
diameter, RELION's 5-pixel cosine edge) before an FSC; ``res_gt_*`` is the FSC-0.5 resolution of the
final map against the ground truth, ``res_half_*`` the FSC-0.143 resolution of the two half maps,
``res_gt_trueangles_A`` the same for a reconstruction from the true poses (the upper bound),
``median_angular_error_deg_*`` the median rotation angle between refined and true poses (to the nearest
symmetry mate for the C2 dimers 4E43 and 1hvr).
``shell_difference_gt`` = (Fourier shell of ours − Fourier shell of RELION) at FSC 0.5 against the truth:
≥ −1 means ours is within one shell of RELION or better. ``frame_rotation_deg_relion`` is the rotation of
RELION's whole map against the truth, read from its poses (:func:`_frame_rotation`), and
``median_angular_error_deg_relion_own_frame`` its pose error once that rotation is removed; the maps are
scored unrotated.

The full run is three structures × two SNRs (0.05 and 0.015) × 1000 particles, about 1.5 h on 2 cores,
nearly all of it RELION's. Kimanius et al. refined 10,000 particles at SNRs of 0.0012–0.0038; their total signal
(particles × SNR, 12–38) is bracketed by ours (15 and 50), and ten times fewer particles keep RELION's six
refinements within a working session on two cores. The full run is resumable per case: a case whose
``<out>/cache/cryoem_refine/full/<structure>_snr<snr>_n<n>.json`` exists is read instead of run (delete it
to run the case again). The quick run (``--quick``: adk_open, 350 particles, SNR 0.05) always runs afresh.
Run nothing else on the machine while either runs: the speed-up is a ratio of wall clocks.
"""

from __future__ import annotations

import os

# Torch's OpenMP threads spin while waiting; on a 2-core machine shared with RELION's ranks or other jobs
# that costs an order of magnitude. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import _relion
from benchmarks._harness import StudyResult

TITLE = "Cryo-EM gold-standard refinement vs RELION 3.1.3 auto-refine (simulated particles of real proteins)"

BOX = 64
PIXEL_SIZE = 1.5  # Å
MASK_EDGE_PX = 5  # RELION's --width_mask_edge default, used for every mask of the study
INITIAL_RESOLUTION = 30.0  # Å: the reference's low-pass and both programs' first band (--ini_high)
HEALPIX_ORDER = 2  # first, global search: 15° (RELION also samples 7.5° with --oversampling 1)
OFFSET_RANGE = 3.0  # px: true shifts are within ±2 px per axis, |s| ≤ 2.83 px
OFFSET_STEP = 1.0  # px
# RELION's sampling that matches ours (see _CHOICES): every pose of the grid evaluated once, no
# cross-correlation shortcut in the first iteration, local searches from HEALPix order 3 on.
FIRSTITER_CC = True
OVERSAMPLING = 0
AUTO_LOCAL_HEALPIX_ORDER = 3
THREADS_OURS = 2
STRUCTURES_FULL = ("adk_open", "4E43", "1hvr")
SNRS_FULL = (0.05, 0.015)
N_FULL = 1000


@dataclass(frozen=True)
class Case:
    """One data set: structure, SNR, number of particles; RELION's wall-clock limit in seconds."""

    structure: str
    snr: float
    n: int
    relion_limit: float
    seed: int = 1

    @property
    def tag(self) -> str:
        return f"{self.structure}_snr{self.snr:g}"


QUICK_CASE = Case("adk_open", snr=0.05, n=350, relion_limit=600.0)
FULL_CASES = tuple(Case(s, snr, N_FULL, relion_limit=3600.0) for s in STRUCTURES_FULL for snr in SNRS_FULL)


def _load_average() -> float:
    return float(os.getloadavg()[0])


def _particle_diameter(atoms) -> float:
    """Å: the model's diameter plus 4 Å, rounded up to 5 Å, inside the box less the mask edge."""
    from bioinverse.cryoem.density import particle_diameter

    return particle_diameter(atoms, BOX * PIXEL_SIZE - 2 * MASK_EDGE_PX * PIXEL_SIZE)


def _symmetry_rotations(path: Path) -> np.ndarray:
    """Rotations (k, 3, 3) that map the model onto itself: the identity and each two-fold of identical chains.

    HIV-1 protease (4E43, 1hvr) is a C2 dimer. Refined in C1 from a 30-Å reference, which is as symmetric
    as the dimer, a particle may align to its symmetry mate: the map is unharmed, but its rotation differs
    from the true one by the two-fold. The angular error is measured to the nearest symmetry mate. A chain
    pair counts as symmetric when its common Cα atoms superpose by a rotation with RMSD < 2 Å.
    """
    import gemmi

    structure = gemmi.read_structure(str(path))
    structure.remove_waters()
    chains = {}
    for chain in structure[0]:
        alphas = {(r.seqid.num, r.name): np.array(r["CA"][0].pos.tolist()) for r in chain if r.find_atom("CA", "*")}
        if len(alphas) >= 50:
            chains[chain.name] = alphas
    rotations = [np.eye(3)]
    names = sorted(chains)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(chains[a]) & set(chains[b]))
            if len(common) < 50:
                continue
            x = np.array([chains[a][k] for k in common])
            y = np.array([chains[b][k] for k in common])
            x0, y0 = x - x.mean(0), y - y.mean(0)
            u, _, vt = np.linalg.svd(x0.T @ y0)  # Kabsch: the rotation taking chain a onto chain b
            d = np.sign(np.linalg.det(vt.T @ u.T))
            rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
            rmsd = float(np.sqrt(np.mean(np.sum((x0 @ rotation.T - y0) ** 2, axis=1))))
            if rmsd < 2.0:
                rotations.append(rotation)
    return np.stack(rotations)


def _nearest_mates(angles: np.ndarray, true_rotations: np.ndarray, symmetry: np.ndarray):
    """The refined rotations (n, 3, 3), each one's nearest symmetry mate of its true pose, and the angle to it (°).

    A map with V(S r) = V(r) projects identically at the poses A and A Sᵀ (image = Σ_z V(Aᵀ (x, y, z))).
    """
    from bioinverse.cryoem.rotations import angular_distance, euler_to_matrix

    estimated = euler_to_matrix(*np.asarray(angles).T)
    mates = np.stack([true_rotations @ s.T for s in symmetry])
    distances = np.stack([angular_distance(estimated, m) for m in mates])
    nearest = distances.argmin(axis=0)
    return estimated, mates[nearest, np.arange(len(estimated))], distances[nearest, np.arange(len(estimated))]


def _angular_errors(angles: np.ndarray, true_rotations: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """Degrees from each refined pose to the nearest symmetry mate of the true pose."""
    return _nearest_mates(angles, true_rotations, symmetry)[2]


def _frame_rotation(angles: np.ndarray, true_rotations: np.ndarray, symmetry: np.ndarray) -> tuple[float, float]:
    """How much of the pose error is one rotation of the whole map: (its angle, median error once it is removed).

    A map rotated by Q, V'(r) = V(Qᵀ r), shows at the pose A Qᵀ what the true map shows at A, so poses
    refined against a rotated reference are E ≈ M Qᵀ, M the true pose's nearest symmetry mate. Qᵀ is the
    rotation nearest the mean of the Mᵀ E (the chordal L2 mean), re-estimated from the particles within 40° of
    it, so that misaligned particles do not pull it. Angles in degrees.
    """
    from bioinverse.cryoem.rotations import angular_distance

    estimated, nearest, _ = _nearest_mates(angles, true_rotations, symmetry)
    relative = np.einsum("nji,njk->nik", nearest, estimated)
    inside = np.ones(len(relative), dtype=bool)
    for _ in range(10):
        u, _, vt = np.linalg.svd(relative[inside].mean(axis=0))
        q = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        inside = angular_distance(relative, q) < 40.0
        if not inside.any():
            break
    return float(angular_distance(np.eye(3), q)), float(np.median(angular_distance(estimated, nearest @ q)))


def _relion_frame(record: dict) -> dict[str, float]:
    """:func:`_frame_rotation` of RELION's final poses, read back from the case folder."""
    from bioinverse.cryoem.io import read_particles
    from bioinverse.cryoem.rotations import euler_to_matrix
    from bioinverse.cryoem.structures import fetch_structure

    folder = Path(record["relion_folder"])
    outputs = _relion.final_outputs(folder, "relion/run")
    if outputs is None:
        return {}
    truth = read_particles(folder / "particles.star")
    poses = _relion.read_poses(outputs["data"], truth.image_names)
    symmetry = _symmetry_rotations(fetch_structure(record["case"]["structure"]))
    angle, residual = _frame_rotation(poses["angles"], euler_to_matrix(*truth.angles.T), symmetry)
    return {"frame_rotation_deg_relion": angle, "median_angular_error_deg_relion_own_frame": residual}


def _simulate(case: Case, folder: Path):
    """Particles of ``case`` written for RELION; returns the simulation, its file paths and the diameter."""
    from bioinverse.cryoem.density import atoms_to_map
    from bioinverse.cryoem.io import read_atoms, write_particles
    from bioinverse.cryoem.simulate import simulate_particles, write_simulation
    from bioinverse.cryoem.structures import fetch_structure

    model = fetch_structure(case.structure)
    atoms = read_atoms(model)
    volume = atoms_to_map(atoms, BOX, PIXEL_SIZE)
    sim = simulate_particles(volume, PIXEL_SIZE, case.n, case.snr, reference_resolution=INITIAL_RESOLUTION,
                             seed=case.seed)
    paths = write_simulation(sim, folder)
    # Neither program sees the true poses or shifts: no angle or origin columns at all.
    paths["star_noposes"] = folder / "particles_noposes.star"
    write_particles(paths["star_noposes"], dataclasses.replace(sim.particles, has_poses=False))
    return sim, paths, _particle_diameter(atoms), _symmetry_rotations(model)


def _run_ours(sim, diameter: float):
    """bioinverse's refinement in this process, timed; per-iteration seconds from the log's time stamps."""
    import torch

    from bioinverse.cryoem.refine import RefineConfig, refine

    torch.set_num_threads(THREADS_OURS)
    config = RefineConfig(particle_diameter=diameter, initial_resolution=INITIAL_RESOLUTION,
                          healpix_order=HEALPIX_ORDER, offset_range=OFFSET_RANGE, offset_step=OFFSET_STEP,
                          mask_edge=MASK_EDGE_PX * PIXEL_SIZE)
    stamps = []
    cpu_start = time.process_time()
    start = time.perf_counter()
    result = refine(sim.images, PIXEL_SIZE, sim.particles.ctf_parameters()._asdict(), sim.reference, config,
                    log=lambda line: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    previous = 0.0
    for record, stamp in zip(result.history, stamps):
        record["seconds"] = stamp - start - previous
        previous = stamp - start
    return result, seconds, cpu_seconds, config


def _run_relion(case: Case, folder: Path, diameter: float) -> tuple[_relion.RelionRun, list[str]]:
    command = _relion.refine_command("particles_noposes.star", "reference.mrc", "relion/run",
                                     particle_diameter=diameter, healpix_order=HEALPIX_ORDER,
                                     offset_range=OFFSET_RANGE, offset_step=OFFSET_STEP,
                                     ini_high=INITIAL_RESOLUTION, firstiter_cc=FIRSTITER_CC,
                                     oversampling=OVERSAMPLING, auto_local_healpix_order=AUTO_LOCAL_HEALPIX_ORDER)
    return _relion.run_refine(command, folder, "relion/run", case.relion_limit), command


def _curve_dict(curve) -> dict:
    return {"frequency": curve.frequency.tolist(), "values": curve.values.tolist(),
            "n_coefficients": curve.n_coefficients.tolist()}


def _shell(resolution: float) -> float:
    """Fourier shell (fractional) of a resolution in Å; 0 for nothing resolved."""
    return BOX * PIXEL_SIZE / resolution if math.isfinite(resolution) and resolution > 0 else 0.0


def _run_case(case: Case, folder: Path) -> dict:
    """Simulate, refine with both programs, score; everything JSON-ready (maps stay on disk)."""
    from bioinverse.cryoem.io import read_map, write_map
    from bioinverse.cryoem.projection import origin_to_shift
    from bioinverse.cryoem.refine import reconstruct_with_poses, soft_sphere_mask
    from bioinverse.cryoem.rotations import euler_to_matrix
    from bioinverse.fourier import fsc

    folder.mkdir(parents=True, exist_ok=True)
    sim, _, diameter, symmetry = _simulate(case, folder)
    mask = soft_sphere_mask(BOX, 0.5 * diameter / PIXEL_SIZE, MASK_EDGE_PX)
    truth = sim.ground_truth
    ctf_parameters = sim.particles.ctf_parameters()._asdict()
    true_rotations = euler_to_matrix(*sim.particles.angles.T)

    def masked_fsc(a, b):
        return fsc(np.asarray(a, np.float64) * mask, np.asarray(b, np.float64) * mask, PIXEL_SIZE)

    load = {"load_before_ours": _load_average()}
    result, seconds_ours, cpu_ours, config = _run_ours(sim, diameter)
    load["load_before_relion"] = _load_average()
    run, command = _run_relion(case, folder, diameter)
    load["load_after_relion"] = _load_average()

    # The upper bound: one reconstruction from the true poses, with our M-step.
    true_halves, true_final, _ = reconstruct_with_poses(sim.images, PIXEL_SIZE, ctf_parameters, sim.particles.angles,
                                                        sim.shifts)
    write_map(folder / "ours_final.mrc", result.final_map, PIXEL_SIZE)
    write_map(folder / "trueposes_final.mrc", true_final, PIXEL_SIZE)

    curves = {"gt_ours": masked_fsc(result.final_map, truth), "half_ours": masked_fsc(*result.half_maps),
              "gt_trueangles": masked_fsc(true_final, truth), "half_trueangles": masked_fsc(*true_halves),
              "gt_reference": masked_fsc(sim.reference, truth)}
    errors = {"ours": _angular_errors(result.angles, true_rotations, symmetry)}
    shift_errors = {"ours": np.linalg.norm(result.shifts - sim.shifts, axis=1)}
    metrics = {
        "n_particles": case.n, "snr": case.snr, "box": BOX, "pixel_size_A": PIXEL_SIZE,
        "particle_diameter_A": diameter, "symmetry_mates": len(symmetry),
        "res_gt_ours_A": curves["gt_ours"].resolution(0.5),
        "res_half_ours_A": curves["half_ours"].resolution(0.143),
        "res_gt_trueangles_A": curves["gt_trueangles"].resolution(0.5),
        "res_half_trueangles_A": curves["half_trueangles"].resolution(0.143),
        "res_gt_reference_A": curves["gt_reference"].resolution(0.5),
        "res_reported_ours_A": float(result.resolution),
        "median_angular_error_deg_ours": float(np.median(errors["ours"])),
        "median_shift_error_px_ours": float(np.median(shift_errors["ours"])),
        "seconds_ours": seconds_ours,
        "cpu_seconds_ours": cpu_ours,
        "iterations_ours": len(result.history),
        "converged_ours": int(result.converged),
    }

    relion = {"completed": run.completed, "timed_out": run.timed_out, "returncode": run.returncode,
              "history": [], "final_run": False}
    outputs = _relion.final_outputs(folder, "relion/run")
    if outputs is not None:
        relion["final_run"] = bool(outputs["final_run"])
        relion["history"] = _relion.history(folder, "relion/run", run.started)
        for record in relion["history"]:  # how RELION's poses approach the truth, iteration by iteration
            data = folder / f"relion/run_it{record['iteration']:03d}_data.star"
            if data.exists():
                angles = _relion.read_poses(data, sim.particles.image_names)["angles"]
                record["median_angular_error_deg"] = float(np.median(_angular_errors(angles, true_rotations,
                                                                                     symmetry)))
        poses = _relion.read_poses(outputs["data"], sim.particles.image_names)
        half1, _ = read_map(outputs["half1"])
        half2, _ = read_map(outputs["half2"])
        final = read_map(outputs["final"])[0] if outputs["final"] is not None else 0.5 * (half1 + half2)
        model = _relion.read_model(outputs["model"])
        curves["gt_relion"] = masked_fsc(final, truth)
        curves["half_relion"] = masked_fsc(half1, half2)
        errors["relion"] = _angular_errors(poses["angles"], true_rotations, symmetry)
        shift_errors["relion"] = np.linalg.norm(origin_to_shift(poses["origins"], PIXEL_SIZE) - sim.shifts, axis=1)
        metrics.update({
            "res_gt_relion_A": curves["gt_relion"].resolution(0.5),
            "res_half_relion_A": curves["half_relion"].resolution(0.143),
            "res_reported_relion_A": model["resolution_A"],
            "median_angular_error_deg_relion": float(np.median(errors["relion"])),
            "median_shift_error_px_relion": float(np.median(shift_errors["relion"])),
            "median_norm_correction_relion": float(np.median(poses["norm"])),
        })
        relion["reported_fsc"] = {"frequency": model["frequency"].tolist(),
                                  "values": model["fsc"].tolist()} if "fsc" in model else None
        relion["final_map"] = str(outputs["final"]) if outputs["final"] is not None else None
        if outputs["final"] is None:
            write_map(folder / "relion_final_from_halves.mrc", final, PIXEL_SIZE)
            relion["final_map"] = str(folder / "relion_final_from_halves.mrc")
    metrics.update({"seconds_relion": run.seconds, "cpu_seconds_relion": run.cpu_seconds,
                    "relion_completed": int(run.completed),
                    "iterations_relion": len(relion["history"])})
    metrics["speedup_vs_relion"] = run.seconds / seconds_ours
    if "res_gt_relion_A" in metrics:
        metrics["shell_difference_gt"] = _shell(metrics["res_gt_ours_A"]) - _shell(metrics["res_gt_relion_A"])
        metrics["shell_difference_half"] = _shell(metrics["res_half_ours_A"]) - _shell(metrics["res_half_relion_A"])
    np.savez_compressed(folder / "errors.npz", **{f"angular_{k}": v for k, v in errors.items()},
                        **{f"shift_{k}": v for k, v in shift_errors.items()})
    return {
        "case": dataclasses.asdict(case), "metrics": metrics, "load": load,
        "curves": {k: _curve_dict(c) for k, c in curves.items()},
        "history_ours": [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()}
                         for r in result.history],
        "relion": relion, "relion_command": shlex.join(command), "relion_folder": str(folder),
        "config_ours": dataclasses.asdict(config), "torch_threads": THREADS_OURS,
    }


def _case_result(case: Case, cache: Path, resume: bool) -> dict:
    from bioinverse.io import write_json

    record_path = cache / f"{case.tag}_n{case.n}.json"
    if resume and record_path.exists():
        print(f"   {case.tag}: cached in {record_path}", flush=True)
        return json.loads(record_path.read_text())
    print(f"   {case.tag}: {case.n} particles", flush=True)
    record = _run_case(case, cache / f"{case.tag}_n{case.n}")
    write_json(record_path, record)
    return record


def _figures(record: dict, out: Path) -> list[str]:
    from bioinverse.cryoem.figures import angular_error_figure, fsc_figure, slices_figure
    from bioinverse.cryoem.io import read_map
    from bioinverse.fourier import FSCCurve

    def curve(name):
        c = record["curves"][name]
        return FSCCurve(c["frequency"], c["values"], c["n_coefficients"], PIXEL_SIZE)

    present = record["curves"]
    gt = {label: curve(key) for key, label in (("gt_ours", "bioinverse"), ("gt_relion", "RELION 3.1.3"),
                                               ("gt_trueangles", "true poses"), ("gt_reference", "initial reference"))
          if key in present}
    half = {label: curve(key) for key, label in (("half_ours", "bioinverse"), ("half_relion", "RELION 3.1.3"),
                                                 ("half_trueangles", "true poses")) if key in present}
    figures = [fsc_figure(gt, out / "cryoem_refine_fsc_gt.png", thresholds=(0.5,)),
               fsc_figure(half, out / "cryoem_refine_fsc_half.png", thresholds=(0.143,))]
    folder = Path(record["relion_folder"])
    errors = np.load(folder / "errors.npz")
    angular = {label: errors[f"angular_{key}"] for key, label in (("ours", "bioinverse"), ("relion", "RELION 3.1.3"))
               if f"angular_{key}" in errors}
    figures.append(angular_error_figure(angular, out / "cryoem_refine_angular_error.png"))
    maps = {"ground truth": read_map(folder / "ground_truth.mrc")[0], "bioinverse": read_map(folder / "ours_final.mrc")[0]}
    if record["relion"].get("final_map"):
        maps["RELION 3.1.3"] = read_map(record["relion"]["final_map"])[0]
    maps["true poses"] = read_map(folder / "trueposes_final.mrc")[0]
    figures.append(slices_figure(maps, out / "cryoem_refine_slices.png"))
    return [str(f) for f in figures]


def run(quick: bool, out: Path) -> StudyResult:
    if not _relion.available():
        raise RuntimeError("RELION is not installed: apt-get install relion (the Makefile's bench target)")
    cache = out / "cache" / "cryoem_refine" / ("quick" if quick else "full")
    cases = (QUICK_CASE,) if quick else FULL_CASES
    load_start = _load_average()
    records = [_case_result(case, cache, resume=not quick) for case in cases]
    for record in records:
        record["metrics"].update(_relion_frame(record))
    metrics: dict[str, float] = dict(records[0]["metrics"])
    figures = _figures(records[0], out)
    if not quick:
        for record in records:
            for name, value in record["metrics"].items():
                metrics[f"{name}_{record['case']['structure']}_snr{record['case']['snr']:g}"] = value
        metrics.update(_summary(records))
        figures.append(_grid_figure(records, out / "cryoem_refine_fsc_grid.png"))
    metrics["load_average_start"] = load_start
    return StudyResult({k: float(v) for k, v in metrics.items()}, _markdown(records, quick, load_start), figures)


def _summary(records: list[dict]) -> dict[str, float]:
    """The targets over all cases: how many are within one Fourier shell of RELION, the worst shell and speed-up."""
    shells = [r["metrics"].get("shell_difference_gt", -math.inf) for r in records]
    speedups = [r["metrics"]["speedup_vs_relion"] for r in records]
    return {"n_cases": len(records), "n_within_one_shell_gt": sum(d >= -1.0 for d in shells),
            "n_better_gt": sum(d > 0.0 for d in shells), "worst_shell_difference_gt": min(shells),
            "min_speedup_vs_relion": min(speedups),
            "geomean_speedup_vs_relion": float(np.exp(np.mean(np.log(speedups)))),
            "n_relion_completed": sum(r["metrics"]["relion_completed"] for r in records),
            "seconds_all_cases": sum(r["metrics"]["seconds_ours"] + r["metrics"]["seconds_relion"] for r in records)}


def _grid_figure(records: list[dict], path: Path) -> str:
    """FSC against the truth (solid) and between half maps (dotted), one panel a case: SNRs down, structures across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structures = list(dict.fromkeys(r["case"]["structure"] for r in records))
    snrs = list(dict.fromkeys(r["case"]["snr"] for r in records))
    fig, axes = plt.subplots(len(snrs), len(structures), figsize=(3.3 * len(structures), 2.7 * len(snrs)),
                             sharex=True, sharey=True, squeeze=False)
    styles = {"ours": ("bioinverse", "tab:blue"), "relion": ("RELION 3.1.3", "black"),
              "trueangles": ("true poses", "tab:green")}
    for r in records:
        ax = axes[snrs.index(r["case"]["snr"]), structures.index(r["case"]["structure"])]
        for key, (label, colour) in styles.items():
            for kind, line in (("gt", "-"), ("half", ":")):
                curve = r["curves"].get(f"{kind}_{key}")
                if curve is not None:
                    ax.plot(curve["frequency"], curve["values"], line, color=colour, lw=1.1,
                            label=label if kind == "gt" else None)
        ax.axhline(0.5, color="0.8", lw=0.6)
        ax.axhline(0.143, color="0.8", lw=0.6, ls="--")
        ax.set_ylim(-0.1, 1.02)
        m = r["metrics"]
        ax.set_title(f"{r['case']['structure']}, SNR {r['case']['snr']:g}: {_f(m['res_gt_ours_A'])} / "
                     f"{_f(m.get('res_gt_relion_A'))} Å", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("spatial frequency (1/Å)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("FSC", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("solid: final map vs ground truth (title: bioinverse / RELION at 0.5); dotted: half maps",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(records: list[dict], quick: bool, load_start: float) -> str:
    head = records[0]
    case, m = head["case"], head["metrics"]
    setup = (
        f"Particles of `{case['structure']}` (MDAnalysisTests {_structures_version()}), box {BOX}, {PIXEL_SIZE} Å/px, "
        f"{case['n']} particles at SNR {case['snr']:g}"
        + (" — fewer particles and a higher SNR than the seed's (0.0012–0.0038), so that RELION finishes within "
           "the quick run's 10 minutes on 2 cores" if quick else
           f" (the first of {len(records)} cases, all in the last section; Kimanius et al. refined 10,000 particles at "
           "SNRs of 0.0012–0.0038, a total signal (particles × SNR) of 12–38 that the full run's 15 and 50 "
           "bracket)")
        + f"; particle diameter {m['particle_diameter_A']:g} Å. Both programs: no poses in the input STAR file; "
        f"initial reference = ground truth low-passed to {INITIAL_RESOLUTION:g} Å, on the particles' greyscale; first "
        f"band {INITIAL_RESOLUTION:g} Å; global search on HEALPix order {HEALPIX_ORDER} (15°, 4608 orientations) × "
        f"offsets within {OFFSET_RANGE:g} px in steps of {OFFSET_STEP:g} px (29 translations); local searches from "
        f"order 3 (7.5°) on; solvent mask of the particle diameter with a {MASK_EDGE_PX}-px cosine edge; 2× padded "
        "Fourier grid; C1. Two cores: RELION as 3 MPI ranks (1 leader, 2 workers × 1 thread), bioinverse in one "
        f"process with {head['torch_threads']} torch threads (OMP_WAIT_POLICY=PASSIVE)."
    )
    load = head["load"]
    machine_load = (
        f"Machine load (1-minute load average): {load_start:.2f} at the start, {load['load_before_ours']:.2f} "
        f"before bioinverse, {load['load_before_relion']:.2f} before RELION, {load['load_after_relion']:.2f} after. "
        "Above 2, other jobs shared the two cores and inflated the wall clocks; the CPU times (user + system, of "
        "all threads and MPI ranks) are less sensitive to that."
    )
    summary = (
        f"Speed-up {m['speedup_vs_relion']:.2f}× in wall clock (RELION / bioinverse), "
        f"{m['cpu_seconds_relion'] / m['cpu_seconds_ours']:.2f}× in CPU time. Fourier shells of bioinverse − RELION "
        f"at FSC 0.5 against the truth: {_f(m.get('shell_difference_gt'))} (≥ −1: within one shell or better); "
        f"for the half-map resolution: {_f(m.get('shell_difference_half'))}. The initial reference resolves "
        f"{_f(m['res_gt_reference_A'])} Å against the truth."
        + ("" if head["relion"]["completed"] else
           " **RELION did not finish within its time limit; its last finished iteration is scored.**")
    )
    rows = [
        ("resolution vs ground truth, FSC 0.5 (Å)", "res_gt_ours_A", "res_gt_relion_A", _f(m["res_gt_trueangles_A"])),
        ("half maps, FSC 0.143 (Å)", "res_half_ours_A", "res_half_relion_A", _f(m["res_half_trueangles_A"])),
        ("resolution the program reports (Å)", "res_reported_ours_A", "res_reported_relion_A", ""),
        ("median angular error (°)", "median_angular_error_deg_ours", "median_angular_error_deg_relion", "0"),
        ("median shift error (px)", "median_shift_error_px_ours", "median_shift_error_px_relion", "0"),
        ("iterations", "iterations_ours", "iterations_relion", ""),
        ("wall clock (s)", "seconds_ours", "seconds_relion", ""),
        ("CPU time (s)", "cpu_seconds_ours", "cpu_seconds_relion", ""),
    ]
    lines = [
        "## Set-up", "", setup, "",
        "RELION command (run in the data folder):", "", "```", head["relion_command"], "```", "",
        "Why these RELION settings:", "", _CHOICES, "", machine_load, "",
        "## Results", "",
        "| | bioinverse | RELION 3.1.3 | true poses |",
        "|---|---|---|---|",
        *[f"| {label} | {_f(m.get(ours))} | {_f(m.get(peer))} | {truth} |" for label, ours, peer, truth in rows],
        "", summary, "",
    ]
    lines += _history_tables(head)
    if not quick and len(records) > 1:
        lines += [
            "## All cases", "",
            ("| case | n | res GT ours / RELION / true poses (Å) | half maps ours / RELION (Å) | median error ours / "
             "RELION (°) | RELION's map rotated by (°) / its error in its own frame (°) | s ours / RELION | speed-up | "
             "shells |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            c, x = r["case"], r["metrics"]
            lines.append(
                f"| {c['structure']} SNR {c['snr']:g} | {c['n']} | {_f(x['res_gt_ours_A'])} / "
                f"{_f(x.get('res_gt_relion_A'))} / {_f(x['res_gt_trueangles_A'])} | {_f(x['res_half_ours_A'])} / "
                f"{_f(x.get('res_half_relion_A'))} | {_f(x['median_angular_error_deg_ours'])} / "
                f"{_f(x.get('median_angular_error_deg_relion'))} | {_f(x.get('frame_rotation_deg_relion'), 1)} / "
                f"{_f(x.get('median_angular_error_deg_relion_own_frame'), 1)} | {_f(x['seconds_ours'], 0)} / "
                f"{_f(x['seconds_relion'], 0)} | {_f(x['speedup_vs_relion'])} | {_f(x.get('shell_difference_gt'))} |")
        summary = _summary(records)
        frame_note = (
            "RELION's first, cross-correlation iteration assigns poses far from the truth (median errors of 45–95° "
            "after it), and the map it then builds need not stay in the reference's frame: the rotation that best "
            "maps the true poses (to their nearest symmetry mate) onto RELION's is the rotation of RELION's whole "
            "map against the truth (`_frame_rotation`). A rotated map loses FSC against the truth however "
            "consistent its poses; once the rotation is removed, what remains is RELION's own pose error. The map "
            "is scored as it is, unrotated, as a user who starts from a reference expects. bioinverse marginalises "
            "over all poses from its first iteration; its errors are in the truth's frame.")
        lines += ["", frame_note, "", (f"bioinverse is within one Fourier shell of RELION or better against the truth in "
                       f"{summary['n_within_one_shell_gt']} of {summary['n_cases']} cases (better in "
                       f"{summary['n_better_gt']}; worst: {_f(summary['worst_shell_difference_gt'])} shells); "
                       f"speed-up {_f(summary['min_speedup_vs_relion'])}× at least, "
                       f"{_f(summary['geomean_speedup_vs_relion'])}× geometric mean; RELION finished "
                       f"{summary['n_relion_completed']} of {summary['n_cases']} runs within its limit. "
                       "Machine load (1-minute average) before bioinverse / before RELION / after RELION, per case: "
                       + "; ".join(f"{r['case']['structure']} SNR {r['case']['snr']:g}: "
                                   f"{r['load']['load_before_ours']:.2f} / {r['load']['load_before_relion']:.2f} / "
                                   f"{r['load']['load_after_relion']:.2f}" for r in records)
                       + ". The average trails by about a minute: near 3 before bioinverse is the previous case's "
                       "RELION (3 ranks), just finished."),
                  "", ("The cases ran one after another, each cached when done; the run time in the heading "
                       "counts only the cases not read from the cache; `seconds_all_cases` is both programs' time over all "
                       "cases."), ""]
    return "\n".join(lines)


_CHOICES = """\
- `--firstiter_cc` (on): the reference is on the particles' greyscale, so RELION's GUI would allow it off, but
  on these particles RELION's first, fully marginalised iteration from the 30-Å reference then lands far from
  the true poses and never recovers (a trial with 600 particles at SNR 0.05: median angular error 96° after
  iteration 1, 30° at the end, 18.7 Å against the truth). With the cross-correlation first iteration it
  converges (7–8 Å). bioinverse has no such first step: its first iteration marginalises over all poses.
- `--oversampling 0`: RELION then evaluates every pose of the 15° × 1-px grid once, as bioinverse does
  (bioinverse has no adaptive oversampling). With RELION's default `--oversampling 1` the significant poses
  are also evaluated at 7.5° and 0.5 px; while posteriors are flat that multiplies the cost of an iteration
  ~10–30× (a trial with 2000 particles at SNR 0.03: 42 minutes estimated for its second iteration).
- `--healpix_order 2 --auto_local_healpix_order 3`: the same global 15° search at first and local searches
  from 7.5° on, as in bioinverse (RELION's default switches to local searches only at order 4; its
  global order-3 iterations evaluate 36,864 orientations per particle).
- `--offset_range 3 --offset_step 1` (pixels): the simulated shifts are within ±2 px per axis; the same grid in
  both programs.
- `--particle_diameter` = the model's diameter + 4 Å (both programs' solvent mask); `--flatten_solvent
  --zero_mask`, `--norm --scale`, `--low_resol_join_halves 40`, `--pad 2`: RELION's auto-refine defaults
  (bioinverse has no norm or scale correction; the simulated particles need none).
- `--j 1` with 3 ranks: 2 workers on the 2 cores, the leader mostly waits (it used ~2 % CPU);
  `--dont_combine_weights_via_disc --pool 30`: RELION's recommended settings on one machine;
  `--random_seed 0` for a reproducible half-set split."""


def _structures_version() -> str:
    from bioinverse.cryoem.structures import MDANALYSISTESTS_VERSION

    return MDANALYSISTESTS_VERSION


def _history_tables(record: dict) -> list[str]:
    lines = [("Per iteration, bioinverse (resolution: its gold-standard FSC 0.143; poses: mean number of poses per "
              "particle kept after pruning to 99.9 % of the posterior):"), "",
             "| it | search | step (°) | band (shells) | resolution (Å) | mean pose change (°) | poses | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["history_ours"]:
        lines.append(f"| {r['iteration']} | {r['search']} | {_f(r['angular_step_deg'], 3)} | "
                     f"{_f(r['band_shells'], 1)} | {_f(r['resolution_A'])} | {_f(r.get('mean_angle_change_deg'))} | "
                     f"{_f(r.get('mean_significant_poses'), 0)} | {_f(r.get('seconds'), 1)} |")
    lines += ["", ("Per iteration, RELION (resolution, image size and accuracy from its half-1 model; seconds from "
                   "the iteration files' time stamps, iteration 1 including start-up):"), "",
              "| it | HEALPix order | resolution (Å) | image size (px) | accuracy rot (°) | median error vs truth (°) | s |",
              "|---|---|---|---|---|---|---|"]
    for r in record["relion"]["history"]:
        lines.append(f"| {r['iteration']} | {r.get('healpix_order', '—')} | {_f(r.get('resolution_A'))} | "
                     f"{r.get('current_image_size', '—')} | {_f(r.get('accuracy_rotations_deg'))} | "
                     f"{_f(r.get('median_angular_error_deg'))} | {_f(r.get('seconds'), 1)} |")
    lines.append("")
    return lines
