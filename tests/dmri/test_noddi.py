import warnings

import numpy as np
import pytest
from scipy.integrate import IntegrationWarning, dblquad, quad
from scipy.special import erf, eval_legendre, roots_legendre

from bioinverse.dmri import noddi
from bioinverse.dmri.io import GradientTable
from bioinverse.dmri.noddi import (
    NODDIModel,
    kappa_to_odi,
    neurite_signal,
    noddi_moments,
    noddi_signal,
    odi_to_kappa,
    stick_signal_watson,
    watson_moments,
)
from bioinverse.errors import InputError

D_PAR = 1.7e-3


def _hemisphere(n, offset=0.0):
    i = np.arange(n) + 0.5
    z = 1 - i / n
    phi = np.pi * (3 - np.sqrt(5)) * i + offset
    r = np.sqrt(1 - z**2)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def _noddi_protocol():
    """The 99-volume NODDI protocol: 9 b0, 30 directions at b = 711, 60 at b = 2855 s/mm²."""
    g = np.r_[np.zeros((9, 3)), _hemisphere(30), _hemisphere(60, 0.5)]
    b = np.r_[np.zeros(9), np.full(30, 711.0), np.full(60, 2855.0)]
    return GradientTable(b, g)


def _table(b, cosines):
    """One volume per (b, cos) pair, mean axis z: direction at angle arccos(cos) from z."""
    b, c = np.broadcast_arrays(np.asarray(b, float), np.asarray(cosines, float))
    g = np.column_stack([np.sqrt(1 - c.ravel() ** 2), np.zeros(c.size), c.ravel()])
    return GradientTable(b.ravel(), g)


def _watson_mean(kappa, f):
    """⟨f(t)⟩ over t = μ·n with weight exp(κ t²) (f even), adaptive quadrature split at the peak."""
    split = [max(0.0, 1.0 - 40.0 / kappa)] if kappa > 40 else []

    def integral(g):
        with warnings.catch_warnings():
            # Tiny high-order integrals cannot meet the relative tolerance; the absolute one holds.
            warnings.simplefilter("ignore", IntegrationWarning)
            return sum(quad(g, lo, hi, epsabs=1e-22, epsrel=2e-14, limit=200)[0]
                       for lo, hi in zip([0.0] + split, split + [1.0]))

    def weight(t):
        return np.exp(kappa * (t * t - 1))

    return integral(lambda t: f(t) * weight(t)) / integral(weight)


def _brute_stick(kappa, x, cosine, nt=800, nb=128):
    """E_ic by a tensor-product rule: Gauss–Legendre in μ·n, trapezoid in the azimuth about μ."""
    t, wt = roots_legendre(nt)
    beta = 2 * np.pi * np.arange(nb) / nb
    gn = cosine * t[:, None] + np.sqrt(1 - cosine**2) * np.sqrt(1 - t[:, None] ** 2) * np.cos(beta)
    density = wt * np.exp(kappa * (t**2 - 1))
    return density @ np.exp(-x * gn**2).mean(axis=1) / density.sum()


# --------------------------------------------------------------------------------------------
# Watson distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [0.0, 1e-7, 0.01, 0.5, 0.999, 1.0, 1.001, 3.0, 16.0, 64.0, 400.0, 1e5])
def test_watson_moments_match_quadrature(kappa):
    m2, m4 = watson_moments(kappa)
    assert m2 == pytest.approx(_watson_mean(kappa, lambda t: t**2), rel=1e-13)
    assert m4 == pytest.approx(_watson_mean(kappa, lambda t: t**4), rel=1e-13)


def test_watson_moments_limits_and_shape():
    m2, m4 = watson_moments(np.array([[0.0, np.inf]]))
    assert m2.shape == (1, 2)
    np.testing.assert_allclose(m2, [[1 / 3, 1]], rtol=1e-15)
    np.testing.assert_allclose(m4, [[1 / 5, 1]], rtol=1e-15)
    # Large κ: 1 - m2 ≈ 1/κ (the orientations' transverse spread).
    assert 1 - watson_moments(1e8)[0] == pytest.approx(1e-8, rel=1e-6)


