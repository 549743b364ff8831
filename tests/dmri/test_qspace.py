import numpy as np
import pytest
import torch

from bioinverse.dmri.io import GradientTable
from bioinverse.dmri.qspace import MinMaxScaling, QSpaceNet, qdl_train_config
from bioinverse.errors import InputError

# Volumes 0-1: b = 0; 2-7: b = 1000; 8-13: b = 2000; 14-19: b = 3000 s/mm².
ADC_PATTERN = [0, 2, 8, 14]


def _protocol(seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((18, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0.0, 0.0, np.repeat([1000.0, 2000.0, 3000.0], 6)]
    return GradientTable(bvals, np.vstack([np.zeros((2, 3)), dirs]))


def _mono_exponential(gtab, n, seed, adc_range=(0.3e-3, 3e-3), noise=0.0):
    """Signals S0 exp(-b ADC) with S0 in [0.5, 2] (so that no linear map of S gives the ADC)."""
    rng = np.random.default_rng(seed)
    adc = rng.uniform(*adc_range, n)
    s0 = rng.uniform(0.5, 2.0, (n, 1))
    signals = s0 * np.exp(-np.outer(adc, gtab.bvals))
    return signals + noise * rng.standard_normal(signals.shape), adc, s0[:, 0]


def _fast_config(max_epochs=60, **changes):
    return qdl_train_config(max_epochs=max_epochs, optimizer="adam", lr=0.01, batch_size=64,
                            warmup_epochs=0, early_stopping="none", **changes)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Minibatches of 64 voxels are too small to gain from threads, and OpenMP workers that spin
    # while other processes hold the cores make these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adc_net():
    gtab = _protocol()
    train, adc_train, _ = _mono_exponential(gtab, 2000, seed=1)
    net = QSpaceNet(gtab.subset(ADC_PATTERN), outputs=("adc",), hidden=(32, 32), dropout=0.0,
                    config=_fast_config(), device="cpu")
    net.fit(train, gtab, adc_train)
    return net, gtab, train, adc_train


def test_default_config_is_the_papers_recipe():
    cfg = qdl_train_config()
    assert (cfg.optimizer, cfg.momentum, cfg.batch_size, cfg.lr) == ("sgd", 0.9, 128, 0.01)
    assert (cfg.warmup_epochs, cfg.warmup_lr) == (10, 0.001)
    assert (cfg.schedule, cfg.schedule_factor, cfg.schedule_patience) == ("stagnation", 0.9, 5)
    assert (cfg.val_fraction, cfg.early_stopping, cfg.patience) == (0.1, "window", 10)
    net = QSpaceNet(_protocol().subset(ADC_PATTERN))
    assert net.hidden == (150, 150, 150) and net.dropout == 0.1


def test_learns_adc_from_four_volumes_where_linear_regression_fails(adc_net):
    net, gtab, train, adc_train = adc_net
    test, adc_test, _ = _mono_exponential(gtab, 1000, seed=2)
    predicted = net.predict(test, gtab)
    assert predicted.shape == (1000,)
    rmse = np.sqrt(np.mean((predicted - adc_test) ** 2))
    assert rmse < 0.1 * adc_test.std()

    # The best affine map of the same four signals is far worse: the ADC is a log-ratio.
    design = np.c_[np.ones(len(train)), train[:, ADC_PATTERN]]
    coef = np.linalg.lstsq(design, adc_train, rcond=None)[0]
    linear = np.c_[np.ones(len(test)), test[:, ADC_PATTERN]] @ coef
    assert np.sqrt(np.mean((linear - adc_test) ** 2)) > 2.5 * rmse

    maps = net.predict_maps(test, gtab)
    assert list(maps) == ["adc"]
    np.testing.assert_array_equal(maps["adc"], predicted)


def test_bfloat16_inference_stays_close_to_float32(adc_net):
    net, gtab, _, _ = adc_net
    test, adc_test, _ = _mono_exponential(gtab, 500, seed=3)
    exact = net.predict(test, gtab)
    fast = net.predict(test, gtab, precision="bfloat16")
    assert not np.array_equal(fast, exact)  # really ran in reduced precision
    assert np.abs(fast - exact).max() < 0.02 * (adc_test.max() - adc_test.min())
    np.testing.assert_array_equal(net.predict(test, gtab), exact)  # float32 weights untouched
    with pytest.raises(InputError, match="precision"):
        net.predict(test, gtab, precision="float8")


def test_scaling_comes_from_training_data_and_is_reused(adc_net):
    net, gtab, train, adc_train = adc_net
    x = train[:, ADC_PATTERN]
    np.testing.assert_allclose(net.input_scale_.minimum, x.min(axis=0))
    np.testing.assert_allclose(net.input_scale_.scale, np.ptp(x, axis=0))
    np.testing.assert_allclose(net.output_scale_.minimum, [adc_train.min()])
    np.testing.assert_allclose(net.output_scale_.scale, [np.ptp(adc_train)])

    test, _, _ = _mono_exponential(gtab, 300, seed=3)
    # Independent computation with the stored training affine maps.
    z = torch.from_numpy(((test[:, ADC_PATTERN] - x.min(axis=0)) / np.ptp(x, axis=0)).astype(np.float32))
    with torch.no_grad():
        expected = net.model_(z).numpy()[:, 0] * np.ptp(adc_train) + adc_train.min()
    np.testing.assert_allclose(net.predict(test, gtab), expected, rtol=1e-6, atol=1e-12)

    # Scaling refitted on test data would map a shifted set onto the same inputs; ours does not,
    # and a voxel's prediction does not depend on the other voxels of the batch.
    full = net.predict(test, gtab)
    assert not np.allclose(net.predict(test + 0.2, gtab), full)
    # (Equal up to float32 rounding: the matrix kernels block differently for other batch sizes.)
    np.testing.assert_allclose(net.predict(test[:7], gtab), full[:7], rtol=1e-5)
    np.testing.assert_allclose(net.predict(test, gtab, batch_size=64), full, rtol=1e-5)
    # Leading dimensions are kept: an image in, maps out.
    assert net.predict(test.reshape(10, 30, -1), gtab).shape == (10, 30)


def test_minmax_scaling_guards_constant_features():
    s = MinMaxScaling.fit(np.array([[2.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_array_equal(s.scale, [1.0, 2.0])
    np.testing.assert_array_equal(s.transform([[2.0, 2.0]]), [[0.0, 0.5]])
    np.testing.assert_array_equal(s.inverse(s.transform([[5.0, -1.0]])), [[5.0, -1.0]])


def test_save_load_round_trip_and_protocol_matching(adc_net, tmp_path):
    net, gtab, _, _ = adc_net
    test, _, _ = _mono_exponential(gtab, 500, seed=4)
    path = net.save(tmp_path / "adc.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"].startswith("bioinverse.dmri.qspace/") and payload["outputs"] == ["adc"]

    loaded = QSpaceNet.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.predict(test, gtab), net.predict(test, gtab))
    np.testing.assert_array_equal(loaded.scheme.bvals, net.scheme.bvals)
    assert loaded.outputs_ == ("adc",) and loaded.train_result_.epochs_run == net.train_result_.epochs_run

    # The same scan written in another order with flipped gradient signs.
    order = np.random.default_rng(5).permutation(len(gtab))
    shuffled = GradientTable(gtab.bvals[order], -gtab.bvecs[order])
    np.testing.assert_array_equal(loaded.predict(test[:, order], shuffled), net.predict(test, gtab))

    # A scan lacking the scheme's b = 2000 volume (index 8).
    keep = np.delete(np.arange(len(gtab)), 8)
    with pytest.raises(InputError, match="b=2000"):
        loaded.predict(test[:, keep], gtab.subset(keep))


def test_load_rejects_foreign_truncated_and_missing_files(adc_net, tmp_path):
    net, _, _, _ = adc_net
    good = net.save(tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("not a model\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    for name, message in (("truncated.pt", "corrupt or truncated"), ("text.pt", "corrupt or truncated"),
                          ("other.pt", "not a bioinverse q-space model"), ("missing.pt", "no such file")):
        with pytest.raises(InputError, match=message) as info:
            QSpaceNet.load(tmp_path / name)
        assert info.value.source.endswith(name)


def test_classification_of_three_tissues():
    gtab = _protocol()
    rng = np.random.default_rng(6)
    labels = rng.choice([3, 7, 11], size=2400)
    centre = {3: 0.4e-3, 7: 1.0e-3, 11: 2.5e-3}
    adc = np.array([centre[c] for c in labels]) * rng.uniform(0.85, 1.15, labels.size)
    signals = rng.uniform(0.5, 2.0, (labels.size, 1)) * np.exp(-np.outer(adc, gtab.bvals))
    signals += 0.01 * rng.standard_normal(signals.shape)
    net = QSpaceNet(gtab.subset(ADC_PATTERN), task="classification", hidden=(32, 32),
                    config=_fast_config(max_epochs=25), device="cpu")
    net.fit(signals[:1800], gtab, labels[:1800])
    np.testing.assert_array_equal(net.classes_, [3, 7, 11])
    predicted = net.predict(signals[1800:], gtab)
    assert np.mean(predicted == labels[1800:]) > 0.95
    proba = net.predict_proba(signals[1800:], gtab)
    assert proba.shape == (600, 3) and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(net.classes_[proba.argmax(axis=1)], predicted)
    with pytest.raises(InputError, match="task"):
        net.predict_maps(signals[1800:], gtab)


def test_reconstructs_all_dwis_from_five():
    gtab = _protocol()
    signals, _, s0 = _mono_exponential(gtab, 3000, seed=7)
    pattern = [0, 2, 3, 8, 9]  # no b = 3000 input: those volumes must be extrapolated
    net = QSpaceNet(gtab.subset(pattern), hidden=(64, 64), dropout=0.0, config=_fast_config(40),
                    device="cpu")
    net.fit(signals[:2500], gtab, signals[:2500])
    reconstructed = net.predict(signals[2500:], gtab)
    assert reconstructed.shape == (500, 20)
    error = (reconstructed - signals[2500:]) / s0[2500:, None]
    assert np.sqrt(np.mean(error**2)) < 0.01
    maps = net.predict_maps(signals[2500:], gtab)
    assert list(maps)[:2] == ["s0000", "s0001"] and len(maps) == 20


def test_paper_recipe_runs_with_warmup_schedule_and_early_stopping():
    gtab = _protocol()
    signals, adc, _ = _mono_exponential(gtab, 600, seed=8)
    net = QSpaceNet(gtab.subset(ADC_PATTERN), outputs=["adc"], hidden=(16,),
                    config=qdl_train_config(max_epochs=40), device="cpu")
    net.fit(signals, gtab, adc[:, None])
    history = net.train_result_.history
    assert [h["lr"] for h in history[:10]] == [0.001] * 10 and history[10]["lr"] == 0.01
    assert net.predict(signals[:5], gtab).shape == (5, 1)


def test_rejects_bad_input(adc_net):
    net, gtab, train, adc = adc_net
    scheme = gtab.subset(ADC_PATTERN)
    fresh = QSpaceNet(scheme, hidden=(4,), config=_fast_config(max_epochs=1))

    bad = train[:50].copy()
    bad[3, 8] = np.nan
    with pytest.raises(InputError, match="signals: voxel 3"):
        fresh.fit(bad, gtab, adc[:50])
    with pytest.raises(InputError, match="signals: voxel 3"):
        net.predict(bad, gtab)
    bad_y = adc[:50].copy()
    bad_y[4] = np.inf
    with pytest.raises(InputError, match="y: row 4"):
        fresh.fit(train[:50], gtab, bad_y)
    with pytest.raises(InputError, match="^y: has shape"):
        fresh.fit(train[:50], gtab, adc[:49])
    with pytest.raises(InputError, match="^signals: has 19 measurements"):
        fresh.fit(train[:50, :19], gtab, adc[:50])
    with pytest.raises(InputError, match="^signals: has 4 measurements"):
        net.predict(train[:5, ADC_PATTERN], gtab)
    with pytest.raises(InputError, match="^outputs"):
        QSpaceNet(scheme, outputs=("a", "b"), config=_fast_config(max_epochs=1)).fit(train[:50], gtab, adc[:50])
    with pytest.raises(InputError, match="^y: holds a single class"):
        QSpaceNet(scheme, task="classification").fit(train[:50], gtab, np.ones(50, int))
    with pytest.raises(InputError, match="^task"):
        QSpaceNet(scheme, task="segmentation").fit(train[:50], gtab, adc[:50])
    with pytest.raises(InputError, match="^signals_val"):
        fresh.fit(train[:50], gtab, adc[:50], y_val=adc[:10])
    with pytest.raises(InputError, match="^gtab"):
        fresh.fit(train[:50], gtab.bvals, adc[:50])
    with pytest.raises(InputError, match="predict_proba"):
        net.predict_proba(train[:5], gtab)
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.predict(train[:5], gtab)
