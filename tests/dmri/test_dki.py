import numpy as np
import pytest
import scipy.optimize
import scipy.special

from bioinverse.dmri import dki
from bioinverse.dmri.dki import DKIModel, design_matrix, kurtosis_measures
from bioinverse.dmri.io import GradientTable
from bioinverse.dmri.signal import (
    axially_symmetric_tensor,
    cumulant_tensors,
    dki_signal,
    kurtosis_elements,
    kurtosis_from_elements,
    multi_tensor_moments,
    multi_tensor_signal,
    rician_noise,
    tensor_elements,
    tensor_from_eig,
)
from bioinverse.errors import InputError

ISOTROPIC_W = kurtosis_from_elements([1, 1, 1, 0, 0, 0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])


def _unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _gtab(rng, shells=(1000.0, 2000.0), n_dirs=32, n_b0=2):
    g = _unit(rng, n_dirs)
    bvals = np.concatenate([np.zeros(n_b0)] + [np.full(n_dirs, b) for b in shells])
    return GradientTable(bvals, np.concatenate([np.zeros((n_b0, 3))] + [g] * len(shells)))


def _tissue(rng, n):
    """Cumulant tensors of brain-like mixtures: a fibre (stick + zeppelin), a crossing one, free water."""
    axes = rng.standard_normal((n, 2, 3))
    d_par = rng.uniform(1.5e-3, 2.2e-3, (n, 1))
    tensors = np.concatenate(
        [
            axially_symmetric_tensor(axes, d_par, 0.3e-3),
            axially_symmetric_tensor(axes, d_par, rng.uniform(0.4e-3, 0.9e-3, (n, 2))),
            np.broadcast_to(np.eye(3) * 3e-3, (n, 1, 3, 3)),
        ],
        axis=1,
    )
    fractions = rng.dirichlet([4, 4, 2, 2, 0.5], size=n)
    return fractions, tensors, *cumulant_tensors(*multi_tensor_moments(fractions, tensors))


def _plausible(rng, n, b_max):
    """Tensors of :func:`_tissue` whose signal keeps decaying up to ``b_max`` (with a margin), i.e.
    that satisfy the fit's constraints: K(n) D(n) ≤ 0.9 · 3 / b_max on a dense direction set."""
    _, _, D, W = _tissue(rng, 4 * n)
    g = _sphere(400)
    adc = np.einsum("mi,vij,mj->vm", g, D, g)
    keep = np.flatnonzero((_apparent_kurtosis(D, W, g) * adc).max(axis=1) < 0.9 * 3 / b_max)[:n]
    assert keep.size == n
    return D[keep], W[keep]


def _sphere(n):
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(1 - z**2)
    phi = i * np.pi * (3 - np.sqrt(5))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _apparent_kurtosis(D, W, g):
    adc = np.einsum("mi,...ij,mj->...m", g, D, g)
    g4 = np.einsum("mi,mj,mk,ml->mijkl", g, g, g, g).reshape(len(g), 81)
    adv = W.reshape(W.shape[:-4] + (81,)) @ g4.T
    md = np.trace(D, axis1=-2, axis2=-1)[..., None] / 3
    return md**2 * adv / adc**2


def _dipy_params(D, W):
    from dipy.reconst.dti import decompose_tensor, from_lower_triangular

    evals, evecs = decompose_tensor(from_lower_triangular(tensor_elements(D)))
    return np.concatenate([evals, evecs.reshape(len(evals), 9), kurtosis_elements(W)], axis=1)


# --------------------------------------------------------------------------------------------------
# design and noise-free recovery


def test_design_matrix_reproduces_the_log_signal():
    rng = np.random.default_rng(0)
    gtab = _gtab(rng)
    _, _, D, W = _tissue(rng, 3)
    md = np.trace(D, axis1=1, axis2=2) / 3
    x = np.concatenate([np.log([50.0, 80.0, 120.0])[:, None], tensor_elements(D), kurtosis_elements(W) * md[:, None] ** 2], 1)
    np.testing.assert_allclose(x @ design_matrix(gtab).T, np.log(dki_signal(gtab, D, W, [50.0, 80.0, 120.0])), rtol=1e-13)


@pytest.mark.parametrize("fit_method", ["WLS", "OLS"])
def test_noise_free_recovery(fit_method):
    rng = np.random.default_rng(1)
    gtab = _gtab(rng)
    _, _, D, W = _tissue(rng, 300)
    S0 = rng.uniform(50, 200, 300)
    fit = DKIModel(gtab, fit_method=fit_method, constrained=False).fit(dki_signal(gtab, D, W, S0))
    np.testing.assert_allclose(fit.S0, S0, rtol=1e-9)
    assert np.abs(fit.diffusion_tensor - D).max() < 1e-6 * np.abs(D).max()
    assert np.abs(fit.kurtosis_tensor - W).max() < 1e-6 * np.abs(W).max()
    np.testing.assert_allclose(fit.predict(gtab), dki_signal(gtab, D, W, S0), rtol=1e-8)


