"""RELION 3.1 auto-refine run as its users run it, and its outputs read back into NumPy.

* :func:`refine_command` builds the ``mpirun … relion_refine_mpi --auto_refine`` command line;
* :func:`run_refine` runs it under a wall-clock limit (the whole MPI process group is ended when the limit
  is reached) and times it;
* :func:`read_poses` reads ``run_data.star`` and puts RELION's particles, which it reorders by half set,
  back in the order of the input's image names;
* :func:`read_model` reads the FSC and resolution of a ``run_model.star``;
* :func:`history` gives one record per iteration from the ``run_itNNN_*`` files (resolution, sampling,
  accuracy, and the iteration's duration from the files' modification times);
* :func:`final_outputs` locates the final maps, or those of the last finished iteration when the run was
  stopped early.

Smoke run: ``python -m benchmarks._relion`` (needs RELION: ``apt-get install relion``).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RelionRun", "available", "final_outputs", "history", "read_model", "read_poses", "refine_command",
           "run_refine"]


def available() -> bool:
    """True when ``relion_refine_mpi`` and ``mpirun`` are on the PATH."""
    return shutil.which("relion_refine_mpi") is not None and shutil.which("mpirun") is not None


def refine_command(
    star: str,
    reference: str,
    out_prefix: str,
    *,
    particle_diameter: float,
    healpix_order: int,
    offset_range: float,
    offset_step: float,
    ini_high: float,
    firstiter_cc: bool,
    oversampling: int = 1,
    auto_local_healpix_order: int = 4,
    ranks: int = 3,
    threads: int = 1,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The auto-refine command line; paths are taken relative to the folder the command runs in.

    ``ranks`` MPI processes: one leader that only coordinates and ``ranks − 1`` workers with ``threads``
    threads each. Offsets are in pixels, the diameter and resolutions in Å (RELION's units).
    """
    command = [
        "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), "relion_refine_mpi",
        "--o", out_prefix, "--auto_refine", "--split_random_halves", "--i", star, "--ref", reference,
        "--ini_high", f"{ini_high:g}", "--particle_diameter", f"{particle_diameter:g}", "--ctf",
        "--flatten_solvent", "--zero_mask", "--oversampling", str(oversampling), "--healpix_order", str(healpix_order),
        "--auto_local_healpix_order", str(auto_local_healpix_order), "--offset_range", f"{offset_range:g}",
        "--offset_step", f"{offset_step:g}", "--sym", "C1", "--low_resol_join_halves", "40", "--norm",
        "--scale", "--j", str(threads), "--pool", "30", "--pad", "2", "--dont_combine_weights_via_disc",
        "--random_seed", "0",
    ]
    if firstiter_cc:
        command.append("--firstiter_cc")
    return command + list(extra)


@dataclass
class RelionRun:
    """A finished (or stopped) RELION run."""

    command: list[str]
    folder: Path
    out_prefix: str
    seconds: float
    returncode: int | None
    timed_out: bool
    log: Path
    started: float = field(default=0.0)  # time.time() at launch, to time iterations from file stamps
    cpu_seconds: float = float("nan")  # user + system time of mpirun and its ranks

    @property
    def completed(self) -> bool:
        return not self.timed_out and self.returncode == 0 and (self.folder / f"{self.out_prefix}_data.star").exists()


