"""Learned priors: RED and confidence-weighted RED against the Gaussian prior, in our refinement and in RELION.

Claim (seed 002 §4): replacing the Gaussian prior's M-step (eq. 11) by eq. 17 with a denoiser trained on
protein maps gives a better map against the ground truth in every case, and confidence weighting (CW-RED)
removes the over-estimation of the half-map resolution that plain RED shows on hard cases.

Data: test structures that no denoiser was trained on (MDAnalysisTests' ``adk_open``, ``4E43``, ``1hvr`` and
the progesterone-receptor domain ``1a28``; the training chains are the ``data/dssp`` ones) → Coulomb
potential (box 64, 1.5 Å/px) → particles with CTF (defocus 0.5–2 µm), shifts of up to ±2 px and white noise
at four SNRs from easy to hard, as in :mod:`benchmarks.cryoem_refine`. Every refinement starts from the
truth low-passed to 30 Å, with the same settings; only the prior differs:

* ``gaussian``: eq. 11, RELION's prior;
* ``red``: eq. 17 with λ = 1 and the shipped denoiser (:func:`bioinverse.cryoem.denoiser.load_denoiser`);
* ``cwred``: eq. 17 with λ from the nominal resolution (0 worse than 10 Å, 1 better than 4.5 Å);
* ``trueangles``: one reconstruction from the true poses (Gaussian prior), the upper bound.

Scoring: every map times the same soft spherical mask (the particle diameter, 5-pixel cosine edge).
``res_gt_<prior>_<case>`` is the FSC-0.5 resolution of the final map against the ground truth;
``res_half_<prior>_<case>`` the gold-standard half-map FSC-0.143 resolution the refinement reports (its
halves compared before the prior acts on them, as RELION compares them), the true-pose halves for
``trueangles``. ``overest_<prior>_A`` is the mean over cases of max(0, res_gt − res_half): how much better
the half maps claim to be than the map is; ``overest_max_shells_<prior>`` its worst case in Fourier shells.
``<prior>_wins_vs_gaussian`` counts the cases whose ground-truth resolution beats the Gaussian prior's
(both at Nyquist counts as a win). Under real RELION 3.1.3 (full run, two cases): ``res_gt_relion_<case>``
(plain auto-refine) and ``res_gt_relion_cwred_<case>`` (the same command with ``--external_reconstruct``
and ``bioinverse cryoem relion-external --prior cwred``).

The single-pass figure (the seed's Fig. 1c): the denoiser applied once to every unregularised map B / K of
the Gaussian refinements of the test cases, the ratio of its L1 and L2 distances to the truth after and
before, against the nominal resolution of the iteration.

The full run (4 structures × SNR 0.5, 0.1, 0.04, 0.015 × 500 particles; RELION on adk_open and 1hvr at
SNR 0.04) takes about an hour and a half on two cores and is resumable per case
(``<out>/cache/cryoem_red/full/<case>.json``) and per RELION run. 500 particles, where the seed used
thousands, keep it there; at these SNRs they still span 3.6 Å (near Nyquist) to worse than 10 Å. The
quick run is two structures × two SNRs with 300 particles and no RELION.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import _relion
from benchmarks._harness import StudyResult
from benchmarks.cryoem_refine import (  # the same particles, mask and search as the refinement study
    AUTO_LOCAL_HEALPIX_ORDER,
    BOX,
    FIRSTITER_CC,
    HEALPIX_ORDER,
    INITIAL_RESOLUTION,
    MASK_EDGE_PX,
    OFFSET_RANGE,
    OFFSET_STEP,
    OVERSAMPLING,
    PIXEL_SIZE,
    Case,
    _curve_dict,
    _shell,
    _simulate,
)

TITLE = "Cryo-EM learned prior: RED and CW-RED vs the Gaussian prior (our refinement and RELION 3.1.3)"

PRIORS = ("gaussian", "red", "cwred")
STRUCTURES_FULL = ("adk_open", "4E43", "1hvr", "1a28")
SNRS_FULL = (0.5, 0.1, 0.04, 0.015)
N_FULL = 500
STRUCTURES_QUICK = ("adk_open", "1hvr")
SNRS_QUICK = (0.1, 0.015)
N_QUICK = 300
RELION_CASES = (("adk_open", 0.04), ("1hvr", 0.04))
RELION_LIMIT = 4 * 3600.0
NYQUIST = 2 * PIXEL_SIZE


def _tag(structure: str, snr: float) -> str:
    return f"{structure}_snr{snr:g}"


def _refine(sim, diameter: float, prior: str, denoiser, observer=None):
    from bioinverse.cryoem.priors import Prior
    from bioinverse.cryoem.refine import RefineConfig, refine

    config = RefineConfig(particle_diameter=diameter, initial_resolution=INITIAL_RESOLUTION,
                          healpix_order=HEALPIX_ORDER, offset_range=OFFSET_RANGE, offset_step=OFFSET_STEP,
                          mask_edge=MASK_EDGE_PX * PIXEL_SIZE, prior=Prior(prior))
    start = time.perf_counter()
    result = refine(sim.images, PIXEL_SIZE, sim.particles.ctf_parameters()._asdict(), sim.reference, config,
                    denoiser=denoiser if prior != "gaussian" else None, observer=observer)
    return result, time.perf_counter() - start


def _single_pass(records: list[dict], truth: np.ndarray, denoiser) -> dict:
    """The seed's Fig. 1c on this case: distance to the truth after / before one pass of the denoiser."""
    from bioinverse.cryoem.denoiser import single_pass_ratio

    maps = np.stack([record["map"] for record in records])
    truths = np.broadcast_to(truth, maps.shape)
    return {"resolution_A": [record["resolution_A"] for record in records],
            "ratio_l1": single_pass_ratio(denoiser, maps, truths, p=1).tolist(),
            "ratio_l2": single_pass_ratio(denoiser, maps, truths, p=2).tolist()}