def test_constrained_fit_equals_wls_where_the_constraints_hold():
    rng = np.random.default_rng(2)
    gtab = _gtab(rng, shells=(1000.0, 2000.0))
    D, W = _plausible(rng, 200, b_max=2000.0)
    data = dki_signal(gtab, D, W, 100.0)
    free = DKIModel(gtab, constrained=False).fit(data)
    constrained = DKIModel(gtab, constrained=True).fit(data)
    np.testing.assert_array_equal(constrained.params, free.params)
    assert np.abs(constrained.kurtosis_tensor - W).max() < 1e-6 * np.abs(W).max()


def test_fit_keeps_leading_shape_and_zeroes_outside_the_mask():
    rng = np.random.default_rng(3)
    gtab = _gtab(rng)
    _, _, D, W = _tissue(rng, 24)
    data = dki_signal(gtab, D, W, 100.0).reshape(2, 3, 4, -1)
    mask = rng.random((2, 3, 4)) < 0.6
    fit = DKIModel(gtab).fit(data, mask=mask)
    assert fit.md.shape == (2, 3, 4) and fit.kurtosis_tensor.shape == (2, 3, 4, 3, 3, 3, 3)
    for name in ("S0", "md", "fa", "ad", "rd", "mk", "ak", "rk", "kfa"):
        assert np.all(getattr(fit, name)[~mask] == 0), name
    assert np.all(fit.md[mask] > 0) and np.all(fit.predict(gtab)[~mask] == 0)
    np.testing.assert_allclose(fit.md[mask], DKIModel(gtab).fit(data[mask]).md, rtol=1e-12)
    assert np.all(np.diff(fit.evals, axis=-1) <= 0)
    principal = fit.evecs[mask][..., 0]
    np.testing.assert_allclose(
        np.einsum("vij,vj->vi", fit.diffusion_tensor[mask], principal), fit.evals[mask][:, :1] * principal, atol=1e-15
    )


# --------------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize("monotonic", [True, False])
def test_constrained_fit_is_feasible_and_optimal(monotonic):
    rng = np.random.default_rng(4)
    gtab = _gtab(rng, shells=(1000.0, 3000.0), n_dirs=40)
    fractions, tensors, _, _ = _tissue(rng, 400)
    data = rician_noise(multi_tensor_signal(gtab, fractions, tensors), snr=20.0, rng=5)
    model = DKIModel(gtab, monotonic=monotonic)
    fit = model.fit(data)
    free = DKIModel(gtab, constrained=False).fit(data)

    # Feasible on the direction set: D(n) ≥ 0, K(n) ≥ 0 and, if monotonic, K(n) ≤ 3 / (b_max D(n)).
    n = model.constraint_directions
    assert n.shape[0] >= 60 and np.allclose(np.linalg.norm(n, axis=1), 1)
    md = fit.md[:, None]
    adc = np.einsum("mi,vij,mj->vm", n, fit.diffusion_tensor, n)
    w_n = np.einsum("mi,mj,mk,ml,vijkl->vm", n, n, n, n, fit.kurtosis_tensor)
    scale = np.abs(adc).max()
    assert adc.min() >= -1e-9 * scale
    assert (md**2 * w_n).min() >= -1e-9 * scale**2
    if monotonic:
        assert (adc - model.b_max / 3 * md**2 * w_n).min() >= -1e-9 * scale
    violating = ((free.params @ model.constraint_matrix().T) < -1e-9 * scale).any(axis=1)
    assert 0.02 < violating.mean() < 1  # the constrained path is exercised
    np.testing.assert_array_equal(fit.params[~violating], free.params[~violating])

    # Optimal: the KKT conditions of min ½(x − x*)ᵀH(x − x*) s.t. Cx ≥ 0 hold, with multipliers
    # found independently by NNLS on the stationarity condition H(x − x*) = Cᵀλ, λ ≥ 0.
    A = design_matrix(gtab)
    C = model.constraint_matrix()
    y = np.log(np.maximum(data, model.min_signal))
    for v in np.flatnonzero(violating)[:25]:
        w = np.exp(2 * A @ np.linalg.lstsq(A, y[v], rcond=None)[0])
        sw = np.sqrt(w)[:, None] * A / np.abs(A).max(axis=0)
        x = fit.params[v] * np.abs(A).max(axis=0)
        x_star = free.params[v] * np.abs(A).max(axis=0)
        Cs = C / np.abs(A).max(axis=0)
        gradient = sw.T @ (sw @ (x - x_star))
        active = np.abs(Cs @ x) < 1e-7 * np.linalg.norm(Cs, axis=1) * np.linalg.norm(x[1:])
        _, residual = scipy.optimize.nnls(Cs[active].T, gradient)
        assert residual <= 1e-6 * np.linalg.norm(gradient), v