def test_odi_kappa_round_trip():
    odi = np.linspace(0, 1, 11)
    kappa = odi_to_kappa(odi)
    assert kappa[0] == np.inf and kappa[-1] == 0.0
    np.testing.assert_allclose(kappa_to_odi(kappa), odi, atol=1e-15)
    assert odi_to_kappa(0.5) == pytest.approx(1.0)


@pytest.mark.parametrize("kappa", [0.0, 0.01, 1.0, 10.0, 128.0, 999.0])
def test_watson_legendre_coefficients_match_quadrature(kappa):
    a = noddi._watson_coefficients(np.array(kappa), 40)
    ref = [_watson_mean(kappa, lambda t, l=l: eval_legendre(l, t)) for l in range(0, 41, 2)]
    np.testing.assert_allclose(a, ref, atol=1e-13)


def test_watson_coefficient_branches_agree():
    # κ > 1000 uses Gauss–Laguerre; near the switch both methods must give the same numbers.
    kappa = np.array([1001.0, 3000.0])
    recurrence = noddi._legendre_moment_ratios(kappa, 40)
    laguerre = noddi._watson_coefficients(kappa, 40)
    np.testing.assert_allclose(laguerre, recurrence, atol=1e-13)
    np.testing.assert_allclose(noddi._watson_coefficients(np.array(np.inf), 10), np.ones(6), rtol=1e-14)


def test_legendre_gaussian_integrals_match_quadrature():
    x = np.array([0.0, 1e-6, 0.3, 4.85, 10.0, 40.0])
    values = noddi._legendre_gaussian_integrals(x, 30)
    for i, xi in enumerate(x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IntegrationWarning)
            ref = [quad(lambda t, l=l, xi=xi: np.exp(-xi * t * t) * eval_legendre(l, t), 0, 1,
                        epsabs=1e-15, epsrel=1e-13)[0]
                   for l in range(0, 31, 2)]
        np.testing.assert_allclose(values[i], ref, atol=1e-14)


def test_series_order_documented_values():
    assert [noddi._series_order(x) for x in (1.0, 5.0, 10.0)] == [16, 26, 34]