def run_refine(command: list[str], folder: Path, out_prefix: str, time_limit: float) -> RelionRun:
    """Run ``command`` in ``folder`` with a wall-clock limit, output to ``folder/<out_prefix>.log``.

    The MPI launcher and its ranks run in a session of their own, so the limit ends all of them and
    nothing else. The time is the wall clock of the whole command: MPI start-up, reading the particles,
    every iteration and writing the outputs. The CPU time is that of mpirun and its ranks (from the
    kernel's accounting of waited-for children; sampled from /proc once a second for a run that is
    stopped at the limit, whose ranks are never waited for by mpirun).
    """
    folder = Path(folder)
    log = folder / f"{out_prefix}.log"
    (folder / out_prefix).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1")
    started = time.time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    timed_out = False
    sampled: dict[int, float] = {}
    with open(log, "w") as fh:
        process = subprocess.Popen(command, cwd=folder, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        while True:
            try:
                returncode = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                sampled.update(_session_cpu(process.pid))
                if time.perf_counter() - start > time_limit:
                    timed_out = True
                    _end_group(process)
                    returncode = process.returncode
                    break
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if timed_out:
        cpu = sum(sampled.values())
    return RelionRun(command, folder, out_prefix, seconds, returncode, timed_out, log, started, cpu)


def _session_cpu(session: int) -> dict[int, float]:
    """CPU seconds (user + system) of every live process of a session, by process id."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session (index 3), …, utime (11), stime (12).
        if int(fields[3]) == session:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def _end_group(process: subprocess.Popen) -> None:
    """Stop the process group this module started: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_star(path: Path) -> dict:
    import starfile

    return starfile.read(path, always_dict=True)


def _image_key(name: str) -> tuple[int, str]:
    """``"000012@stack.mrcs"`` and ``"12@./stack.mrcs"`` name the same image."""
    number, _, stack = str(name).partition("@")
    return int(number), Path(stack).name


def read_poses(data_star: Path, image_names: list[str]) -> dict[str, np.ndarray]:
    """Poses from a RELION ``*_data.star`` in the order of ``image_names`` (RELION sorts by half set).

    Returns
    -------
    dict
        ``angles`` (n, 3) degrees, ``origins`` (n, 2) Å (rlnOriginXAngst, rlnOriginYAngst), ``half`` (n,)
        (rlnRandomSubset), ``max_probability`` (n,), ``norm`` (n,) (rlnNormCorrection, 1 when absent).
    """
    table = _read_star(Path(data_star))["particles"]
    row_of = {_image_key(name): k for k, name in enumerate(table["rlnImageName"])}
    missing = [name for name in image_names if _image_key(name) not in row_of]
    if missing:
        raise ValueError(f"{data_star} lacks {len(missing)} of the particles, e.g. {missing[0]}")
    order = np.array([row_of[_image_key(name)] for name in image_names])

    def column(label, default=None):
        if label in table:
            return np.asarray(table[label], dtype=np.float64)[order]
        return np.full(len(order), default, dtype=np.float64)

    return {
        "angles": np.column_stack([column(c) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]),
        "origins": np.column_stack([column(c, 0.0) for c in ("rlnOriginXAngst", "rlnOriginYAngst")]),
        "half": column("rlnRandomSubset", 0).astype(np.int64),
        "max_probability": column("rlnMaxValueProbDistribution", np.nan),
        "norm": column("rlnNormCorrection", 1.0),
    }


def read_model(model_star: Path) -> dict:
    """Resolution (Å), gold-standard FSC per shell and accuracies from a ``*_model.star``."""
    blocks = _read_star(Path(model_star))
    general = blocks["model_general"]
    classes = blocks.get("model_classes")
    shells = blocks.get("model_class_1")
    out = {"resolution_A": float(general["rlnCurrentResolution"]),
           "current_image_size": int(general["rlnCurrentImageSize"]),
           "average_pmax": float(general.get("rlnAveragePmax", np.nan))}
    if classes is not None and len(classes):
        out["accuracy_rotations_deg"] = float(classes["rlnAccuracyRotations"].iloc[0])
        out["accuracy_translations_A"] = float(classes["rlnAccuracyTranslationsAngst"].iloc[0])
    if shells is not None and "rlnGoldStandardFsc" in shells:
        out["fsc"] = np.asarray(shells["rlnGoldStandardFsc"], dtype=np.float64)
        out["frequency"] = np.asarray(shells["rlnResolution"], dtype=np.float64)
    return out


def history(folder: Path, out_prefix: str, started: float) -> list[dict]:
    """One record per finished iteration: resolution, sampling and seconds since the previous one.

    An iteration is finished when its ``_optimiser.star`` exists (RELION writes it last); its duration is
    the difference of the modification times of consecutive optimiser files (the first one from the
    launch, so it includes start-up and the initial noise estimate).
    """
    folder = Path(folder)
    base = Path(out_prefix).name
    pattern = re.compile(re.escape(base) + r"_it(\d{3})_optimiser\.star$")
    directory = (folder / out_prefix).parent
    iterations = sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name)))
    records, previous = [], started
    for it in iterations:
        stem = directory / f"{base}_it{it:03d}"
        if it == 0:  # the initial noise estimate: counted in iteration 1, as start-up is
            continue
        stamp = Path(f"{stem}_optimiser.star").stat().st_mtime
        record = {"iteration": it, "seconds": stamp - previous}
        previous = stamp
        model = Path(f"{stem}_half1_model.star")
        if model.exists():
            info = read_model(model)
            record.update({k: info[k] for k in ("resolution_A", "current_image_size", "average_pmax",
                                                 "accuracy_rotations_deg", "accuracy_translations_A") if k in info})
        sampling = Path(f"{stem}_sampling.star")
        if sampling.exists():
            general = _read_star(sampling)["sampling_general"]
            record["healpix_order"] = int(general["rlnHealpixOrder"])
            record["psi_step_deg"] = float(general["rlnPsiStep"])
            record["offset_step_A"] = float(general["rlnOffsetStep"])
            record["offset_range_A"] = float(general["rlnOffsetRange"])
        records.append(record)
    return records