def test_constrained_fit_matches_a_generic_qp_solver():
    rng = np.random.default_rng(6)
    gtab = _gtab(rng, shells=(1000.0, 3000.0), n_dirs=40)
    fractions, tensors, _, _ = _tissue(rng, 3)
    data = rician_noise(multi_tensor_signal(gtab, fractions, tensors), snr=20.0, rng=7)
    model = DKIModel(gtab, fit_method="OLS", monotonic=True)
    fit = model.fit(data)
    A = design_matrix(gtab)
    scale = np.abs(A).max(axis=0)
    As, Cs = A / scale, model.constraint_matrix() / scale
    free = DKIModel(gtab, fit_method="OLS", constrained=False).fit(data)
    assert not np.allclose(fit.params, free.params)  # the constraints are active
    for v in range(len(data)):
        y = np.log(data[v])
        res = scipy.optimize.minimize(
            lambda x, y=y: 0.5 * np.sum((As @ x - y) ** 2), np.linalg.lstsq(As, y, rcond=None)[0],
            jac=lambda x, y=y: As.T @ (As @ x - y), method="SLSQP",
            constraints=[{"type": "ineq", "fun": lambda x: Cs @ x, "jac": lambda x: Cs}],
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        assert res.success and (Cs @ res.x).min() > -1e-8
        ours = 0.5 * np.sum((As @ (fit.params[v] * scale) - y) ** 2)
        assert ours <= res.fun * (1 + 1e-7) + 1e-12


# --------------------------------------------------------------------------------------------------
# measures


def test_measures_of_isotropic_gaussian_and_isotropic_kurtosis():
    m = kurtosis_measures(np.eye(3) * 1e-3, np.zeros((3, 3, 3, 3)))
    assert m["md"] == pytest.approx(1e-3) and m["ad"] == pytest.approx(1e-3) and m["rd"] == pytest.approx(1e-3)
    assert m["fa"] == 0 and m["mk"] == 0 and m["ak"] == 0 and m["rk"] == 0 and m["kfa"] == 0
    Q, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((3, 3)))
    m = kurtosis_measures(Q @ np.diag([0.8e-3] * 3) @ Q.T, 0.7 * ISOTROPIC_W)
    for k in ("mk", "ak", "rk"):
        assert m[k] == pytest.approx(0.7, rel=1e-12), k
    assert m["kfa"] == pytest.approx(0, abs=1e-12)


def test_measures_of_axially_symmetric_mixtures():
    # Coaxial compartments give axially symmetric D and W: AK = K(axis), RK = K(any perpendicular
    # direction), MK = the spherical mean of K (evaluated numerically).
    rng = np.random.default_rng(9)
    axis = _unit(rng, 1)[0]
    tensors = axially_symmetric_tensor(np.tile(axis, (3, 1)), [2e-3, 1.2e-3, 3e-3], [0.1e-3, 0.6e-3, 3e-3])
    D, W = cumulant_tensors(*multi_tensor_moments([0.4, 0.45, 0.15], tensors))
    m = kurtosis_measures(D, W)
    perpendicular = np.cross(axis, _unit(rng, 1)[0])
    perpendicular /= np.linalg.norm(perpendicular)
    assert m["ak"] == pytest.approx(_apparent_kurtosis(D, W, axis[None])[0], rel=1e-10)
    assert m["rk"] == pytest.approx(_apparent_kurtosis(D, W, perpendicular[None])[0], rel=1e-10)
    assert m["mk"] == pytest.approx(_apparent_kurtosis(D, W, _sphere(200_000)).mean(), rel=1e-6)
    evals = np.linalg.eigvalsh(D)[::-1]
    assert m["ad"] == pytest.approx(evals[0]) and m["rd"] == pytest.approx(evals[1:].mean())
    fa = np.sqrt(1.5 * np.sum((evals - evals.mean()) ** 2) / np.sum(evals**2))
    assert m["fa"] == pytest.approx(fa, rel=1e-12)
    # KFA = ‖W − W̄ I⁽⁴⁾‖ / ‖W‖ with W̄ = mean kurtosis tensor (Glenn et al. 2015).
    w_bar = np.einsum("iijj->", W) / 5
    assert m["kfa"] == pytest.approx(np.linalg.norm(W - w_bar * ISOTROPIC_W) / np.linalg.norm(W), rel=1e-12)


