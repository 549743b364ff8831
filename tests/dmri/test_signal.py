import numpy as np
import pytest

from bioinverse.dmri.io import GradientTable
from bioinverse.dmri.signal import (
    axially_symmetric_tensor,
    cumulant_tensors,
    dki_signal,
    dti_signal,
    kurtosis_elements,
    kurtosis_from_elements,
    multi_tensor_moments,
    multi_tensor_signal,
    rician_noise,
    tensor_elements,
    tensor_from_eig,
    tensor_from_elements,
)
from bioinverse.errors import InputError


def _unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _gtab(rng, shells=(1000.0, 2000.0), n_dirs=30):
    g = _unit(rng, n_dirs)
    bvals = np.concatenate([[0.0]] + [np.full(n_dirs, b) for b in shells])
    return GradientTable(bvals, np.concatenate([np.zeros((1, 3))] + [g] * len(shells)))


def _mixtures(rng, n_vox, n_comp):
    """Random non-negative fractions and axially symmetric compartment tensors (mm²/s)."""
    fractions = rng.dirichlet(np.ones(n_comp), size=n_vox)
    axes = rng.standard_normal((n_vox, n_comp, 3))
    tensors = axially_symmetric_tensor(
        axes, rng.uniform(0.5e-3, 3e-3, (n_vox, n_comp)), rng.uniform(0.0, 1.5e-3, (n_vox, n_comp))
    )
    return fractions, tensors


def _directional(D, W, g):
    """D(g), K(g) for tensors (..., 3, 3), (..., 3, 3, 3, 3) and directions (m, 3)."""
    adc = np.einsum("mi,...ij,mj->...m", g, D, g)
    adv = np.einsum("mi,mj,mk,ml,...ijkl->...m", g, g, g, g, W)
    md = np.trace(D, axis1=-2, axis2=-1)[..., None] / 3
    return adc, md**2 * adv / adc**2


def test_element_orders_round_trip_and_match_dipy():
    from dipy.reconst.dti import from_lower_triangular, lower_triangular

    rng = np.random.default_rng(0)
    d6 = rng.standard_normal((4, 6))
    D = tensor_from_elements(d6)
    np.testing.assert_array_equal(D, np.swapaxes(D, -1, -2))
    np.testing.assert_allclose(D, from_lower_triangular(d6))
    np.testing.assert_allclose(tensor_elements(D), d6)
    np.testing.assert_allclose(lower_triangular(D), d6)

    w15 = rng.standard_normal((4, 15))
    W = kurtosis_from_elements(w15)
    for perm in [(1, 0, 2, 3), (2, 3, 0, 1), (0, 3, 1, 2), (3, 2, 1, 0)]:
        np.testing.assert_array_equal(W, W.transpose(0, *(1 + np.array(perm))))
    np.testing.assert_allclose(kurtosis_elements(W), w15, atol=1e-15)
    # dipy's order by name: Wxxxy is element 3, Wyyyz element 6, Wxxyz element 12, Wxyzz element 14.
    assert W[0, 0, 0, 0, 1] == w15[0, 3] and W[0, 1, 2, 1, 1] == w15[0, 6]
    assert W[0, 1, 0, 2, 0] == w15[0, 12] and W[0, 2, 1, 0, 2] == w15[0, 14]