def test_fourth_moment_tensor_matches_quadrature():
    rng = np.random.default_rng(4)
    mu = rng.standard_normal(3)
    mu /= np.linalg.norm(mu)
    # Sphere quadrature aligned with μ: Gauss–Legendre in μ·n, trapezoid in azimuth.
    t, wt = roots_legendre(300)
    beta = 2 * np.pi * np.arange(64) / 64
    e1 = np.cross(mu, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(mu, e1)
    s = np.sqrt(1 - t**2)[:, None]
    n = t[:, None, None] * mu + (s * np.cos(beta))[..., None] * e1 + (s * np.sin(beta))[..., None] * e2
    n = n.reshape(-1, 3)
    for kappa in (0.0, 0.7, 9.0, 60.0):
        weight = (wt[:, None] * np.exp(kappa * (t[:, None] ** 2 - 1)) * np.ones_like(beta)).ravel()
        weight /= weight.sum()
        second = np.einsum("q,qi,qj->ij", weight, n, n)
        fourth = np.einsum("q,qi,qj,qk,ql->ijkl", weight, n, n, n, n)
        # icvf = 1, isovf = 0: M1 = d_par ⟨nnᵀ⟩ and M2 = d_par² ⟨n⊗n⊗n⊗n⟩.
        M1, M2 = noddi_moments(1.0, kappa_to_odi(kappa), 0.0, mu, d_par=1.0)
        np.testing.assert_allclose(M1, second, atol=1e-13)
        np.testing.assert_allclose(M2, fourth, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Stick signal
# --------------------------------------------------------------------------------------------


def test_stick_signal_matches_brute_force_quadrature():
    # Truncation must stay below 1e-6 for κ ≤ 128 and b d_par ≤ 10 (the bound is 1e-9).
    cosines = np.array([0.0, 0.3, 0.7071, 0.95, 1.0])
    worst = 0.0
    for kappa in (0.01, 0.5, 2.0, 8.0, 32.0, 64.0, 128.0):
        for x in (0.1, 1.0, 4.0, 10.0):
            mine = stick_signal_watson(_table(x / D_PAR, cosines), kappa, [0, 0, 1], D_PAR)
            ref = np.array([_brute_stick(kappa, x, c) for c in cosines])
            worst = max(worst, np.abs(mine - ref).max())
    assert worst < 1e-8


def test_stick_signal_matches_dblquad_in_lab_frame():
    # An independent parametrisation: spherical angles of n in the lab frame, tilted μ.
    kappa, x = 4.0, 2.0
    mu = np.array([np.sin(0.4) * np.cos(1.0), np.sin(0.4) * np.sin(1.0), np.cos(0.4)])
    g = np.array([1.0, 0.0, 0.0])
    norm = 4 * np.pi * quad(lambda t: np.exp(kappa * t * t), 0, 1)[0]

    def integrand(phi, theta):
        n = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
        return np.exp(kappa * (mu @ n) ** 2 - x * (g @ n) ** 2) * np.sin(theta)

    ref = dblquad(integrand, 0, np.pi, 0, 2 * np.pi, epsabs=1e-12, epsrel=1e-11)[0] / norm
    mine = stick_signal_watson(GradientTable(np.array([x / D_PAR]), g[None]), kappa, mu, D_PAR)
    assert mine[0] == pytest.approx(ref, abs=1e-9)


def test_stick_signal_limits():
    cosines = np.linspace(0, 1, 7)
    b = np.array([100.0, 1000.0, 3000.0, 5000.0])[:, None]
    table = _table(b, cosines)
    x = table.bvals * D_PAR
    c = table.bvecs[:, 2]
    single_stick = np.exp(-x * c**2)
    # Within the series' truncation bound (1e-9) even for perfectly aligned sticks.
    np.testing.assert_allclose(stick_signal_watson(table, np.inf, [0, 0, 1]), single_stick, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stick_signal_watson(table, 1e7, [0, 0, 1]), single_stick, atol=1e-6)
    powder = np.sqrt(np.pi / (4 * x)) * erf(np.sqrt(x))
    np.testing.assert_allclose(stick_signal_watson(table, 0.0, [0, 0, 1]), powder, atol=1e-12)
    np.testing.assert_allclose(stick_signal_watson(table, 1e-9, [0, 0, 1]), powder, atol=1e-9)


def test_stick_signal_broadcasts_and_depends_on_angle_only():
    rng = np.random.default_rng(0)
    table = _noddi_protocol()
    mu = rng.standard_normal((4, 3))
    kappa = np.array([[0.5], [20.0]])
    out = stick_signal_watson(table, kappa, mu, D_PAR)
    assert out.shape == (2, 4, len(table))
    np.testing.assert_allclose(out[:, :, :9], 1.0, atol=1e-14)
    # Rotating both μ and the gradients leaves the signal unchanged; μ → -μ too.
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    rotated = GradientTable(table.bvals, table.bvecs @ q.T)
    np.testing.assert_allclose(stick_signal_watson(rotated, 20.0, -mu[0] @ q.T), out[1, 0], atol=1e-13)
    # A diffusivity per voxel equals separate calls.
    per_voxel = stick_signal_watson(table, 5.0, mu[:2], np.array([1.5e-3, 2.2e-3]))
    np.testing.assert_allclose(per_voxel[1], stick_signal_watson(table, 5.0, mu[1], 2.2e-3), atol=1e-14)


# --------------------------------------------------------------------------------------------
# Neurite and full NODDI signals
# --------------------------------------------------------------------------------------------


def test_zeppelin_limits():
    table = _table(np.array([700.0, 2800.0])[:, None], np.linspace(0, 1, 5))
    b, c = table.bvals, table.bvecs[:, 2]
    # No neurites: tortuosity gives d_perp = d_par, an isotropic tensor whatever κ.
    for kappa in (0.0, 3.0, np.inf):
        np.testing.assert_allclose(neurite_signal(table, 0.0, kappa, [0, 0, 1]), np.exp(-b * D_PAR),
                                   rtol=1e-14)
    icvf = 0.4
    d_perp = D_PAR * (1 - icvf)
    stick_aligned = np.exp(-b * D_PAR * c**2)
    zeppelin = np.exp(-b * (d_perp + (D_PAR - d_perp) * c**2))
    np.testing.assert_allclose(neurite_signal(table, icvf, np.inf, [0, 0, 1]),
                               icvf * stick_aligned + (1 - icvf) * zeppelin, rtol=0, atol=1e-9)
    # κ = 0: ⟨nnᵀ⟩ = I/3, so the zeppelin is isotropic with d_perp + (d_par - d_perp)/3.
    powder = np.sqrt(np.pi / (4 * b * D_PAR)) * erf(np.sqrt(b * D_PAR))
    isotropic = np.exp(-b * (d_perp + (D_PAR - d_perp) / 3))
    np.testing.assert_allclose(neurite_signal(table, icvf, 0.0, [0, 0, 1]),
                               icvf * powder + (1 - icvf) * isotropic, rtol=1e-12)


def test_noddi_signal_mixture_and_s0():
    table = _noddi_protocol()
    mu = np.array([0.2, -0.5, 0.8])
    neurite = neurite_signal(table, 0.55, odi_to_kappa(0.25), mu)
    expected = 80.0 * (0.7 * neurite + 0.3 * np.exp(-table.bvals * 3e-3))
    np.testing.assert_allclose(noddi_signal(table, 0.55, 0.25, 0.3, mu, S0=80.0), expected, rtol=1e-14)
    # All CSF: mono-exponential at d_iso.
    np.testing.assert_allclose(noddi_signal(table, 0.55, 0.25, 1.0, mu), np.exp(-table.bvals * 3e-3),
                               rtol=1e-14)


def _symmetrise(T):
    return (T + np.swapaxes(T, -3, -2) + np.moveaxis(T, -1, -3).swapaxes(-1, -2)) / 3


def test_noddi_moments_give_exact_cumulants():
    """D(g) and K(g) from the moments equal the small-b derivatives of log S."""
    rng = np.random.default_rng(3)
    b = np.linspace(0, 300, 31)
    for _ in range(4):
        icvf, odi, isovf = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.95), rng.uniform(0, 0.5)
        mu = rng.standard_normal(3)
        M1, M2 = noddi_moments(icvf, odi, isovf, mu)
        D = M1
        md = np.trace(D) / 3
        W = 3 / md**2 * (_symmetrise(M2) - _symmetrise(np.einsum("ij,kl->ijkl", D, D)))
        dirs = rng.standard_normal((5, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        table = GradientTable(np.tile(b, 5), np.repeat(dirs, b.size, axis=0))
        log_signal = np.log(noddi_signal(table, icvf, odi, isovf, mu)).reshape(5, b.size)
        for g, row in zip(dirs, log_signal):
            coefficients = np.polynomial.polynomial.polyfit(b, row, 7)
            d_numeric = -coefficients[1]
            k_numeric = 6 * coefficients[2] / d_numeric**2
            d_g = g @ D @ g
            k_g = md**2 * np.einsum("ijkl,i,j,k,l", W, g, g, g, g) / d_g**2
            assert d_numeric == pytest.approx(d_g, rel=1e-6)
            assert k_numeric == pytest.approx(k_g, rel=1e-4)


def test_noddi_moments_shapes_and_weight():
    M1, M2 = noddi_moments(np.full((2, 3), 0.5), 0.3, 0.1, [1.0, 0, 0], weight=np.full((2, 3), 0.25))
    assert M1.shape == (2, 3, 3, 3) and M2.shape == (2, 3, 3, 3, 3, 3)
    single = noddi_moments(0.5, 0.3, 0.1, [1.0, 0, 0])
    np.testing.assert_allclose(M1[1, 2], 0.25 * single[0], rtol=1e-14)
    np.testing.assert_allclose(M2[0, 0], 0.25 * single[1], rtol=1e-14)
    # tr M1 = Σ f_c tr D_c: tr(d_par nnᵀ) = d_par, tr D_ec = 2 d_perp + d_par, tr(d_iso I) = 3 d_iso.
    d_perp = 0.5 * D_PAR
    trace = 0.45 * D_PAR + 0.45 * (2 * d_perp + D_PAR) + 0.1 * 3 * 3e-3
    assert np.trace(single[0]) == pytest.approx(trace, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def test_jacobian_matches_finite_differences():
    protocol = noddi._Protocol.build(_noddi_protocol(), D_PAR, 3e-3)
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(0.1, 0.9, 4), rng.uniform(0.05, 0.9, 4), rng.uniform(0, 0.5, 4)])
    mu = rng.standard_normal((4, 3))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    signal, jacobian = noddi._evaluate(protocol, params, mu)
    np.testing.assert_allclose(signal, noddi_signal(_noddi_protocol(), *params.T, mu), atol=1e-14)
    e1, e2 = noddi._tangent_basis(mu)
    h = 1e-6
    for p in range(5):
        plus, minus = params.copy(), params.copy()
        mu_plus, mu_minus = mu, mu
        if p < 3:
            plus[:, p] += h
            minus[:, p] -= h
        else:
            e = e1 if p == 3 else e2
            mu_plus = (mu + h * e) / np.linalg.norm(mu + h * e, axis=1, keepdims=True)
            mu_minus = (mu - h * e) / np.linalg.norm(mu - h * e, axis=1, keepdims=True)
        forward = noddi._evaluate(protocol, plus, mu_plus)[0]
        backward = noddi._evaluate(protocol, minus, mu_minus)[0]
        numeric = (forward - backward) / (2 * h)
        np.testing.assert_allclose(jacobian[..., p], numeric, atol=1e-8)


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)), 0, 1)))