def test_mean_and_radial_kurtosis_agree_with_numerical_averages():
    rng = np.random.default_rng(10)
    D = np.stack([tensor_from_eig(e, np.linalg.qr(rng.standard_normal((3, 3)))[0])
                  for e in ([2e-3, 1e-3, 0.3e-3], [1.5e-3, 0.5e-3, 0.2e-3], [3e-3, 2e-3, 1.5e-3])])
    W = kurtosis_from_elements(rng.uniform(0.2, 1.0, (3, 1)) * kurtosis_elements(ISOTROPIC_W) + rng.normal(0, 0.05, (3, 15)))
    m = kurtosis_measures(D, W)
    np.testing.assert_allclose(m["mk"], _apparent_kurtosis(D, W, _sphere(200_000)).mean(axis=1), rtol=1e-6)
    _, evecs = np.linalg.eigh(D)
    theta = (np.arange(2000) + 0.5) * np.pi / 2000
    for v in range(3):
        e2, e3 = evecs[v][:, 1], evecs[v][:, 0]
        ring = np.cos(theta)[:, None] * e2 + np.sin(theta)[:, None] * e3
        assert m["rk"][v] == pytest.approx(_apparent_kurtosis(D[v], W[v], ring).mean(), rel=1e-6)
        assert m["ak"][v] == pytest.approx(_apparent_kurtosis(D[v], W[v], evecs[v][:, 2][None])[0], rel=1e-10)


def test_carlson_integrals_match_scipy():
    rng = np.random.default_rng(11)
    x, y = rng.uniform(1e-3, 1e3, (2, 5000))
    np.testing.assert_allclose(dki._carlson_rf(x, y, np.ones_like(x)), scipy.special.elliprf(x, y, 1.0), rtol=1e-14)
    np.testing.assert_allclose(dki._carlson_rd(x, y, np.ones_like(x)), scipy.special.elliprd(x, y, 1.0), rtol=1e-14)


def _random_tensors(rng, n):
    _, _, D, W = _tissue(rng, n)
    W = W + kurtosis_from_elements(rng.normal(0, 0.3, (n, 15)))  # include negative directional kurtosis
    D[:5] = tensor_from_eig([1.5e-3, 0.7e-3, -1e-4], np.eye(3))  # a non-positive eigenvalue
    D[5:10] = axially_symmetric_tensor(_unit(rng, 5), 1.7e-3, 0.5e-3)  # equal eigenvalues
    W[10:15] *= 40  # beyond max_kurtosis
    return D, W


def test_measures_agree_with_dipy():
    import dipy.reconst.dki as dipy_dki

    rng = np.random.default_rng(12)
    D, W = _random_tensors(rng, 400)
    params = _dipy_params(D, W)
    ours = kurtosis_measures(D, W)
    np.testing.assert_allclose(ours["ak"], dipy_dki.axial_kurtosis(params), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours["rk"], dipy_dki.radial_kurtosis(params), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours["kfa"], dipy_dki.kurtosis_fractional_anisotropy(params), rtol=1e-6, atol=1e-12)
    assert (ours["rk"] == 10).any() and (ours["mk"][:5] == 0).all()
    np.testing.assert_allclose(ours["md"], params[:, :3].mean(axis=1), rtol=1e-12)


def test_mean_kurtosis_agrees_with_dipys_formula(monkeypatch):
    # dipy's compiled MK evaluates Carlson's integrals with errtol 3e-4 (relative errors up to
    # ~2e-5, amplified by cancellation to several percent for tensors with two small, close
    # eigenvalues). Its pure-Python analytical MK with exact integrals must agree to 1e-6 with ours.
    import dipy.reconst.dki as dipy_dki

    monkeypatch.setattr(dipy_dki, "carlson_rf", lambda x, y, z, errtol=None: scipy.special.elliprf(x, y, z))
    monkeypatch.setattr(dipy_dki, "carlson_rd", lambda x, y, z, errtol=None: scipy.special.elliprd(x, y, z))
    rng = np.random.default_rng(13)
    D, W = _random_tensors(rng, 400)
    params = _dipy_params(D, W)
    reference = dipy_dki.mean_kurtosis(params, analytical=True, fast=False)
    positive = (params[:, :3] > 2e-7).all(axis=1)
    reference = np.where(positive, np.clip(reference, -3 / 7, 10), 0.0)  # dipy's compiled clipping
    ours = kurtosis_measures(D, W)["mk"]
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-12)
    compiled = dipy_dki.mean_kurtosis(params, min_kurtosis=-3 / 7, max_kurtosis=10)
    assert np.median(np.abs(ours - compiled)) < 1e-4