def _relion_runs(case: Case, folder: Path, diameter: float, denoiser_path: str | None, truth, masked_fsc,
                 labels: tuple[str, ...] = ("relion", "relion_cwred")) -> dict:
    """Plain RELION auto-refine and the same with our CW-RED through --external_reconstruct.

    Each run's record is cached in ``<folder>/<label>.json``, so a run that finished is not repeated.
    """
    from bioinverse.cryoem.io import read_map

    executable = f"{shlex.quote(sys.executable)} -m bioinverse cryoem relion-external --prior cwred"
    if denoiser_path is not None:
        executable += f" --denoiser {shlex.quote(denoiser_path)}"
    from bioinverse.io import write_json

    out = {}
    for label, extra in (("relion", ()), ("relion_cwred", ("--external_reconstruct",))):
        cached = folder / f"{label}.json"
        if cached.exists():
            out[label] = json.loads(cached.read_text())
            continue
        if label not in labels:
            continue
        prefix = f"{label}/run"
        command = _relion.refine_command("particles_noposes.star", "reference.mrc", prefix,
                                         particle_diameter=diameter, healpix_order=HEALPIX_ORDER,
                                         offset_range=OFFSET_RANGE, offset_step=OFFSET_STEP,
                                         ini_high=INITIAL_RESOLUTION, firstiter_cc=FIRSTITER_CC,
                                         oversampling=OVERSAMPLING, auto_local_healpix_order=AUTO_LOCAL_HEALPIX_ORDER,
                                         extra=extra)
        previous = os.environ.get("RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE")
        os.environ["RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE"] = executable
        try:
            run = _relion.run_refine(command, folder, prefix, RELION_LIMIT)
        finally:
            if previous is None:
                os.environ.pop("RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE", None)
            else:
                os.environ["RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE"] = previous
        record = {"completed": run.completed, "seconds": run.seconds, "command": shlex.join(command)}
        outputs = _relion.final_outputs(folder, prefix)
        if outputs is not None:
            half1, half2 = read_map(outputs["half1"])[0], read_map(outputs["half2"])[0]
            final = read_map(outputs["final"])[0] if outputs["final"] is not None else 0.5 * (half1 + half2)
            gt, half = masked_fsc(final, truth), masked_fsc(half1, half2)
            model = _relion.read_model(outputs["model"])
            record.update({"res_gt_A": gt.resolution(0.5), "res_half_A": half.resolution(0.143),
                           "res_reported_A": model["resolution_A"], "curve_gt": _curve_dict(gt), "curve_half": _curve_dict(half)})
        write_json(cached, _finite(record))
        out[label] = record
    return out