def test_dki_signal_matches_dipy_simulation():
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import dki_signal as dipy_dki_signal

    rng = np.random.default_rng(1)
    gtab = _gtab(rng)
    D, W = cumulant_tensors(*multi_tensor_moments(*_mixtures(rng, 1, 3)))
    ours = dki_signal(gtab, D[0], W[0], S0=100.0)
    theirs = dipy_dki_signal(
        gradient_table(gtab.bvals, bvecs=gtab.bvecs), tensor_elements(D[0]), kurtosis_elements(W[0]), S0=100.0, snr=None
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_tensor_constructors():
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    evals = np.array([2e-3, 1e-3, 0.5e-3])
    D = tensor_from_eig(evals, Q)
    np.testing.assert_allclose(np.linalg.eigvalsh(D)[::-1], evals, rtol=1e-12)
    np.testing.assert_allclose(D @ Q[:, 0], evals[0] * Q[:, 0], atol=1e-18)
    u = np.array([1.0, 2.0, 2.0])
    A = axially_symmetric_tensor(u, 2e-3, 0.4e-3)
    np.testing.assert_allclose(A @ u, 2e-3 * u, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(A), [0.4e-3, 0.4e-3, 2e-3], rtol=1e-12)


def test_dki_without_kurtosis_is_dti_and_one_compartment_mixture_is_dti():
    rng = np.random.default_rng(3)
    gtab = _gtab(rng)
    _, tensors = _mixtures(rng, 5, 1)
    D = tensors[:, 0]
    S0 = rng.uniform(50, 150, 5)
    expected = dti_signal(gtab, D, S0)
    np.testing.assert_allclose(dki_signal(gtab, D, np.zeros((5, 3, 3, 3, 3)), S0), expected, rtol=1e-14)
    np.testing.assert_allclose(multi_tensor_signal(gtab, np.ones((5, 1)), tensors, S0), expected, rtol=1e-14)
    # An explicit Gaussian: S = S0 exp(-b gᵀDg).
    g, b = gtab.bvecs[5], gtab.bvals[5]
    np.testing.assert_allclose(expected[:, 5], S0 * np.exp(-b * np.einsum("i,nij,j->n", g, D, g)), rtol=1e-14)


def test_derivatives_of_dki_log_signal_at_b0():
    # d/db log S = -D(g) and d²/db² log S = MD² W(g) / 3 at b = 0 (Jensen et al. 2005); log S is
    # quadratic in b, so the three-point one-sided differences are exact up to round-off.
    rng = np.random.default_rng(4)
    D, W = cumulant_tensors(*multi_tensor_moments(*_mixtures(rng, 1, 3)))
    D, W = D[0], W[0]
    g = _unit(rng, 8)
    h = 100.0
    b = np.array([0.0, h, 2 * h])
    gtab = GradientTable(np.tile(b, len(g)), np.repeat(g, 3, axis=0) * (np.tile(b, len(g)) > 0)[:, None])
    f0, f1, f2 = np.log(dki_signal(gtab, D, W, S0=3.0) / 3.0).reshape(len(g), 3).T
    first = (-3 * f0 + 4 * f1 - f2) / (2 * h)
    second = (f0 - 2 * f1 + f2) / h**2
    md = np.trace(D) / 3
    np.testing.assert_allclose(first, -np.einsum("mi,ij,mj->m", g, D, g), rtol=1e-9)
    np.testing.assert_allclose(second, md**2 * np.einsum("mi,mj,mk,ml,ijkl->m", g, g, g, g, W) / 3, rtol=1e-6)


def test_mixture_cumulants_agree_with_numerical_expansion_of_the_signal():
    # D(g) and K(g) from the moments must equal the first two derivatives of log S(b) of the
    # multi-tensor signal at b = 0, here read off a polynomial fit of log S on small b.
    rng = np.random.default_rng(5)
    g = _unit(rng, 25)
    b = np.linspace(0, 250, 26)
    gtab = GradientTable(np.tile(b, len(g)), np.repeat(g, len(b), axis=0) * (np.tile(b, len(g)) > 0)[:, None])
    for n_comp in (2, 3):
        fractions, tensors = _mixtures(rng, 6, n_comp)
        D, W = cumulant_tensors(*multi_tensor_moments(fractions, tensors))
        log_s = np.log(multi_tensor_signal(gtab, fractions, tensors)).reshape(6, len(g), len(b))
        coef = np.polynomial.polynomial.polyfit(b / b.max(), log_s.reshape(-1, len(b)).T, deg=9)
        c1 = coef[1].reshape(6, len(g)) / b.max()
        c2 = coef[2].reshape(6, len(g)) / b.max() ** 2
        adc, K = _directional(D, W, g)
        np.testing.assert_allclose(-c1, adc, rtol=1e-6)
        np.testing.assert_allclose(6 * c2 / c1**2, K, rtol=1e-4)


def test_cumulants_match_dipy_multi_tensor_dki_for_a_crossing():
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import multi_tensor_dki

    rng = np.random.default_rng(6)
    gtab = _gtab(rng)
    mevals = np.array([[1.7e-3, 0.3e-3, 0.3e-3], [1.5e-3, 0.4e-3, 0.4e-3]])
    _, dt, kt = multi_tensor_dki(
        gradient_table(gtab.bvals, bvecs=gtab.bvecs), mevals, S0=1.0, angles=[(0, 0), (90, 0)],
        fractions=[60, 40], snr=None,
    )
    tensors = axially_symmetric_tensor(np.array([[0.0, 0, 1], [1, 0, 0]]), mevals[:, 0], mevals[:, 1])
    D, W = cumulant_tensors(*multi_tensor_moments([0.6, 0.4], tensors))
    np.testing.assert_allclose(tensor_elements(D), dt, rtol=1e-10, atol=1e-18)
    np.testing.assert_allclose(kurtosis_elements(W), kt, rtol=1e-10, atol=1e-12)
    g = _unit(rng, 50)
    ours = _directional(D, W, g)
    theirs = _directional(tensor_from_elements(dt), kurtosis_from_elements(kt), g)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_cumulant_tensors_of_gaussian_and_zero_voxels():
    _, W = cumulant_tensors(*multi_tensor_moments([1.0], np.eye(3)[None] * 1e-3))
    np.testing.assert_allclose(W, 0.0, atol=1e-12)
    _, W = cumulant_tensors(np.zeros((2, 3, 3)), np.zeros((2, 3, 3, 3, 3)))
    assert np.all(W == 0) and np.all(np.isfinite(W))


def test_rician_noise_moments():
    rng = np.random.default_rng(7)
    S = np.full((20000, 10), 0.6)
    sigma = 1.0 / 20
    noisy = rician_noise(S, snr=20.0, rng=rng)
    # E|S + noise|² = S² + 2σ² (standard error of the mean of M² is ~ 2Sσ / sqrt(N) here).
    np.testing.assert_allclose(np.mean(noisy**2), 0.6**2 + 2 * sigma**2, rtol=2e-3)
    # Pure noise is Rayleigh: E[M] = σ sqrt(π/2), E[M²] = 2σ².
    rayleigh = rician_noise(np.zeros((20000, 10)), snr=4.0, s0=2.0, rng=1)
    sigma = 2.0 / 4.0
    np.testing.assert_allclose(np.sqrt(np.mean(rayleigh**2) / 2), sigma, rtol=5e-3)
    np.testing.assert_allclose(np.mean(rayleigh), sigma * np.sqrt(np.pi / 2), rtol=5e-3)
    # Per-voxel reference signal: σ scales with s0, and a seed reproduces the draw.
    s0 = np.array([1.0, 4.0])
    noisy = rician_noise(np.zeros((2, 50000)), snr=10.0, s0=s0, rng=3)
    np.testing.assert_allclose(np.sqrt(np.mean(noisy**2, axis=1) / 2), s0 / 10, rtol=1e-2)
    np.testing.assert_array_equal(noisy, rician_noise(np.zeros((2, 50000)), snr=10.0, s0=s0, rng=3))


@pytest.mark.parametrize(
    "call, source",
    [
        (lambda g: dti_signal(g, np.ones((3, 2))), "D"),
        (lambda g: dti_signal(g, np.full((3, 3), np.nan)), "D"),
        (lambda g: dti_signal(g, np.array([[1.0, 1, 0], [0, 1, 0], [0, 0, 1]])), "D"),
        (lambda g: dti_signal(g, np.eye(3), S0=-1.0), "S0"),
        (lambda g: dki_signal(g, np.eye(3), np.ones((3, 3, 3))), "W"),
        (lambda g: multi_tensor_signal(g, [0.5, 0.6], np.stack([np.eye(3)] * 2)), "fractions"),
        (lambda g: multi_tensor_signal(g, [1.2, -0.2], np.stack([np.eye(3)] * 2)), "fractions"),
        (lambda g: multi_tensor_signal(g, [0.5, 0.5], np.stack([np.eye(3)] * 3)), "tensors"),
        (lambda g: rician_noise(np.ones((2, 3)), snr=0.0), "snr"),
        (lambda g: rician_noise(np.ones((2, 3)), snr=10.0, s0=np.ones(3)), "s0"),
        (lambda g: axially_symmetric_tensor([0.0, 0.0, 0.0], 1e-3, 1e-3), "direction"),
        (lambda g: dti_signal("not a table", np.eye(3)), "gtab"),
    ],
)
def test_bad_input_raises_input_error(call, source):
    gtab = _gtab(np.random.default_rng(8), n_dirs=6)
    with pytest.raises(InputError) as info:
        call(gtab)
    assert info.value.source == source
