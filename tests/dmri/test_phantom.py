import numpy as np
import pytest

from bioinverse.dmri.acquisition import three_shell_protocol
from bioinverse.dmri.dki import DKIModel
from bioinverse.dmri.io import GradientTable, read_dwi, read_map
from bioinverse.dmri.phantom import TISSUE_LABELS, simulate_phantom
from bioinverse.errors import InputError

SHAPE = (16, 18, 8)
MEASURES = ("md", "fa", "mk", "rk")


def _low_b_protocol(b_max, n_dirs=60):
    """Small b-values, where the cumulant expansion of log S is almost exact."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.repeat(np.array([0.5, 1.0]) * b_max, n_dirs)]
    return GradientTable(bvals, np.r_[np.zeros((1, 3)), g, g], b0_threshold=b_max / 10)


def _low_b_fit(b_max, tissue_model):
    p = simulate_phantom(_low_b_protocol(b_max), snr=np.inf, seed=3, shape=SHAPE, tissue_model=tissue_model)
    tissue = p.truth("tissue") < 3
    signals = p.voxels().astype(np.float64) / p.truth("s0")[:, None]
    fit = DKIModel(p.gtab, constrained=False).fit(signals[tissue])
    return {m: getattr(fit, m) for m in MEASURES}, {m: p.truth(m)[tissue] for m in MEASURES}


@pytest.mark.parametrize("tissue_model", ["noddi", "multi-tensor"])
def test_truth_is_the_cumulant_expansion_of_the_signal(tissue_model):
    # A DKI fit of noise-free signals converges to the exact cumulant tensors as b → 0, with a bias
    # that is linear in b to leading order. Richardson extrapolation of fits at b_max and b_max/2
    # removes that term, and what is left must be the phantom's analytic DKI truth: signal and
    # truth come from one tissue model.
    coarse, truth = _low_b_fit(440.0, tissue_model)
    fine, _ = _low_b_fit(220.0, tissue_model)
    for m in MEASURES:
        error_coarse = np.abs(coarse[m] - truth[m]).max()
        error_fine = np.abs(fine[m] - truth[m]).max()
        assert error_fine < 0.6 * error_coarse, m
    # Diffusion measures have a second-order bias, already small at b = 220.
    assert np.abs(fine["md"] - truth["md"]).max() < 5e-3 * truth["md"].mean()
    assert np.abs(fine["fa"] - truth["fa"]).max() < 1e-2
    # Kurtosis measures have a first-order bias, large where sticks dominate (the cumulant kurtosis
    # of low-dispersion white matter is high); extrapolation removes most of it.
    for m in ("mk", "rk"):
        error_fine = np.abs(fine[m] - truth[m])
        error_extrapolated = np.abs(2 * fine[m] - coarse[m] - truth[m])
        assert np.median(error_extrapolated) < 0.03 * np.median(truth[m]), m
        assert np.percentile(error_extrapolated, 90) < 0.3 * np.percentile(error_fine, 90), m


def test_tissues_and_their_microstructure_are_brain_like():
    p = simulate_phantom(three_shell_protocol(), snr=20, seed=0, shape=(32, 36, 10))
    tissue = p.truth("tissue")
    assert set(np.unique(tissue).astype(int)) == {TISSUE_LABELS["wm"], TISSUE_LABELS["gm"], TISSUE_LABELS["csf"]}
    wm, gm, csf = tissue == 1, tissue == 2, tissue == 3
    assert p.truth("fa")[wm].mean() > 0.4 > p.truth("fa")[gm].mean()
    assert p.truth("odi")[wm].mean() < p.truth("odi")[gm].mean()
    assert p.truth("icvf")[wm].mean() > p.truth("icvf")[gm].mean()
    np.testing.assert_allclose(p.truth("isovf")[csf], 1.0)
    np.testing.assert_allclose(p.truth("mk")[csf], 0.0, atol=1e-9)  # free water is Gaussian
    assert p.truth("crossing")[wm].mean() > 0.03  # a crossing region exists
    # The exact cumulant kurtosis of low-dispersion white matter is high (MK ≈ 2, RK ≈ 3–4).
    assert 1.0 < p.truth("mk")[wm].mean() < 3.0 and 1.5 < p.truth("rk")[wm].mean() < 6.0
    # Microstructure varies smoothly inside a tissue instead of being piecewise constant.
    assert p.truth("icvf")[wm].std() > 0.03
    assert not np.isnan(p.dwi).any() and (p.dwi[~p.mask] == 0).all()


def test_multi_tensor_tissue_has_moderate_kurtosis_that_dki_recovers():
    gtab = three_shell_protocol()
    p = simulate_phantom(gtab, snr=np.inf, seed=0, shape=(24, 28, 8), tissue_model="multi-tensor")
    wm = p.truth("tissue") == 1
    assert 0.6 < p.truth("mk")[wm].mean() < 1.5 and 0.5 < p.truth("kfa")[wm].mean() < 0.9
    assert "icvf" not in p.maps  # NODDI parameters are not the truth of this tissue
    fit = DKIModel(gtab).fit(p.voxels()[wm])
    # Higher cumulants are small here, so even a b ≤ 3000 fit lands near the exact truth.
    assert np.median(np.abs(fit.mk - p.truth("mk")[wm])) < 0.15


def test_subjects_differ_by_seed_and_repeat_exactly():
    gtab = three_shell_protocol()
    a, b = simulate_phantom(gtab, seed=1, shape=SHAPE), simulate_phantom(gtab, seed=1, shape=SHAPE)
    c = simulate_phantom(gtab, seed=2, shape=SHAPE)
    np.testing.assert_array_equal(a.dwi, b.dwi)
    assert not np.array_equal(a.maps["icvf"], c.maps["icvf"])


def test_noise_level_matches_the_snr():
    gtab = three_shell_protocol()
    clean = simulate_phantom(gtab, snr=np.inf, seed=4, shape=SHAPE)
    noisy = simulate_phantom(gtab, snr=25, seed=4, shape=SHAPE)
    # At b = 0 the signal is far above the noise, so Rician ≈ Gaussian with σ = 1/SNR.
    b0 = gtab.b0s_mask
    residual = (noisy.voxels()[:, b0] - clean.voxels()[:, b0]).ravel()
    assert residual.std() == pytest.approx(1 / 25, rel=0.1)


def test_write_roundtrip(tmp_path):
    p = simulate_phantom(three_shell_protocol(), seed=0, shape=SHAPE)
    paths = p.write(tmp_path)
    data = read_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"])
    np.testing.assert_allclose(data.data, p.dwi, rtol=1e-6)
    np.testing.assert_array_equal(data.mask, p.mask)
    mk, _ = read_map(paths["mk"])
    np.testing.assert_allclose(mk, p.maps["mk"], rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(InputError, match="shape"):
        simulate_phantom(three_shell_protocol(), shape=(4, 30, 30))
    with pytest.raises(InputError, match="snr"):
        simulate_phantom(three_shell_protocol(), snr=-1, shape=SHAPE)