def _prepare(structure: str, snr: float, n: int, folder: Path):
    """The case's particles (written for RELION too), its diameter, truth and the masked FSC that scores it."""
    from bioinverse.cryoem.refine import soft_sphere_mask
    from bioinverse.fourier import fsc

    folder.mkdir(parents=True, exist_ok=True)
    case = Case(structure, snr, n, relion_limit=RELION_LIMIT)
    sim, _, diameter, _ = _simulate(case, folder)
    mask = soft_sphere_mask(BOX, 0.5 * diameter / PIXEL_SIZE, MASK_EDGE_PX)

    def masked_fsc(a, b):
        return fsc(np.asarray(a, np.float64) * mask, np.asarray(b, np.float64) * mask, PIXEL_SIZE)

    return case, sim, diameter, masked_fsc


def _run_priors(structure: str, snr: float, n: int, folder: Path, denoiser) -> dict:
    from bioinverse.cryoem.io import write_map
    from bioinverse.cryoem.priors import nominal_resolution
    from bioinverse.cryoem.refine import reconstruct_with_poses

    _, sim, diameter, masked_fsc = _prepare(structure, snr, n, folder)
    truth = sim.ground_truth
    record = {"structure": structure, "snr": snr, "n": n, "diameter_A": diameter, "priors": {}}
    for prior in PRIORS:
        seen: list[dict] = []
        result, seconds = _refine(sim, diameter, prior, denoiser, seen.append if prior == "gaussian" else None)
        write_map(folder / f"{prior}_final.mrc", result.final_map, PIXEL_SIZE)
        gt = masked_fsc(result.final_map, truth)
        record["priors"][prior] = {
            "res_gt_A": gt.resolution(0.5), "res_half_A": float(result.resolution), "seconds": seconds,
            "iterations": len(result.history), "curve_gt": _curve_dict(gt),
            "curve_half": {"values": result.fsc.tolist()},
            "prior_weights": [h["prior_weight"] for h in result.history],
        }
        if prior == "gaussian":
            record["single_pass"] = _single_pass(seen, truth, denoiser)
        print(f"   {_tag(structure, snr)} {prior}: {gt.resolution(0.5):.2f} Å vs truth, half maps "
              f"{result.resolution:.2f} Å, {seconds:.0f} s", flush=True)
    _, final, true_fsc = reconstruct_with_poses(sim.images, PIXEL_SIZE, sim.particles.ctf_parameters()._asdict(),
                                                sim.particles.angles, sim.shifts)
    write_map(folder / "trueangles_final.mrc", final, PIXEL_SIZE)
    gt = masked_fsc(final, truth)
    record["priors"]["trueangles"] = {"res_gt_A": gt.resolution(0.5),
                                      "res_half_A": nominal_resolution(true_fsc, BOX, PIXEL_SIZE),
                                      "curve_gt": _curve_dict(gt), "curve_half": {"values": true_fsc.tolist()}}
    return record


def _run_relion(structure: str, snr: float, n: int, folder: Path, denoiser_path,
                labels: tuple[str, ...] = ("relion", "relion_cwred")) -> dict:
    case, sim, diameter, masked_fsc = _prepare(structure, snr, n, folder)
    return _relion_runs(case, folder, diameter, denoiser_path, sim.ground_truth, masked_fsc, labels)


def _case_record(structure, snr, n, cache: Path, resume: bool, denoiser, denoiser_path, with_relion) -> dict:
    """The case's refinements (cached in ``<cache>/<case>.json``) and, when asked, its RELION runs."""
    from bioinverse.io import write_json

    path = cache / f"{_tag(structure, snr)}_n{n}.json"
    folder = cache / f"{_tag(structure, snr)}_n{n}"
    if resume and path.exists():
        record = json.loads(path.read_text())
        print(f"   {_tag(structure, snr)}: refinements cached in {path}", flush=True)
    else:
        record = _run_priors(structure, snr, n, folder, denoiser)
        write_json(path, _finite(record))
    if with_relion and "relion" not in record:
        record["relion"] = _run_relion(structure, snr, n, folder, denoiser_path)
        write_json(path, _finite(record))
    return record


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _res(value) -> float:
    return math.inf if value is None else float(value)