def final_outputs(folder: Path, out_prefix: str) -> dict[str, Path] | None:
    """Paths of the outputs to score: the final ones, else the last finished iteration's (or None).

    Keys: ``data`` (particles STAR), ``half1``, ``half2`` (half maps), ``final`` (map from all particles;
    for an unfinished run, the two half maps' average is made by the caller), ``model`` and ``final_run``
    (bool as a path-less flag: True when these are the run's final outputs).
    """
    folder = Path(folder)
    prefix = folder / out_prefix
    final = {"data": Path(f"{prefix}_data.star"), "half1": Path(f"{prefix}_half1_class001_unfil.mrc"),
             "half2": Path(f"{prefix}_half2_class001_unfil.mrc"), "final": Path(f"{prefix}_class001.mrc"),
             "model": Path(f"{prefix}_model.star")}
    if all(p.exists() for p in final.values()):
        return {**final, "final_run": True}
    records = [r for r in history(folder, out_prefix, 0.0) if r["iteration"] > 0]
    if not records:
        return None
    stem = f"{prefix}_it{records[-1]['iteration']:03d}"
    last = {"data": Path(f"{stem}_data.star"), "half1": Path(f"{stem}_half1_class001.mrc"),
            "half2": Path(f"{stem}_half2_class001.mrc"), "final": None, "model": Path(f"{stem}_half1_model.star")}
    if not all(p.exists() for k, p in last.items() if p is not None):
        return None
    return {**last, "final_run": False}


def _smoke() -> None:
    """Refine 300 simulated particles of a blob for two minutes and print what was read back."""
    import tempfile

    from bioinverse.cryoem.simulate import simulate_particles, write_simulation

    if not available():
        print("RELION is not installed (apt-get install relion)")
        return
    blob = np.zeros((32, 32, 32), np.float32)
    blob[10:22, 13:19, 8:24] = 1.0
    blob[14:18, 8:13, 14:18] = 1.0
    sim = simulate_particles(blob, 3.0, n=300, snr=0.5, seed=0)
    folder = Path(tempfile.mkdtemp())
    write_simulation(sim, folder)
    command = refine_command("particles.star", "reference.mrc", "relion/run", particle_diameter=80,
                             healpix_order=2, offset_range=3, offset_step=1, ini_high=30, firstiter_cc=True)
    run = run_refine(command, folder, "relion/run", time_limit=120)
    print(f"{run.seconds:.1f} s, return code {run.returncode}, timed out {run.timed_out}")
    for record in history(folder, "relion/run", run.started):
        print(record)
    outputs = final_outputs(folder, "relion/run")
    if outputs is not None:
        poses = read_poses(outputs["data"], sim.particles.image_names)
        print("angles of particle 1:", poses["angles"][0], "half", poses["half"][0])


if __name__ == "__main__":
    _smoke()
