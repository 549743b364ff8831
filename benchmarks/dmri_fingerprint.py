"""Physics-dictionary fingerprinting, hybrid NNLS → network and a fully learned network (dMRI).

Reproduces the comparison of Rensonnet, Adam & Macq (ICML IMLH 2021) on the HCP MGH-USC protocol
(552 measurements): voxels of two crossing axon populations, each with orientation u, volume
fraction ν, axon radius index r and fibre density f, Rician noise at SNR 25, 50 and 100.

* Data: the analytic population model (restricted Van Gelderen cylinders in a tortuous zeppelin,
  :mod:`bioinverse.dmri.axons`) at parameters drawn uniformly and continuously, so test voxels lie
  off the dictionary grid; training and test sets are independent draws.
* Fingerprinting (eq. 3–4) and the hybrid use the dictionary of the same model on the default
  782-atom (r, f) grid, rotated to the true orientations or to those estimated by dipy's CSD.
  The fully learned network sees no orientations; its populations are labelled by ν (population 1
  = larger ν) and it is scored against the truth labelled the same way.
* Brute force: the seed's method — a loop of ``scipy.optimize.nnls`` over all N₁·N₂ pairs — timed
  and compared pair by pair on a few voxels.
* Monte Carlo: the simulator's accuracy against closed forms (free diffusion, Van Gelderen) and the
  time to build the full Monte Carlo dictionary (in ``--quick``, a 3×3 corner of the grid, and the
  time projected to 782 atoms).
* Protocol transfer: the hybrid trained on the full protocol applied, without retraining, to the
  protocol without its b = 10000 s/mm² shell (dictionary restricted to the remaining shells), next
  to a hybrid retrained on that protocol.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks._harness import StudyResult
from bioinverse.dmri.crossing import (
    CrossingSet,
    Microstructure,
    estimate_orientations,
    match_orientations,
    simulate_crossings,
    simulate_training_set,
)
from bioinverse.dmri.dictionary import build_dictionary, default_grid
from bioinverse.dmri.fingerprint import (
    Fingerprinting,
    exhaustive_pair_search,
    exhaustive_pair_search_bruteforce,
)
from bioinverse.dmri.hybrid import HybridEstimator
from bioinverse.dmri.learned import LearnedEstimator
from bioinverse.dmri.pgse import hcp_mgh_protocol

TITLE = "Fingerprinting vs hybrid NNLS → network vs fully learned (dMRI microstructure, HCP MGH-USC protocol)"

SNRS = (25, 50, 100)
PARAMETERS = {"nu": "nu", "r": "radius", "f": "density"}
SIZES = {
    # n_train: training voxels (thirds at each SNR); n_test: test voxels per SNR;
    # n_brute: voxels solved by brute force; epochs: training cap (early stopping usually ends it).
    True: {"n_train": 30_000, "n_test": 600, "n_brute": 1, "epochs": 60, "n_tsne": 1200},
    False: {"n_train": 400_000, "n_test": 5_000, "n_brute": 3, "epochs": 200, "n_tsne": 11_730},
}


def _absolute_errors(estimate: Microstructure, truth: Microstructure) -> dict[str, np.ndarray]:
    """|estimate − truth| per voxel and population, for ν, r and f."""
    return {short: np.abs(getattr(estimate, name) - getattr(truth, name)) for short, name in PARAMETERS.items()}


def _timed(fn, *args, repeat: int = 1, **kwargs):
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def _monte_carlo(protocol, quick: bool, out: Path, metrics: dict):
    from bioinverse.dmri import montecarlo

    check = montecarlo.validate()
    metrics["mc_free_rel_err"] = check["free_rel_err"]
    metrics["mc_free_abs_err"] = check["free_abs_err"]
    metrics["mc_cylinder_rel_err"] = check["cylinder_rel_err"]
    metrics["mc_cylinder_attenuation_rel_err"] = check["cylinder_attenuation_rel_err"]

    radius, density = default_grid()
    if quick:
        # The 3×3 corner-and-centre grid spans the cheapest and the most expensive atoms.
        r_values, f_values = np.unique(radius), np.unique(density)
        pick_r = r_values[[0, len(r_values) // 2, -1]]
        pick_f = f_values[[0, len(f_values) // 2, -1]]
        radius, density = (a.ravel() for a in np.meshgrid(pick_r, pick_f, indexing="ij"))
    cache = out / "cache" / f"mc_dictionary{'_quick' if quick else ''}.npz"
    mc_dictionary = build_dictionary(protocol, "montecarlo", radius=radius, density=density, cache=cache,
                                     progress=True)
    recorded = mc_dictionary.build_seconds  # summed over resumed runs of the cached build
    metrics["mc_dictionary_atoms"] = mc_dictionary.n_atoms
    if quick:
        metrics["mc_dictionary_build_s_projected"] = recorded / mc_dictionary.n_atoms * default_grid()[0].size
        metrics["mc_dictionary_build_s_quick_grid"] = recorded
    else:
        metrics["mc_dictionary_build_s"] = recorded
    return mc_dictionary


def _score(name: str, estimate: Microstructure, truth: Microstructure, snr: int, orient: str, metrics: dict,
           results: dict) -> None:
    for short, values in _absolute_errors(estimate, truth).items():
        metrics[f"mae_{name}_{short}_snr{snr}_{orient}"] = float(values.mean())
    results[(name, orient, snr)] = (truth, estimate)


def run(quick: bool, out: Path) -> StudyResult:
    size = SIZES[quick]
    protocol = hcp_mgh_protocol()
    metrics: dict[str, float] = {"n_train": size["n_train"], "n_test_per_snr": size["n_test"]}
    figures: list[str] = []

    mc_dictionary = _monte_carlo(protocol, quick, out, metrics)

    dictionary, seconds = _timed(build_dictionary, protocol, "analytic", progress=False)
    metrics["analytic_dictionary_build_s"] = seconds
    metrics["dictionary_atoms_per_population"] = dictionary.n_atoms

    print("simulating training and test sets", flush=True)
    train = simulate_training_set(protocol, size["n_train"], SNRS, seed=10)
    tests = {snr: simulate_crossings(protocol, size["n_test"], snr, seed=1000 + snr) for snr in SNRS}
    orientations = {}
    for snr, test in tests.items():
        estimated = estimate_orientations(test.signals, protocol)
        ordered, angle = match_orientations(estimated, test.orientations)
        orientations[snr] = {"true": test.orientations, "est": ordered}
        metrics[f"csd_angle_err_deg_snr{snr}"] = float(angle.mean())

    print("training the hybrid and the fully learned networks", flush=True)
    # The full run keeps its slow intermediate results (training codes, training checkpoints) under
    # out/cache, so an interrupted run resumes; the quick run always starts afresh.
    cache = None if quick else out / "cache"
    hybrid, codes_seconds = _train_hybrid(dictionary, protocol, train, size, cache, "full")
    metrics["train_s_hybrid"] = _epoch_seconds(hybrid)  # the network; the NNLS codes are timed apart
    if codes_seconds is not None:
        metrics["nnls_codes_s_hybrid"] = codes_seconds
    learned = LearnedEstimator(protocol, config=_config("learned", size["epochs"]))
    learned.fit(train.signals, train.truth, progress=cache is not None,
                checkpoint=None if cache is None else cache / "learned.ckpt")
    metrics["train_s_learned"] = _epoch_seconds(learned)
    metrics["parameters_hybrid"] = hybrid.n_parameters
    metrics["parameters_learned"] = learned.n_parameters
    fingerprinting = Fingerprinting(dictionary, protocol).fit()

    results: dict = {}
    for snr, test in tests.items():
        print(f"SNR {snr}: fingerprinting, hybrid, learned", flush=True)
        for orient, u in orientations[snr].items():
            _score("fp", fingerprinting.predict(test.signals, u), test.truth, snr, orient, metrics, results)
            _score("hybrid", hybrid.predict(test.signals, u), test.truth, snr, orient, metrics, results)
        learned_estimate = learned.predict(test.signals)
        # It sees no orientations: one estimate scores both rows of the table, one line of the figure.
        _score("learned", learned_estimate, test.truth.sorted_by_nu(), snr, "none", metrics, results)
        for orient in ("true", "est"):
            for short in PARAMETERS:
                metrics[f"mae_learned_{short}_snr{snr}_{orient}"] = metrics[f"mae_learned_{short}_snr{snr}_none"]
        for short in PARAMETERS:
            del metrics[f"mae_learned_{short}_snr{snr}_none"]

    # The robustness claim: how much each error grows from true to CSD orientations.
    for snr in SNRS:
        for short in ("nu", "f"):
            for method in ("fp", "hybrid"):
                metrics[f"growth_{method}_{short}_snr{snr}"] = (metrics[f"mae_{method}_{short}_snr{snr}_est"]
                                                               - metrics[f"mae_{method}_{short}_snr{snr}_true"])
    _timings(protocol, dictionary, fingerprinting, hybrid, learned, tests[50], size, metrics)
    if not quick:
        _monte_carlo_dictionary_in_use(protocol, mc_dictionary, tests[50], metrics)
    _transfer(protocol, dictionary, hybrid, train, tests[50], size, cache, metrics)
    figures += _figures(results, hybrid, learned, protocol, size, out)
    return StudyResult(metrics, _markdown(metrics), figures)


def _train_hybrid(dictionary, protocol, train, size, cache: Path | None, tag: str):
    """Fit a hybrid; NNLS codes and training checkpoints cached under ``cache`` when given.

    Returns the hybrid and the seconds its NNLS codes took (``None`` for codes cached without a time).
    """
    hybrid = HybridEstimator(dictionary, protocol, config=_config("hybrid", size["epochs"]))
    codes_file = None if cache is None else cache / f"hybrid_codes_{tag}_{len(train)}.npy"
    codes_seconds = None if codes_file is None else codes_file.with_suffix(".seconds")
    if codes_file is not None and codes_file.exists():
        codes = np.load(codes_file)
        seconds = float(codes_seconds.read_text()) if codes_seconds.exists() else None  # not recorded
    else:
        start = time.perf_counter()
        codes = hybrid.sparse_codes(train.signals, train.orientations).astype(np.float32)
        seconds = time.perf_counter() - start
        if codes_file is not None:
            from bioinverse.io import atomic_open, write_text

            with atomic_open(codes_file, "wb") as fh:
                np.save(fh, codes)
            write_text(codes_seconds, f"{seconds!r}\n")
    hybrid.fit_codes(codes, train.truth, checkpoint=None if cache is None else cache / f"hybrid_{tag}.ckpt",
                     progress=cache is not None)
    return hybrid, seconds


def _epoch_seconds(estimator) -> float:
    """Training wall time summed over epochs, those of interrupted and resumed runs included."""
    return float(sum(h["seconds"] for h in estimator.train_result_.history))


def _config(kind: str, epochs: int):
    if kind == "hybrid":
        from bioinverse.dmri.hybrid import hybrid_train_config

        return hybrid_train_config(max_epochs=epochs)
    from bioinverse.dmri.learned import learned_train_config

    return learned_train_config(max_epochs=epochs)


def _timings(protocol, dictionary, fingerprinting, hybrid, learned, test, size, metrics) -> None:
    """Inference time per voxel (batched, 2 cores) and the brute-force comparison."""
    n = min(len(test), 256)
    signals, u = test.signals[:n], test.orientations[:n]
    fingerprinting.predict(signals[:8], u[:8])  # compile / warm up
    _, seconds = _timed(fingerprinting.predict, signals, u, repeat=2)
    metrics["ms_per_voxel_fp"] = 1e3 * seconds / n
    _, seconds = _timed(hybrid.predict, signals, u, repeat=2)
    metrics["ms_per_voxel_hybrid"] = 1e3 * seconds / n
    many = np.tile(test.signals, (max(1, 10_000 // len(test)), 1))
    learned.predict(many[:100])
    _, seconds = _timed(learned.predict, many, repeat=3)
    metrics["ms_per_voxel_learned"] = 1e3 * seconds / len(many)

    # Brute force on a few voxels: every pair through scipy.optimize.nnls.
    from bioinverse.dmri.crossing import normalise_b0

    k = size["n_brute"]
    y = normalise_b0(signals[:k], protocol)
    C1 = dictionary.atoms(protocol, u[:k, 0])
    C2 = dictionary.atoms(protocol, u[:k, 1])
    (j1, j2, *_), _ = _timed(exhaustive_pair_search, C1, C2, y)
    (b1, b2, *_), seconds_brute = _timed(exhaustive_pair_search_bruteforce, C1, C2, y)
    metrics["ms_per_voxel_fp_bruteforce"] = 1e3 * seconds_brute / k
    metrics["fp_speedup_vs_bruteforce"] = metrics["ms_per_voxel_fp_bruteforce"] / metrics["ms_per_voxel_fp"]
    metrics["fp_exact_fraction"] = float(np.mean((j1 == b1) & (j2 == b2)))
    metrics["fp_bruteforce_voxels"] = k


def _monte_carlo_dictionary_in_use(protocol, mc_dictionary, test, metrics) -> None:
    """Fingerprinting with the full Monte Carlo dictionary: its speed (its atoms carry sampling noise,
    so the low-rank shortcuts of the analytic dictionary do not apply) and its accuracy on the
    analytic-model test voxels, which measures the mismatch between the two generators."""
    fingerprinting = Fingerprinting(mc_dictionary, protocol).fit()
    n = min(len(test), 256)
    fingerprinting.predict(test.signals[:8], test.orientations[:8])
    _, seconds = _timed(fingerprinting.predict, test.signals[:n], test.orientations[:n])
    metrics["ms_per_voxel_fp_mc_dictionary"] = 1e3 * seconds / n
    estimate = fingerprinting.predict(test.signals, test.orientations)
    for short, values in _absolute_errors(estimate, test.truth).items():
        metrics[f"mae_fp_mc_dictionary_{short}_snr50_true"] = float(values.mean())
    coder = HybridEstimator(mc_dictionary, protocol)
    _, seconds = _timed(coder.sparse_codes, test.signals[:n], test.orientations[:n])
    metrics["ms_per_voxel_hybrid_nnls_mc_dictionary"] = 1e3 * seconds / n


def _transfer(protocol, dictionary, hybrid, train, test, size, cache, metrics) -> None:
    """The hybrid trained on P applied to P′ (no b = 10000 shell) without retraining, vs retrained."""
    keep = protocol.bvals < 9000.0
    reduced = protocol.subset(keep)
    reduced_dictionary = dictionary.for_protocol(reduced)
    transferred = hybrid.transfer(reduced_dictionary, reduced)
    estimate = transferred.predict(test.signals[:, keep], test.orientations)
    for short, values in _absolute_errors(estimate, test.truth).items():
        metrics[f"mae_transfer_{short}"] = float(values.mean())
    reduced_train = CrossingSet(train.signals[:, keep], train.orientations, train.truth, train.snr)
    retrained, _ = _train_hybrid(reduced_dictionary, reduced, reduced_train, size, cache, "no_b10000")
    estimate = retrained.predict(test.signals[:, keep], test.orientations)
    for short, values in _absolute_errors(estimate, test.truth).items():
        metrics[f"mae_retrained_{short}"] = float(values.mean())


def _figures(results, hybrid, learned, protocol, size, out: Path) -> list[str]:
    from bioinverse.dmri.figures import mae_vs_nu_figure, tsne_figure

    paths = [str(mae_vs_nu_figure(results, out / "dmri_fingerprint_mae_vs_nu.png"))]
    # Fig. 4 of the seed: SNR 50, r₁ = r₂ and f₁ = f₂ so that one colour per voxel describes both.
    data = simulate_crossings(protocol, size["n_tsne"], 50, seed=77)
    same = Microstructure(data.truth.nu, data.truth.radius[:, :1].repeat(2, axis=1),
                          data.truth.density[:, :1].repeat(2, axis=1))
    from bioinverse.dmri.crossing import crossing_signals
    from bioinverse.dmri.signal import rician_noise

    signals = rician_noise(crossing_signals(protocol, data.orientations, same), 50.0, rng=78)
    # The layers of the seed's Fig. 4: hybrid — first layer, end of a split branch, last head layer;
    # learned — first, middle and last hidden layers.
    hybrid_layers = hybrid.activations(signals, data.orientations)
    learned_layers = learned.activations(signals)
    branch = [name for name in hybrid_layers if name.startswith("branch1")]
    head = [name for name in hybrid_layers if name.startswith("head")]
    picked = {f"hybrid · {name}": hybrid_layers[name] for name in (branch[0], branch[-1], head[-1])}
    names = list(learned_layers)
    picked |= {f"learned · {name}": learned_layers[name] for name in (names[0], names[len(names) // 2], names[-1])}
    colours = {"r": same.radius[:, 0], "f": same.density[:, 0], "ν₁": same.nu[:, 0]}
    paths.append(str(tsne_figure(picked, colours, out / "dmri_fingerprint_tsne.png", max_points=size["n_tsne"])))
    return paths


def _markdown(m: dict[str, float]) -> str:
    from bioinverse.report import format_value as f

    rows = []
    for snr in SNRS:
        for orient in ("true", "est"):
            cells = " | ".join(f(m[f"mae_{method}_{p}_snr{snr}_{orient}"]) for p in PARAMETERS
                               for method in ("fp", "hybrid", "learned"))
            rows.append(f"| {snr} | {orient} | {cells} |")
    header = " | ".join(f"{p} {method}" for p in PARAMETERS for method in ("fp", "hybrid", "learned"))
    return (
        "Mean absolute error over both populations (ν; r in µm; f). `est`: orientations from dipy's CSD "
        "(b = 10000 shell); the fully learned network sees no orientations, so its two rows are the same "
        "estimate.\n\n"
        f"| SNR | orientations | {header} |\n|---|---|" + "---|" * 9 + "\n" + "\n".join(rows) + "\n\n"
        f"Inference per voxel (2 cores, batched): fingerprinting {f(m['ms_per_voxel_fp'])} ms "
        f"(brute force {f(m['ms_per_voxel_fp_bruteforce'])} ms, ×{f(m['fp_speedup_vs_bruteforce'])}; "
        f"same pair as brute force in {f(100 * m['fp_exact_fraction'])} % of {f(m['fp_bruteforce_voxels'])} "
        f"voxels), hybrid {f(m['ms_per_voxel_hybrid'])} ms, fully learned {f(m['ms_per_voxel_learned'])} ms.\n\n"
        "Growth of the MAE from true to CSD orientations (the paper's robustness claim: the hybrid's grows "
        "less than fingerprinting's): "
        + "; ".join(f"SNR {snr}: ν fp {f(m[f'growth_fp_nu_snr{snr}'])} / hybrid {f(m[f'growth_hybrid_nu_snr{snr}'])}, "
                    f"f fp {f(m[f'growth_fp_f_snr{snr}'])} / hybrid {f(m[f'growth_hybrid_f_snr{snr}'])}"
                    for snr in SNRS) + ".\n\n"
        "Protocol transfer (SNR 50, true orientations, P′ = no b = 10000 shell): "
        + ", ".join(f"{p}: transferred {f(m[f'mae_transfer_{p}'])} vs retrained {f(m[f'mae_retrained_{p}'])}"
                    for p in PARAMETERS) + ".\n"
    )