def _metrics(records: list[dict], denoiser) -> dict[str, float]:
    metrics: dict[str, float] = {"n_cases": len(records)}
    wins = {prior: 0 for prior in ("red", "cwred")}
    overest = {prior: [] for prior in (*PRIORS, "trueangles")}
    for record in records:
        tag = _tag(record["structure"], record["snr"])
        priors = record["priors"]
        for prior, values in priors.items():
            gt, half = _res(values["res_gt_A"]), _res(values["res_half_A"])
            metrics[f"res_gt_{prior}_{tag}"] = gt
            metrics[f"res_half_{prior}_{tag}"] = half
            overest[prior].append((max(0.0, gt - half) if math.isfinite(gt) else 0.0,
                                   max(0.0, _shell(half) - _shell(gt))))
        baseline = _res(priors["gaussian"]["res_gt_A"])
        for prior in wins:
            ours = _res(priors[prior]["res_gt_A"])
            at_nyquist = abs(ours - NYQUIST) < 1e-6 and abs(baseline - NYQUIST) < 1e-6
            wins[prior] += int(ours < baseline or at_nyquist)
        for label, values in record.get("relion", {}).items():
            if "res_gt_A" in values:
                metrics[f"res_gt_{label}_{tag}"] = _res(values["res_gt_A"])
                metrics[f"res_half_{label}_{tag}"] = _res(values["res_half_A"])
                metrics[f"seconds_{label}_{tag}"] = values["seconds"]
    for prior, count in wins.items():
        metrics[f"{prior}_wins_vs_gaussian"] = count
    for prior, values in overest.items():
        metrics[f"overest_{prior}_A"] = float(np.mean([v[0] for v in values]))
        metrics[f"overest_max_shells_{prior}"] = float(np.max([v[1] for v in values]))
    for prior in PRIORS:
        metrics[f"seconds_{prior}"] = float(sum(r["priors"][prior]["seconds"] for r in records))
    record = denoiser.record
    metrics["denoiser_train_s"] = float(record.get("train_seconds", math.nan))
    metrics["denoiser_training_maps"] = float(record.get("n_pairs", math.nan))
    return metrics


def run(quick: bool, out: Path) -> StudyResult:
    from bioinverse.cryoem.denoiser import load_denoiser

    denoiser_path = os.environ.get("BIOINVERSE_DENOISER")  # another denoiser than the shipped one, if set
    denoiser = load_denoiser(denoiser_path)
    structures, snrs, n = (STRUCTURES_QUICK, SNRS_QUICK, N_QUICK) if quick else (STRUCTURES_FULL, SNRS_FULL, N_FULL)
    with_relion = not quick and _relion.available()
    cache = out / "cache" / "cryoem_red" / ("quick" if quick else "full")
    records = []
    for snr in snrs:
        for structure in structures:
            relion_here = with_relion and (structure, snr) in RELION_CASES
            records.append(_case_record(structure, snr, n, cache, not quick, denoiser, denoiser_path, relion_here))
    metrics = _metrics(records, denoiser)
    figures = _figures(records, structures, snrs, cache, out)
    return StudyResult(metrics, _markdown(records, metrics, quick), figures)


# --------------------------------------------------------------------------------------------------
# Figures and text

_COLOURS = {"gaussian": "black", "red": "tab:purple", "cwred": "tab:red", "trueangles": "0.6",
            "relion": "tab:blue", "relion_cwred": "tab:orange"}