def test_fit_recovers_noise_free_parameters():
    table = _noddi_protocol()
    icvf = np.array([[0.7, 0.45, 0.2], [0.6, 0.3, 0.85]])
    odi = np.array([[0.04, 0.2, 0.5], [0.12, 0.35, 0.08]])
    isovf = np.array([[0.0, 0.1, 0.3], [0.05, 0.0, 0.15]])
    rng = np.random.default_rng(5)
    mu = rng.standard_normal((2, 3, 3))
    mu /= np.linalg.norm(mu, axis=-1, keepdims=True)
    data = noddi_signal(table, icvf, odi, isovf, mu, S0=250.0)
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    fit = NODDIModel(table).fit(data, mask=mask)
    for name, truth in (("icvf", icvf), ("odi", odi), ("isovf", isovf)):
        estimate = getattr(fit, name)
        np.testing.assert_allclose(estimate[mask], truth[mask], atol=1e-3, err_msg=name)
        assert estimate[1, 2] == 0
    assert _angle_deg(fit.direction[mask], mu[mask]).max() < 1.0
    np.testing.assert_allclose(fit.S0[mask], 250.0)
    np.testing.assert_allclose(fit.kappa[mask], odi_to_kappa(odi[mask]), rtol=1e-2)
    assert fit.residual[mask].max() < 1e-6
    assert (fit.direction[mask][:, 2] >= 0).all()
    np.testing.assert_array_equal(fit.direction[1, 2], 0)
    predicted = fit.predict(table)
    np.testing.assert_allclose(predicted[mask], data[mask], atol=1e-4)
    np.testing.assert_array_equal(predicted[1, 2], 0)
    np.testing.assert_allclose(fit.predict(table, S0=1.0)[mask], data[mask] / 250.0, atol=1e-6)


