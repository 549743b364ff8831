"""q-space deep learning (q-DL) against classical DKI and NODDI fits, and against dipy and AMICO.

Reproduces the claim of Golkov et al. (2016): scalar microstructure maps predicted by a network
from a 12× shorter scan are as accurate as a model fit on the full scan.

Simulated part (:func:`bioinverse.dmri.phantom.simulate_phantom`): two subjects (seeds 1 and 2)
at SNR 20 — multi-tensor tissue for DKI (its exact cumulant tensors are the truth, and a DKI fit
at b ≤ 3000 can approach them), NODDI tissue for NODDI (the generating parameters are the truth); the network is trained on subject 1 and tested on subject 2; every error is measured
against subject 2's exact ground truth, over white and grey matter (CSF has no tissue
microstructure to measure). DKI on the three-shell protocol (148 DWIs), NODDI on the 99-DWI
protocol of Zhang et al. (2012). As in the paper, the network's training targets are the
classical fit of the FULL training scan (``qdl``); the ``qdlgt`` variants train on the phantom's
ground truth instead, which only a simulation can offer. ODI is scored in voxels with a single
bundle, where a single-Watson ODI exists.

Peers in the same run on the same voxels: dipy's WLS DKI (MK, RK, KFA) and dmri-amico's NODDI.

Real part: dipy's bundled ``small_101D`` scan (600 voxels, 102 volumes, b ≤ 4100 s/mm²). The
reference is our DKI fit on all 102 volumes; the network is trained on half of the voxels
(x < 3) from a 12-volume subset, with the reference of those voxels as targets, and tested on the
other half; DKI fits on 24 and 32 volumes of the test voxels are the classical comparison.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks._harness import StudyResult
from bioinverse.dmri.acquisition import noddi_protocol, subsample_pattern, three_shell_protocol
from bioinverse.dmri.dki import DKIModel
from bioinverse.dmri.figures import maps_figure, rmse_curve_figure
from bioinverse.dmri.noddi import NODDIModel
from bioinverse.dmri.phantom import simulate_phantom
from bioinverse.dmri.qspace import QSpaceNet, qdl_train_config
from bioinverse.metrics import percent_within, rmse

TITLE = "q-space deep learning vs classical DKI / NODDI fitting (dipy, AMICO)"

SNR = 20.0
TRAIN_SEED, TEST_SEED = 1, 2
DKI_MEASURES = ("rk", "kfa", "mk")
NODDI_MEASURES = ("odi", "icvf")
TOLERANCE = {"rk": 0.5, "kfa": 0.3, "mk": 0.5, "odi": 0.3, "icvf": 0.3}
CURVE_DWIS = (8, 12, 16, 24, 32, 64)
MIN_DKI_VOLUMES = 22


def _train_predict(train, test, pattern, targets, names, max_epochs, seed=0):
    """Train q-DL on ``train`` voxels (subsampled by ``pattern``) and predict ``test`` voxels."""
    scheme = train["gtab"].subset(pattern)
    net = QSpaceNet(scheme, outputs=list(names), config=qdl_train_config(max_epochs, progress=False), seed=seed)
    start = time.perf_counter()
    net.fit(train["signals"], train["gtab"], targets)
    seconds = time.perf_counter() - start
    return net, net.predict(test["signals"], test["gtab"]), seconds


def _subject(gtab, seed, shape, tissue_model):
    p = simulate_phantom(gtab, snr=SNR, seed=seed, shape=shape, tissue_model=tissue_model)
    tissue = p.maps["tissue"][p.mask]
    evaluate = (tissue == 1) | (tissue == 2)
    single = evaluate & (p.maps["crossing"][p.mask] == 0)
    return {"phantom": p, "gtab": gtab, "signals": p.voxels().astype(np.float64), "eval": evaluate,
            "single": single}


def _dki_maps(gtab, signals):
    fit = DKIModel(gtab).fit(signals)
    return {m: np.asarray(getattr(fit, m)) for m in DKI_MEASURES}


def _score(prefix, estimate, subject, names, metrics, noddi=False):
    truth = subject["phantom"]
    for i, m in enumerate(names):
        where = subject["single"] if (noddi and m == "odi") else subject["eval"]
        est = estimate[m] if isinstance(estimate, dict) else estimate[:, i]
        ref = truth.truth(m)
        metrics[f"rmse_{prefix}_{m}"] = rmse(est[where], ref[where])
        metrics[f"within_tol_{prefix}_{m}"] = percent_within(est[where], ref[where], TOLERANCE[m])


def _dki_study(quick, shape, max_epochs, metrics, out):
    gtab = three_shell_protocol()
    train = _subject(gtab, TRAIN_SEED, shape, "multi-tensor")
    test = _subject(gtab, TEST_SEED, shape, "multi-tensor")
    n_all = len(gtab)

    # Classical DKI on the full scan, timed (fit + MK, RK, KFA; median of 3 runs).
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        fit_test = DKIModel(gtab).fit(test["signals"])
        full_test = {m: np.asarray(getattr(fit_test, m)) for m in DKI_MEASURES}
        timings.append(time.perf_counter() - start)
    seconds_ours = float(np.median(timings))
    _score(f"fit{n_all}", full_test, test, DKI_MEASURES, metrics)
    full_train = _dki_maps(gtab, train["signals"])
    targets_fit = np.stack([full_train[m] for m in DKI_MEASURES], axis=1)
    targets_gt = np.stack([train["phantom"].truth(m) for m in DKI_MEASURES], axis=1)

    pattern12 = subsample_pattern(gtab, 12, seed=0)
    net, pred, train_seconds = _train_predict(train, test, pattern12, targets_fit, DKI_MEASURES, max_epochs)
    _score("qdl12", pred, test, DKI_MEASURES, metrics)
    _, pred_gt, _ = _train_predict(train, test, pattern12, targets_gt, DKI_MEASURES, max_epochs)
    _score("qdlgt12", pred_gt, test, DKI_MEASURES, metrics)
    metrics["qdl_train_seconds"] = train_seconds

    # Inference speed on one million voxels of a 12-volume scan (the test subject tiled): what the
    # short protocol gives a user, read as float32 (NIfTI data are float32 or integers).
    scheme = gtab.subset(pattern12)
    short = test["signals"][:, pattern12].astype(np.float32)
    many = np.tile(short, (max(1, 1_000_000 // len(short)), 1))
    net.predict(many[:10_000], scheme)  # warm-up
    for precision, suffix in (("float32", ""), ("bfloat16", "_bf16")):
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            net.predict(many, scheme, precision=precision)
            timings.append(time.perf_counter() - start)
        metrics[f"voxels_per_s_qdl{suffix}"] = len(many) / float(np.median(timings))
    # What bfloat16 inference costs in accuracy on the test subject.
    pred_bf16 = net.predict(short, scheme, precision="bfloat16")
    _score("qdl12bf16", pred_bf16, test, DKI_MEASURES, metrics)

    # RMSE vs number of DWIs: fit on the subset (when a DKI fit is possible) and q-DL.
    curve = {"n": [], "fit": {m: [] for m in DKI_MEASURES}, "qdl": {m: [] for m in DKI_MEASURES}}
    for n in (*CURVE_DWIS, n_all):
        pattern = subsample_pattern(gtab, n, seed=n) if n < n_all else np.arange(n_all)
        curve["n"].append(n)
        if n >= MIN_DKI_VOLUMES:
            sub = gtab.subset(pattern)
            maps = _dki_maps(sub, test["signals"][:, pattern])
            for m in DKI_MEASURES:
                curve["fit"][m].append(rmse(maps[m][test["eval"]], test["phantom"].truth(m)[test["eval"]]))
        else:
            for m in DKI_MEASURES:
                curve["fit"][m].append(np.nan)
        if n == 12:
            est = pred
        elif n == n_all and quick:
            est = None
        else:
            _, est, _ = _train_predict(train, test, pattern, targets_fit, DKI_MEASURES, max_epochs)
        for i, m in enumerate(DKI_MEASURES):
            curve["qdl"][m].append(np.nan if est is None else
                                   rmse(est[test["eval"], i], test["phantom"].truth(m)[test["eval"]]))
    for method in ("qdl", "fit"):
        for i, n in enumerate(curve["n"]):
            for m in DKI_MEASURES:
                if np.isfinite(curve[method][m][i]):
                    metrics[f"curve_rmse_{method}{n}_{m}"] = curve[method][m][i]

    # Peer: dipy's DKI on the same test voxels (all of them in the full run).
    from benchmarks._dmri_peers import dipy_dki

    n_peer = min(len(test["signals"]), 3000 if quick else len(test["signals"]))
    peer_voxels = np.random.default_rng(0).choice(len(test["signals"]), n_peer, replace=False)
    dipy = dipy_dki(test["signals"][peer_voxels], gtab.bvals, gtab.bvecs)
    ours_mk = full_test["mk"][peer_voxels]
    metrics["agree_mk_vs_dipy"] = float(np.median(np.abs(ours_mk - dipy["mk"])))
    metrics["voxels_per_s_dipy_dki"] = n_peer / dipy["seconds"]
    metrics["voxels_per_s_ours_dki"] = len(test["signals"]) / seconds_ours
    metrics["speedup_ours_dki_vs_dipy"] = metrics["voxels_per_s_ours_dki"] / metrics["voxels_per_s_dipy_dki"]
    metrics["speedup_qdl_vs_dipy_dki"] = metrics["voxels_per_s_qdl"] / metrics["voxels_per_s_dipy_dki"]
    metrics["speedup_qdl_bf16_vs_dipy_dki"] = metrics["voxels_per_s_qdl_bf16"] / metrics["voxels_per_s_dipy_dki"]
    metrics["n_train_voxels_dki"] = len(train["signals"])
    metrics["n_test_voxels_dki"] = int(test["eval"].sum())

    rmse_by_method = {"DKI fit on the subset": curve["fit"], "q-DL from the subset": curve["qdl"]}
    title = f"Three-shell phantom, SNR {SNR:g}, test subject ≠ training subject"
    estimates = {f"fit, {n_all} DWIs": full_test, "q-DL, 12 DWIs": dict(zip(DKI_MEASURES, pred.T))}
    figures = [_save(rmse_curve_figure(curve["n"], rmse_by_method, DKI_MEASURES, title),
                     out / "dmri_qspace_rmse_vs_dwis.png"),
               _save(maps_figure(test["phantom"], estimates, DKI_MEASURES), out / "dmri_qspace_dki_maps.png")]
    return figures


def _noddi_study(quick, shape, max_epochs, metrics, out):
    gtab = noddi_protocol()
    train, test = _subject(gtab, TRAIN_SEED, shape, "noddi"), _subject(gtab, TEST_SEED, shape, "noddi")
    n_all = len(gtab)
    start = time.perf_counter()
    fit_test = NODDIModel(gtab).fit(test["signals"])
    metrics["voxels_per_s_ours_noddi"] = len(test["signals"]) / (time.perf_counter() - start)
    full_test = {m: np.asarray(getattr(fit_test, m)) for m in NODDI_MEASURES}
    _score(f"fit{n_all}", full_test, test, NODDI_MEASURES, metrics, noddi=True)
    fit_train = NODDIModel(gtab).fit(train["signals"])
    targets_fit = np.stack([np.asarray(getattr(fit_train, m)) for m in NODDI_MEASURES], axis=1)
    targets_gt = np.stack([train["phantom"].truth(m) for m in NODDI_MEASURES], axis=1)
    pattern8 = subsample_pattern(gtab, 8, seed=0)
    _, pred, _ = _train_predict(train, test, pattern8, targets_fit, NODDI_MEASURES, max_epochs)
    _score("qdl8", pred, test, NODDI_MEASURES, metrics, noddi=True)
    _, pred_gt, _ = _train_predict(train, test, pattern8, targets_gt, NODDI_MEASURES, max_epochs)
    _score("qdlgt8", pred_gt, test, NODDI_MEASURES, metrics, noddi=True)

    # Peer: AMICO's NODDI on the same test scan.
    try:
        from benchmarks._dmri_peers import amico_noddi

        amico = amico_noddi(test["signals"], gtab.bvals, gtab.bvecs)
        _score("amico", {m: amico[m] for m in NODDI_MEASURES}, test, NODDI_MEASURES, metrics, noddi=True)
        metrics["voxels_per_s_amico"] = len(test["signals"]) / amico["seconds_fit"]
        metrics["amico_kernel_seconds"] = amico["seconds_kernels"]
    except Exception as exc:  # the peer failing must not hide our figures; the note says why
        print(f"AMICO NODDI failed: {exc}")
    estimates = {f"fit, {n_all} DWIs": full_test, "q-DL, 8 DWIs": dict(zip(NODDI_MEASURES, pred.T))}
    return [_save(maps_figure(test["phantom"], estimates, NODDI_MEASURES), out / "dmri_qspace_noddi_maps.png")]


def _real_study(max_epochs, metrics):
    import nibabel as nib
    from dipy.data import get_fnames

    from bioinverse.dmri.io import read_bvals_bvecs

    dwi_path, bval_path, bvec_path = get_fnames(name="small_101D")
    data = np.asarray(nib.load(dwi_path).get_fdata(), dtype=np.float64)
    gtab = read_bvals_bvecs(bval_path, bvec_path)
    reference = _dki_maps(gtab, data.reshape(-1, len(gtab)))["mk"].reshape(data.shape[:3])
    half = data.shape[0] // 2
    train = {"gtab": gtab, "signals": data[:half].reshape(-1, len(gtab))}
    test = {"gtab": gtab, "signals": data[half:].reshape(-1, len(gtab))}
    ref_train, ref_test = reference[:half].ravel(), reference[half:].ravel()
    pattern = subsample_pattern(gtab, 12, seed=0)
    _, pred, _ = _train_predict(train, test, pattern, ref_train[:, None], ("mk",), max_epochs)
    metrics["real_rmse_qdl12_mk"] = rmse(pred[:, 0], ref_test)
    for n in (24, 32):
        sub = subsample_pattern(gtab, n, seed=0)
        mk = _dki_maps(gtab.subset(sub), test["signals"][:, sub])["mk"]
        metrics[f"real_rmse_fit{n}_mk"] = rmse(mk, ref_test)
    metrics["real_n_train_voxels"] = len(ref_train)
    metrics["real_n_test_voxels"] = len(ref_test)


def _save(fig, path):
    from bioinverse.io import write_bytes
    from bioinverse.report import figure_to_png

    write_bytes(path, figure_to_png(fig))
    return str(path)


def run(quick: bool, out: Path) -> StudyResult:
    shape = (40, 48, 10) if quick else (56, 64, 16)
    max_epochs = 150 if quick else 1000
    metrics: dict[str, float] = {"snr": SNR, "grid_voxels": int(np.prod(shape))}
    figures = _dki_study(quick, shape, max_epochs, metrics, out)
    figures += _noddi_study(quick, shape, max_epochs, metrics, out)
    _real_study(max_epochs, metrics)
    return StudyResult(metrics, _markdown(metrics), figures)


def _markdown(m: dict[str, float]) -> str:
    """The comparison tables of the study's Markdown report."""
    from bioinverse.report import format_value as f

    dki = "\n".join(
        f"| {x.upper()} | {f(m[f'rmse_fit148_{x}'])} | {f(m[f'rmse_qdl12_{x}'])} | {f(m[f'rmse_qdlgt12_{x}'])} | "
        f"{f(m[f'within_tol_fit148_{x}'])} | {f(m[f'within_tol_qdl12_{x}'])} |" for x in DKI_MEASURES)
    noddi = "\n".join(
        f"| {x.upper()} | {f(m[f'rmse_fit99_{x}'])} | {f(m[f'rmse_qdl8_{x}'])} | {f(m[f'rmse_qdlgt8_{x}'])} | "
        f"{f(m.get(f'rmse_amico_{x}', float('nan')))} |" for x in NODDI_MEASURES)
    return (
        "DKI, three-shell protocol, multi-tensor test subject — RMSE against the exact truth, and % of "
        "voxels within ±0.5 (RK, MK) / ±0.3 (KFA):\n\n"
        "| measure | fit, 148 DWIs | q-DL, 12 DWIs | q-DL, 12 (truth targets) | within, fit | within, q-DL |\n"
        "|---|---|---|---|---|---|\n" + dki + "\n\n"
        "NODDI, 99-DWI protocol, NODDI test subject — RMSE against the generating parameters (ODI in "
        "single-bundle voxels):\n\n"
        "| measure | fit, 99 DWIs | q-DL, 8 DWIs | q-DL, 8 (truth targets) | AMICO, 99 DWIs |\n"
        "|---|---|---|---|---|\n" + noddi + "\n\n"
        "Speed (voxels/s, same machine, same voxels): dipy DKI (WLS + MK, RK, KFA) "
        f"{f(m['voxels_per_s_dipy_dki'])}; bioinverse DKI {f(m['voxels_per_s_ours_dki'])} "
        f"({f(m['speedup_ours_dki_vs_dipy'])}×); q-DL float32 {f(m['voxels_per_s_qdl'])} "
        f"({f(m['speedup_qdl_vs_dipy_dki'])}×), bfloat16 {f(m['voxels_per_s_qdl_bf16'])} "
        f"({f(m['speedup_qdl_bf16_vs_dipy_dki'])}×); bioinverse NODDI {f(m['voxels_per_s_ours_noddi'])}, "
        f"AMICO NODDI {f(m.get('voxels_per_s_amico', float('nan')))}.\n\n"
        "Real data (dipy's small_101D, reference = DKI fit on all 102 volumes): MK RMSE of q-DL from 12 "
        f"volumes {f(m['real_rmse_qdl12_mk'])}, DKI fit on 24 volumes {f(m['real_rmse_fit24_mk'])}, "
        f"on 32 volumes {f(m['real_rmse_fit32_mk'])}.\n"
    )