# --------------------------------------------------------------------------------------------------
# noisy data


def test_wls_fit_agrees_with_dipy():
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    rng = np.random.default_rng(14)
    gtab = _gtab(rng, shells=(1000.0, 2000.0, 3000.0), n_dirs=30)
    fractions, tensors, _, _ = _tissue(rng, 150)
    data = rician_noise(multi_tensor_signal(gtab, fractions, tensors, 100.0), snr=20.0, s0=100.0, rng=15)
    ours = DKIModel(gtab, constrained=False).fit(data)
    theirs = DiffusionKurtosisModel(gradient_table(gtab.bvals, bvecs=gtab.bvecs), fit_method="WLS").fit(data)
    np.testing.assert_allclose(ours.evals, theirs.evals, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(kurtosis_elements(ours.kurtosis_tensor), theirs.kt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.fa, theirs.fa, atol=1e-6)
    # dipy's compiled MK carries its Carlson-integral error (see the test above).
    assert np.median(np.abs(ours.mk - theirs.mk())) < 1e-4 and np.abs(ours.mk - theirs.mk()).max() < 0.02
    np.testing.assert_allclose(ours.rk, theirs.rk(), atol=1e-5)


def test_noisy_fit_is_close_to_the_truth():
    rng = np.random.default_rng(16)
    gtab = _gtab(rng, shells=(1000.0, 2000.0), n_dirs=60)
    D, W = _plausible(rng, 500, b_max=2000.0)
    truth = kurtosis_measures(D, W)
    data = rician_noise(dki_signal(gtab, D, W, 1.0), snr=100.0, rng=17)
    fit = DKIModel(gtab).fit(data)
    # Medians over 500 voxels; the Rician bias of the weak b = 2000 s/mm² signals dominates.
    assert np.median(np.abs(fit.md / truth["md"] - 1)) < 0.02
    assert np.median(np.abs(fit.fa - truth["fa"])) < 0.015
    assert np.median(np.abs(fit.mk - truth["mk"])) < 0.05
    assert np.median(np.abs(fit.ak - truth["ak"])) < 0.06
    assert np.median(np.abs(fit.rk - truth["rk"])) < 0.12
    assert np.median(np.abs(fit.kfa - truth["kfa"])) < 0.05


# --------------------------------------------------------------------------------------------------
# bad input


def test_too_few_volumes_or_shells():
    rng = np.random.default_rng(18)
    with pytest.raises(InputError, match="at least 22 volumes and two non-zero b-values"):
        DKIModel(_gtab(rng, shells=(1000.0,), n_dirs=60))
    with pytest.raises(InputError, match="at least 22 volumes and two non-zero b-values"):
        DKIModel(_gtab(rng, shells=(1000.0, 2000.0), n_dirs=10, n_b0=1))
    with pytest.raises(InputError, match="determine only"):
        g = np.tile(_unit(rng, 4), (10, 1))
        DKIModel(GradientTable(np.r_[0.0, np.full(20, 1000.0), np.full(20, 2000.0)], np.r_[np.zeros((1, 3)), g]))


@pytest.mark.parametrize(
    "kwargs, source",
    [({"fit_method": "NLLS"}, "fit_method"), ({"min_signal": 0.0}, "min_signal"), ({"min_signal": "x"}, "min_signal")],
)
def test_bad_model_options(kwargs, source):
    with pytest.raises(InputError) as info:
        DKIModel(_gtab(np.random.default_rng(19)), **kwargs)
    assert info.value.source == source


def test_bad_data_and_mask():
    gtab = _gtab(np.random.default_rng(20))
    model = DKIModel(gtab)
    data = np.ones((4, len(gtab)))
    with pytest.raises(InputError) as info:
        model.fit(np.ones((4, len(gtab) - 1)))
    assert info.value.source == "data"
    bad = data.copy()
    bad[2, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.fit(bad)
    model.fit(bad, mask=np.array([True, True, False, True]))  # NaN outside the mask is ignored
    with pytest.raises(InputError) as info:
        model.fit(data, mask=np.ones(5, dtype=bool))
    assert info.value.source == "mask"
    with pytest.raises(InputError) as info:
        kurtosis_measures(np.eye(3), np.zeros((2, 3, 3, 3, 3)))
    assert info.value.source == "W"