def test_fit_noisy_voxels_have_small_errors():
    table = _noddi_protocol()
    rng = np.random.default_rng(11)
    n = 300
    icvf, odi, isovf = rng.uniform(0.3, 0.8, n), rng.uniform(0.03, 0.5, n), rng.uniform(0.0, 0.2, n)
    mu = rng.standard_normal((n, 3))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    clean = noddi_signal(table, icvf, odi, isovf, mu, S0=100.0)
    sigma = 100.0 / 50
    noisy = np.abs(clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)))
    fit = NODDIModel(table).fit(noisy)
    rmse = {name: np.sqrt(np.mean((getattr(fit, name) - truth) ** 2))
            for name, truth in (("icvf", icvf), ("odi", odi), ("isovf", isovf))}
    assert rmse["icvf"] < 0.04 and rmse["odi"] < 0.04 and rmse["isovf"] < 0.04
    assert np.median(_angle_deg(fit.direction, mu)) < 4.0
    # The fitted cost never exceeds the cost of the true parameters by more than rounding.
    normalised = noisy / fit.S0[:, None]
    true_rms = np.sqrt(np.mean((normalised - noddi_signal(table, icvf, odi, isovf, mu)) ** 2, axis=1))
    assert np.mean(fit.residual <= true_rms + 1e-9) > 0.97


