"""Fully learned (ν, r, f) estimator and the figures of the microstructure comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioinverse.dmri.crossing import Microstructure, simulate_crossings
from bioinverse.dmri.figures import _binned_mae, mae_vs_nu_figure, tsne_figure
from bioinverse.dmri.learned import PARAMETER_NAMES, LearnedEstimator, learned_train_config
from bioinverse.dmri.pgse import GAMMA_UM, PGSEProtocol
from bioinverse.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Small minibatches gain nothing from threads, and OpenMP workers that spin while other
    # processes hold the cores make training many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _protocol(n_b0=7, counts=(12, 12, 24, 44), seed=0):
    """HCP MGH-like shells (b 1000/3000/5000/10000 s/mm², δ/Δ/TE 12.9/21.8/57 ms), random directions."""
    small, big = 12.9, 21.8
    bvals = np.repeat([0.0, 1000.0, 3000.0, 5000.0, 10000.0], (n_b0, *counts))
    directions = np.random.default_rng(seed).normal(size=(bvals.size, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    strength = np.sqrt(bvals * 1e-3 / (GAMMA_UM**2 * small**2 * (big - small / 3.0)))
    return PGSEProtocol(directions, strength, small, big, 57.0)


@pytest.fixture(scope="module")
def protocol():
    return _protocol()


@pytest.fixture(scope="module")
def data(protocol):
    return simulate_crossings(protocol, 3300, snr=None, seed=3)


def _config(**changes):
    settings = {"max_epochs": 40, "optimizer": "adam", "lr": 2e-3, "batch_size": 128, "early_stopping": "none",
                "device": "cpu"}
    settings.update(changes)
    return learned_train_config(**settings)


@pytest.fixture(scope="module")
def trained(protocol, data):
    train = data.subset(np.arange(3000))
    return LearnedEstimator(protocol, hidden=(128, 128), dropout=0.0, config=_config()).fit(
        train.signals, train.truth)


def test_recipe_is_the_seeds_table_1(protocol):
    cfg = learned_train_config()
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.loss) == ("adagrad", 5e-4, 5000, "mse")
    assert cfg.val_fraction > 0 and cfg.early_stopping != "none"
    hcp_like = _protocol(n_b0=40, counts=(64, 64, 128, 256))
    assert len(hcp_like) == 552
    net = LearnedEstimator(hcp_like)
    assert net.dropout == 0.05 and sum(net.hidden) == 3600
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip((552, *net.hidden), (*net.hidden, 6))])
    assert net.n_parameters == sum(p.numel() for p in model.parameters())
    assert abs(net.n_parameters - 3e6) < 0.1e6


def test_recovers_density_and_fraction_better_than_the_mean(trained, data):
    train, test = data.subset(np.arange(3000)), data.subset(np.arange(3000, 3300))
    truth = test.truth.sorted_by_nu().as_array()
    guess = train.truth.sorted_by_nu().as_array().mean(axis=0)
    error = np.abs(trained.predict(test.signals).as_array() - truth).mean(axis=0)
    baseline = np.abs(truth - guess).mean(axis=0)
    ratio = dict(zip(PARAMETER_NAMES, error / baseline))
    assert ratio["f1"] < 0.6  # the dominant population's density is well determined
    assert ratio["f2"] < 0.95
    assert ratio["nu1"] < 0.95 and ratio["nu2"] < 0.95


def test_predictions_follow_the_sorted_by_nu_convention(trained, data):
    est = trained.predict(data.signals[3000:])
    assert (est.nu[:, 0] >= est.nu[:, 1]).all()
    np.testing.assert_allclose(est.nu.sum(axis=1), 1.0)
    assert (est.radius >= 0.25).all() and (est.radius <= 2.23).all()
    assert (est.density >= 0.10).all() and (est.density <= 0.76).all()


def test_population_order_of_the_truth_does_not_matter(protocol, data):
    part = data.subset(np.arange(300))
    swapped = Microstructure(part.truth.nu[:, ::-1], part.truth.radius[:, ::-1], part.truth.density[:, ::-1])
    nets = [LearnedEstimator(protocol, hidden=(16,), config=_config(max_epochs=2)).fit(part.signals, t)
            for t in (part.truth, swapped, part.truth.as_array())]
    first = nets[0].predict_array(part.signals)
    for net in nets[1:]:
        np.testing.assert_array_equal(net.predict_array(part.signals), first)


def test_batched_prediction_and_scale_invariance(trained, data):
    signals = data.signals[3000:3100]
    whole = trained.predict_array(signals)
    np.testing.assert_allclose(trained.predict_array(signals, batch_size=7), whole, rtol=1e-6, atol=1e-7)
    # The network reads b0-normalised signals: an arbitrary S0 per voxel changes nothing.
    scaled = signals * np.linspace(50.0, 900.0, signals.shape[0])[:, None]
    np.testing.assert_allclose(trained.predict_array(scaled), whole, rtol=1e-5, atol=1e-6)
    # bfloat16 inference stays within 2 % of every parameter's range of the float32 result.
    span = trained.ranges_[:, 1] - trained.ranges_[:, 0]
    assert (np.abs(trained.predict_array(signals, precision="bfloat16") - whole) < 0.02 * span).all()


def test_activations_feed_the_output_layer(trained, data):
    signals = data.signals[3000:3050]
    acts = trained.activations(signals, batch_size=20)
    assert list(acts) == ["layer1", "layer2"]
    assert all(a.shape == (50, 128) and (a >= 0).all() for a in acts.values())
    with torch.no_grad():
        z = trained.model_.layers[-1](torch.from_numpy(acts["layer2"])).numpy()
    np.testing.assert_allclose(trained._unscale(z), trained.predict_array(signals), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(trained, data, protocol, tmp_path):
    path = trained.save(tmp_path / "learned.pt")
    loaded = LearnedEstimator.load(path, protocol=protocol)
    signals = data.signals[3000:]
    np.testing.assert_array_equal(loaded.predict_array(signals), trained.predict_array(signals))
    assert loaded.hidden == trained.hidden and loaded.train_result_.epochs_run == 40
    np.testing.assert_array_equal(loaded.ranges_, trained.ranges_)


def test_another_protocol_is_refused(trained, protocol, data, tmp_path):
    other = protocol.subset(np.arange(len(protocol))[::-1])  # same measurements, another order
    path = trained.save(tmp_path / "learned.pt")
    with pytest.raises(InputError, match="protocol"):
        LearnedEstimator.load(path, protocol=other)
    with pytest.raises(InputError, match="protocol"):
        trained.predict(data.signals[:5], protocol=other)
    with pytest.raises(InputError, match="signals"):
        trained.predict(np.ones((3, 552)))


def test_damaged_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        LearnedEstimator.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable"):
        LearnedEstimator.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="format tag"):
        LearnedEstimator.load(tmp_path / "other.pt")


def test_bad_inputs_are_rejected(trained, protocol, data):
    part = data.subset(np.arange(20))
    with pytest.raises(InputError, match="hidden"):
        LearnedEstimator(protocol, hidden=(0,))
    with pytest.raises(InputError, match="dropout"):
        LearnedEstimator(protocol, dropout=1.0)
    with pytest.raises(InputError, match="config"):
        LearnedEstimator(protocol, config={"lr": 1.0})
    with pytest.raises(InputError, match="radius_range"):
        LearnedEstimator(protocol, radius_range=(2.0, 1.0))
    with pytest.raises(InputError, match="protocol"):
        LearnedEstimator(protocol.subset(~protocol.b0s_mask))
    with pytest.raises(RuntimeError, match="not fitted"):
        LearnedEstimator(protocol, hidden=(4,)).predict(part.signals)
    net = LearnedEstimator(protocol, hidden=(4,), config=_config(max_epochs=1))
    with pytest.raises(InputError, match="truth"):
        net.fit(part.signals, part.truth.subset(np.arange(10)))
    outside = part.truth.as_array()
    outside[0, 1] = 3.0
    with pytest.raises(InputError, match="radius_range"):
        net.fit(part.signals, outside)
    nan = part.signals.copy()
    nan[4, 2] = np.nan
    with pytest.raises(InputError, match="voxel 4"):
        trained.predict(nan)
    dark = part.signals.copy()
    dark[2, protocol.b0s_mask] = 0.0
    with pytest.raises(InputError, match="voxel 2"):
        trained.predict(dark)
    with pytest.raises(InputError, match="signals"):
        trained.predict(part.signals[:, :-1])
    with pytest.raises(InputError, match="batch_size"):
        trained.predict(part.signals, batch_size=0)
    with pytest.raises(InputError, match="precision"):
        trained.predict(part.signals, precision="float16")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _truth(n, seed=0):
    rng = np.random.default_rng(seed)
    nu1 = rng.uniform(0.1, 0.9, n)
    return np.column_stack([nu1, rng.uniform(0.25, 2.23, n), rng.uniform(0.1, 0.76, n),
                            1 - nu1, rng.uniform(0.25, 2.23, n), rng.uniform(0.1, 0.76, n)])


def test_binned_mae_matches_a_direct_computation():
    truth = _truth(500)
    estimate = truth + np.random.default_rng(1).normal(0, 0.1, truth.shape)
    edges = np.linspace(0.1, 0.9, 5)
    mae = _binned_mae(truth, estimate, edges)
    nu = truth[:, [0, 3]].ravel()
    for column, name in enumerate(("nu", "radius", "density")):
        error = np.abs(estimate[:, [column, column + 3]] - truth[:, [column, column + 3]]).ravel()
        for b in range(4):
            upper = nu <= edges[b + 1] if b == 3 else nu < edges[b + 1]
            in_bin = (nu >= edges[b]) & upper
            assert mae[name][b] == pytest.approx(error[in_bin].mean())


def test_mae_figure_is_written(tmp_path):
    truth = _truth(300)
    rng = np.random.default_rng(2)
    results = {}
    for snr in (25, np.inf):
        for method, orientations in (("fp", "est"), ("fp", "true"), ("hybrid", "est"), ("learned", "none")):
            results[(method, orientations, snr)] = (truth, truth + rng.normal(0, 5 / min(snr, 200), truth.shape))
    results[("hybrid", "true", 25)] = (Microstructure.from_array(truth), Microstructure.from_array(truth))
    path = mae_vs_nu_figure(results, tmp_path / "fig3.png", n_bins=6, title="test")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["fig3.png"]  # no temporary file left behind


def test_mae_figure_rejects_bad_input(tmp_path):
    truth = _truth(20)
    out = tmp_path / "x.png"
    for results, match in (({}, "non-empty"),
                           ({("fp", "maybe", 50): (truth, truth)}, "orientations"),
                           ({("fp", "est"): (truth, truth)}, "keys"),
                           ({("fp", "est", -1): (truth, truth)}, "SNR"),
                           ({("fp", "est", 50): (truth, truth[:10])}, "shape"),
                           ({("fp", "est", 50): (truth, truth[:, :5])}, "shape"),
                           ({("fp", "est", 50): (truth, np.full_like(truth, np.nan))}, "NaN")):
        with pytest.raises(InputError, match=match):
            mae_vs_nu_figure(results, out)
    with pytest.raises(InputError, match="n_bins"):
        mae_vs_nu_figure({("fp", "est", 50): (truth, truth)}, out, n_bins=0)
    with pytest.raises(InputError, match="nu_range"):
        mae_vs_nu_figure({("fp", "est", 50): (truth, truth)}, out, nu_range=(0.9, 0.1))
    assert not out.exists()


def test_tsne_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    r, f, nu = rng.uniform(0.25, 2.23, n), rng.uniform(0.1, 0.76, n), rng.uniform(0.5, 0.9, n)
    acts = {"hybrid · layer 1": np.maximum(np.column_stack([r, f, nu]) @ rng.normal(size=(3, 60)), 0),
            "learned · dead": np.zeros((n, 5))}
    path = tsne_figure(acts, {"r": r, "ν": nu}, tmp_path / "fig4.png", max_iter=250, max_points=60)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_tsne_figure_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    a, c = rng.normal(size=(30, 4)), rng.normal(size=30)
    out = tmp_path / "x.png"
    cases = (({}, {"r": c}, {}, "activations"),
             ({"a": a}, {}, {}, "colours"),
             ({"a": a, "b": a[:20]}, {"r": c}, {}, "rows"),
             ({"a": a[:, 0]}, {"r": c}, {}, "shape"),
             ({"a": a}, {"r": c[:10]}, {}, "shape"),
             ({"a": np.full_like(a, np.inf)}, {"r": c}, {}, "NaN"),
             ({"a": a[:3]}, {"r": c[:3]}, {}, "at least 4"),
             ({"a": a}, {"r": c}, {"perplexity": 0}, "perplexity"),
             ({"a": a}, {"r": c}, {"max_iter": 10}, "max_iter"),
             ({"a": a}, {"r": c}, {"max_points": 1}, "max_points"))
    for acts, colours, options, match in cases:
        with pytest.raises(InputError, match=match):
            tsne_figure(acts, colours, out, **options)
    assert not out.exists()