def _figures(records, structures, snrs, cache: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bioinverse.cryoem.figures import slices_figure
    from bioinverse.cryoem.io import read_map

    by_case = {(r["structure"], r["snr"]): r for r in records}
    frequency = np.arange(BOX // 2 + 1) / (BOX * PIXEL_SIZE)
    fig, axes = plt.subplots(len(snrs), len(structures), figsize=(3.2 * len(structures), 2.6 * len(snrs)),
                             sharex=True, sharey=True, squeeze=False)
    for i, snr in enumerate(snrs):
        for j, structure in enumerate(structures):
            ax = axes[i, j]
            record = by_case[(structure, snr)]
            for prior, values in record["priors"].items():
                colour = _COLOURS[prior]
                ax.plot(frequency, values["curve_gt"]["values"], color=colour, lw=1.2, label=f"{prior} vs truth")
                ax.plot(frequency, values["curve_half"]["values"], color=colour, lw=0.9, ls=":")
            for label, values in record.get("relion", {}).items():
                if "curve_gt" in values:
                    ax.plot(frequency, values["curve_gt"]["values"], color=_COLOURS[label], lw=1.2,
                            label=f"{label.replace('_', ' + ')} vs truth")
            ax.axhline(0.5, color="0.8", lw=0.6)
            ax.axhline(0.143, color="0.8", lw=0.6, ls="--")
            ax.set_ylim(-0.1, 1.02)
            if i == 0:
                ax.set_title(structure, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"SNR {snr:g}\nFSC", fontsize=8)
            if i == len(snrs) - 1:
                ax.set_xlabel("spatial frequency (1/Å)", fontsize=8)
    legend = {}  # the RELION curves are only in the panels of the cases RELION ran
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("solid: final map vs ground truth; dotted: gold-standard half maps", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    grid_path = out / "cryoem_red_fsc_grid.png"
    fig.savefig(grid_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "ratio_l1", "L1"), (axes[1], "ratio_l2", "L2")):
        res = np.array([v for r in records for v in r["single_pass"]["resolution_A"]], dtype=float)
        ratio = np.array([v for r in records for v in r["single_pass"][key]], dtype=float)
        ok = np.isfinite(res) & np.isfinite(ratio)
        ax.scatter(res[ok], ratio[ok], s=6, color="0.5", alpha=0.6)
        edges = np.array([3, 4, 4.5, 5, 6, 7, 8, 10, 12, 15, 20, 30])
        centres, means = [], []
        for lo, hi in itertools.pairwise(edges):
            inside = ok & (res >= lo) & (res < hi)
            if inside.any():
                centres.append(0.5 * (lo + hi))
                means.append(ratio[inside].mean())
        ax.plot(centres, means, "o-", color="tab:red", label="mean per bin")
        ax.axhline(1.0, color="black", lw=0.7)
        ax.axvline(10.0, color="0.7", ls="--", lw=0.7)
        ax.axvline(4.5, color="0.7", ls="--", lw=0.7)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("nominal resolution (Å)")
        ax.set_title(f"{title}: ‖f(x̃) − x‖ / ‖x̃ − x‖", fontsize=9)
    axes[0].set_ylabel("after / before denoising")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    single_path = out / "cryoem_red_single_pass.png"
    fig.savefig(single_path, dpi=110)
    plt.close(fig)

    hardest = by_case[(structures[-1], snrs[-1])]
    folder = cache / f"{_tag(hardest['structure'], hardest['snr'])}_n{hardest['n']}"
    maps = {"ground truth": read_map(folder / "ground_truth.mrc")[0]}
    for prior in (*PRIORS, "trueangles"):
        maps[prior] = read_map(folder / f"{prior}_final.mrc")[0]
    slices = slices_figure(maps, out / "cryoem_red_slices.png")
    return [str(grid_path), str(single_path), str(slices)]


def _f(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _markdown(records, metrics, quick: bool) -> str:
    lines = ["## Resolution against the ground truth (FSC 0.5) / reported half-map resolution (FSC 0.143), Å", "",
             "| case | Gaussian | RED | CW-RED | true poses |", "|---|---|---|---|---|"]
    for r in records:
        p = r["priors"]
        cells = [f"{_f(p[k]['res_gt_A'])} / {_f(p[k]['res_half_A'])}" for k in (*PRIORS, "trueangles")]
        lines.append(f"| {r['structure']}, SNR {r['snr']:g}, {r['n']} particles | " + " | ".join(cells) + " |")
    lines += ["", (f"RED beats the Gaussian prior in {int(metrics['red_wins_vs_gaussian'])} of {len(records)} cases, "
                   f"CW-RED in {int(metrics['cwred_wins_vs_gaussian'])}. Mean over-estimation of the half-map "
                   f"resolution: Gaussian {_f(metrics['overest_gaussian_A'])} Å, RED {_f(metrics['overest_red_A'])} Å, "
                   f"CW-RED {_f(metrics['overest_cwred_A'])} Å (worst case "
                   f"{_f(metrics['overest_max_shells_cwred'], 1)} shells).")]
    relion = [r for r in records if r.get("relion")]
    if relion:
        lines += ["", "## Inside RELION 3.1.3", "", "| case | RELION | RELION + our CW-RED |", "|---|---|---|"]
        for r in relion:
            plain, ours = r["relion"].get("relion", {}), r["relion"].get("relion_cwred", {})
            lines.append(f"| {r['structure']}, SNR {r['snr']:g} | {_f(plain.get('res_gt_A'))} / "
                         f"{_f(plain.get('res_half_A'))} ({_f(plain.get('seconds'), 0)} s) | "
                         f"{_f(ours.get('res_gt_A'))} / {_f(ours.get('res_half_A'))} ({_f(ours.get('seconds'), 0)} s) |")
    lines += ["", (f"Denoiser: {_f(metrics['denoiser_training_maps'], 0)} training maps, "
                   f"{_f(metrics['denoiser_train_s'], 0)} s of training.")]
    if quick:
        lines += ["", "Quick run: two structures × two SNRs, fewer particles, no RELION."]
    return "\n".join(lines)