def test_fit_progress_bar_and_empty_mask(capsys):
    table = _noddi_protocol()
    data = noddi_signal(table, 0.5, 0.2, 0.1, [0, 0, 1], S0=np.ones((2, 1)))
    fit = NODDIModel(table).fit(data, progress=True)
    assert fit.icvf == pytest.approx(0.5, abs=1e-3)
    empty = NODDIModel(table).fit(data, mask=np.zeros((2, 1), dtype=bool))
    assert not empty.odi.any() and not empty.predict(table).any()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_input_error():
    table = _noddi_protocol()
    one_shell = GradientTable(np.r_[0.0, np.full(6, 1000.0)], np.r_[np.zeros((1, 3)), np.eye(3), np.eye(3)])
    no_b0 = GradientTable(np.r_[np.full(3, 1000.0), np.full(3, 2000.0)], np.r_[np.eye(3), np.eye(3)])
    with pytest.raises(InputError, match="gtab.*1 non-zero shell"):
        NODDIModel(one_shell)
    with pytest.raises(InputError, match="gtab.*no b = 0"):
        NODDIModel(no_b0)
    with pytest.raises(InputError, match="d_par"):
        NODDIModel(table, d_par=-1e-3)
    model = NODDIModel(table)
    good = np.ones((2, len(table)))
    with pytest.raises(InputError, match="data.*99 volumes"):
        model.fit(np.ones((2, 98)))
    bad = good.copy()
    bad[0, 3] = np.nan
    with pytest.raises(InputError, match="data.*NaN or Inf in 1 voxel"):
        model.fit(bad)
    # Outside the mask anything goes (background of real images).
    assert model.fit(bad, mask=np.array([False, True])).odi[0] == 0
    with pytest.raises(InputError, match="mask.*shape"):
        model.fit(good, mask=np.ones(3, dtype=bool))
    with pytest.raises(InputError, match="mask"):
        model.fit(good, mask=np.array([0.5, 1.0]))
    with pytest.raises(InputError, match="kappa"):
        stick_signal_watson(table, -1.0, [0, 0, 1])
    with pytest.raises(InputError, match="mu.*zero"):
        stick_signal_watson(table, 1.0, [0, 0, 0])
    with pytest.raises(InputError, match="mu.*shape"):
        stick_signal_watson(table, 1.0, [0, 1])
    with pytest.raises(InputError, match="icvf"):
        neurite_signal(table, 1.2, 1.0, [0, 0, 1])
    with pytest.raises(InputError, match="odi"):
        noddi_signal(table, 0.5, -0.1, 0.0, [0, 0, 1])
    with pytest.raises(InputError, match="isovf"):
        noddi_moments(0.5, 0.2, np.inf, [0, 0, 1])
    with pytest.raises(InputError, match="broadcast"):
        noddi_signal(table, np.ones(3) * 0.5, np.ones(4) * 0.2, 0.0, [0, 0, 1])
    with pytest.raises(InputError, match="gtab"):
        stick_signal_watson(np.zeros(3), 1.0, [0, 0, 1])
    with pytest.raises(InputError, match="kappa"):
        watson_moments("a")
    with pytest.raises(InputError, match="gtab.*negative"):
        stick_signal_watson(GradientTable(np.array([-5.0, 1000.0]), np.eye(3)[:2]), 1.0, [0, 0, 1])
    fit = model.fit(noddi_signal(table, 0.5, 0.2, 0.1, [0, 0, 1], S0=np.ones(2)))
    with pytest.raises(InputError, match="S0"):
        fit.predict(table, S0=np.ones(3))
