"""Monte Carlo diffusion simulator: packing, walk, phase quadrature, signals against closed forms."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from bioinverse.dmri import montecarlo as mc
from bioinverse.dmri.axons import cylinder_perpendicular_signal
from bioinverse.dmri.pgse import GAMMA_UM
from bioinverse.errors import InputError

SHELLS = mc.hcp_shells()  # b = 0, 1000, 3000, 5000, 10000 s/mm², δ/Δ = 12.9/21.8 ms
B_MS = GAMMA_UM**2 * SHELLS[:, 0] ** 2 * SHELLS[:, 1] ** 2 * (SHELLS[:, 2] - SHELLS[:, 1] / 3.0)
D = 2.0


def _pair_separation(substrate: mc.Substrate) -> np.ndarray:
    """Centre distance / (r_i + r_j) for all pairs, nearest periodic image; inf on the diagonal."""
    d = substrate.centres[:, None, :] - substrate.centres[None, :, :]
    d -= substrate.side * np.round(d / substrate.side)
    ratio = np.hypot(d[..., 0], d[..., 1]) / (substrate.radii[:, None] + substrate.radii[None, :])
    np.fill_diagonal(ratio, np.inf)
    return ratio


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize(("radius", "density", "cv"), [(0.25, 0.76, 0.1), (1.0, 0.76, 0.0), (2.23, 0.1, 0.1),
                                                       (1.0, 0.8, 0.1)])
def test_packing_reaches_density_without_overlap(radius, density, cv):
    s = mc.pack_cylinders(radius, density, radius_cv=cv)
    assert s.n_cylinders == mc.DEFAULT_N_CYLINDERS
    assert s.density == pytest.approx(density, rel=1e-12)
    assert np.pi * (s.radii**2).sum() / s.side**2 == pytest.approx(density, rel=1e-12)
    assert s.radii.mean() == pytest.approx(radius, rel=1e-12)
    assert _pair_separation(s).min() > 1.0
    assert ((s.centres >= 0) & (s.centres < s.side)).all()
    if cv == 0:
        assert np.ptp(s.radii) == 0
    else:
        assert np.std(s.radii) / radius == pytest.approx(cv, rel=0.3)


def test_shaking_opens_touching_clusters():
    # Overlap removal alone leaves chains of touching cylinders; the hard-disc moves separate them.
    tight = mc.pack_cylinders(1.0, 0.5, shake_sweeps=0)
    loose = mc.pack_cylinders(1.0, 0.5)
    assert (_pair_separation(tight) < 1.001).sum() > 50
    assert (_pair_separation(loose) < 1.001).sum() == 0


def test_packing_empty_and_errors():
    empty = mc.pack_cylinders(1.0, 0.0)
    assert empty.n_cylinders == 0 and empty.density == 0.0
    with pytest.raises(InputError, match="density"):
        mc.pack_cylinders(1.0, 0.95, max_sweeps=200)
    for kwargs, source in [({"mean_radius": -1.0, "density": 0.5}, "mean_radius"),
                           ({"mean_radius": 1.0, "density": 1.0}, "density"),
                           ({"mean_radius": 1.0, "density": np.nan}, "density"),
                           ({"mean_radius": 1.0, "density": 0.5, "radius_cv": -0.1}, "radius_cv"),
                           ({"mean_radius": 1.0, "density": 0.5, "n_cylinders": 0}, "n_cylinders"),
                           ({"mean_radius": 1.0, "density": 0.9, "n_cylinders": 1}, "n_cylinders")]:
        with pytest.raises(InputError) as info:
            mc.pack_cylinders(**kwargs)
        assert info.value.source == source


def test_substrate_contains_is_periodic():
    s = mc.Substrate(10.0, [[0.5, 9.5]], [1.0], np.pi / 100)
    assert s.contains([[0.5, 9.5], [10.3, 9.5], [0.5, -0.2], [9.8, 0.2], [5.0, 5.0]]).tolist() == [0, 0, 0, 0, -1]
    with pytest.raises(InputError, match="radii"):
        mc.Substrate(10.0, [[0.5, 9.5]], [-1.0], 0.1)


# ---------------------------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("n_steps", [7, 1000])
def test_pgse_weights_integrate_the_waveform(n_steps):
    small, big = 12.9, 21.8
    w = mc.pgse_weights([small], [big], n_steps)[0]
    T = small + big
    t = np.linspace(0.0, T, n_steps + 1)
    assert w.sum() == pytest.approx(0.0, abs=1e-12)
    # ∫ s(t) x(t) dt is exact for positions linear in time: x = t gives δΔ·(−1)… computed directly.
    exact = small**2 / 2 - ((big + small) ** 2 - big**2) / 2
    assert w @ t == pytest.approx(exact, rel=1e-12)


def test_pgse_weights_reproduce_the_b_value():
    # For free steps, Var(I) = Σ_j c_j² ℓ²/2 with c_j = Σ_{k>j} w_k; the continuous limit is
    # 2D δ²(Δ − δ/3), the b-value's time integral.
    small, big, n = 12.9, 21.8, 2000
    dt = (small + big) / n
    c = np.cumsum(mc.pgse_weights([small], [big], n)[0][::-1])[::-1][1:]
    assert (c**2).sum() * dt == pytest.approx(small**2 * (big - small / 3.0), rel=1e-4)


# ---------------------------------------------------------------------------------------------- walk


def test_walkers_never_cross_membranes():
    # Steps longer than the thinnest gaps and comparable to the radii force many reflections.
    s = mc.pack_cylinders(0.5, 0.7, n_cylinders=30, seed=3)
    walk = mc.random_walk(s, 3000, 200, duration=20.0, seed=1)
    assert walk.step_length > 0.5 * s.radii.min()
    intra = walk.cylinder >= 0
    assert intra.sum() == round(0.7 * 3000)
    rel = walk.final[intra] - s.centres[walk.cylinder[intra]]
    assert (np.hypot(rel[:, 0], rel[:, 1]) < s.radii[walk.cylinder[intra]]).all()
    assert (s.contains(walk.final[~intra]) == -1).all()
    assert (s.contains(walk.start[~intra]) == -1).all()
    # extra-axonal walkers do travel through the periodic cell
    assert np.abs(walk.final[~intra] - walk.start[~intra]).max() > s.side


def test_free_walk_mean_squared_displacement():
    duration, n = 30.0, 100_000
    walk = mc.random_walk(mc.pack_cylinders(1.0, 0.0), n, 200, duration, seed=2)
    msd = ((walk.final - walk.start) ** 2).sum(axis=1)
    # a 2-D walk: ⟨|Δx|²⟩ = 4 D t, with relative standard error 1/√n
    assert msd.mean() == pytest.approx(4 * D * duration, rel=5 / np.sqrt(n))


def test_same_seed_same_result_whatever_the_threads():
    s = mc.pack_cylinders(0.8, 0.6, n_cylinders=20, seed=5)
    angles = np.linspace(0, np.pi / 2, 5)
    kwargs = {"n_walkers": 400, "n_steps": 300, "seed": 11}
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = mc.simulate_fingerprint(s, SHELLS, angles, **kwargs)
        numba.set_num_threads(threads)
        many = mc.simulate_fingerprint(s, SHELLS, angles, **kwargs)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one, many)
    assert np.array_equal(mc.pack_cylinders(0.8, 0.6, seed=4).centres, mc.pack_cylinders(0.8, 0.6, seed=4).centres)
    other = mc.simulate_fingerprint(s, SHELLS, angles, **{**kwargs, "seed": 12})
    assert not np.array_equal(one, other)


# ---------------------------------------------------------------------------------------------- signals


def test_free_diffusion_matches_exp_minus_bD():
    angles = np.linspace(0, np.pi / 2, 7)
    S = mc.simulate_fingerprint(mc.pack_cylinders(1.0, 0.0), SHELLS, angles, n_walkers=100_000, n_steps=500)
    exact = np.exp(-B_MS[:, None] * D * np.ones_like(angles))
    assert np.abs(S - exact).max() < 3e-3
    measurable = exact >= 0.1
    assert (np.abs(S - exact)[measurable] / exact[measurable]).max() < 0.02


def test_intra_cylinder_matches_van_gelderen():
    angles = np.array([0.0, np.pi / 4, np.pi / 2])
    for radius in (2.0, 3.0):
        s = mc.pack_cylinders(radius, 0.5, radius_cv=0.0, n_cylinders=4)
        S = mc.simulate_fingerprint(s, SHELLS, angles, n_walkers=4000, compartment="intra")
        vg = cylinder_perpendicular_signal(SHELLS[:, :1] * np.sin(angles), SHELLS[:, 1:2], SHELLS[:, 2:3], radius)
        expected = vg * np.exp(-B_MS[:, None] * D * np.cos(angles) ** 2)
        assert (np.abs(S - expected) / expected).max() < 0.03
        # the restriction is resolved, not just the total: 1 − S across the fibres at b = 10000
        assert 1 - S[-1, -1] == pytest.approx(1 - expected[-1, -1], rel=0.1)


def test_signal_structure():
    s = mc.pack_cylinders(1.0, 0.6, n_cylinders=20)
    angles = np.linspace(0, np.pi / 2, 4)
    S = mc.simulate_fingerprint(s, SHELLS, angles, n_walkers=500, n_steps=400)
    assert S.shape == (len(SHELLS), len(angles))
    assert np.array_equal(S[0], np.ones(len(angles)))  # G = 0
    # along the fibres the motion is free: the axial factor alone
    np.testing.assert_allclose(S[:, 0], np.exp(-B_MS * D), rtol=1e-12)
    # restriction slows the signal decay across the fibres compared with free diffusion
    assert (S[1:, -1] > np.exp(-B_MS[1:] * D)).all()
    # the mixture is the volume-weighted sum of the compartments (independent walkers: statistically)
    intra = mc.simulate_fingerprint(s, SHELLS, angles, n_walkers=2000, n_steps=400, compartment="intra")
    extra = mc.simulate_fingerprint(s, SHELLS, angles, n_walkers=2000, n_steps=400, compartment="extra")
    mixed = mc.simulate_fingerprint(s, SHELLS, angles, n_walkers=4000, n_steps=400, seed=1)
    assert np.abs(mixed - (s.density * intra + (1 - s.density) * extra)).max() < 0.03


def test_default_steps_follow_the_radius():
    thin, thick = mc.pack_cylinders(0.5, 0.5, n_cylinders=10), mc.pack_cylinders(2.2, 0.5, n_cylinders=10)
    T = 34.7
    assert np.sqrt(4 * D * T / mc.default_n_steps(thin, T)) <= mc.DEFAULT_STEP_RATIO * 0.5
    assert mc.default_n_steps(thick, T) == mc.MIN_STEPS
    assert mc.default_n_steps(mc.pack_cylinders(0.1, 0.5, n_cylinders=10), T) == mc.MAX_STEPS


def test_validate_reports_errors():
    errors = mc.validate(n_walkers=5000, cylinder_walkers=500, n_steps=300, n_angles=3, cylinder_radii=[2.0])
    assert set(errors) >= {"free_rel_err", "free_abs_err", "cylinder_rel_err", "cylinder_attenuation_rel_err"}
    assert 0 <= errors["free_abs_err"] < 0.05 and 0 <= errors["cylinder_rel_err"] < 0.03


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "source"), [
    ({"shells": [[10.0, 12.9]]}, "shells"),
    ({"shells": [[-1.0, 12.9, 21.8]]}, "shells"),
    ({"shells": [[10.0, 12.9, 5.0]]}, "shells"),
    ({"shells": [[10.0, 0.0, 21.8]]}, "shells"),
    ({"shells": [[np.nan, 12.9, 21.8]]}, "shells"),
    ({"angles": [2.0]}, "angles"),
    ({"angles": [[0.1]]}, "angles"),
    ({"n_walkers": 0}, "n_walkers"),
    ({"n_steps": 2.5}, "n_steps"),
    ({"n_azimuths": 0}, "n_azimuths"),
    ({"diffusivity": -2.0}, "diffusivity"),
    ({"compartment": "myelin"}, "compartment"),
])
def test_simulate_rejects_bad_input(kwargs, source):
    s = mc.pack_cylinders(1.0, 0.5, n_cylinders=10)
    args = {"shells": SHELLS, "angles": [0.0, 1.0], "n_walkers": 10, "n_steps": 10} | kwargs
    with pytest.raises(InputError) as info:
        mc.simulate_fingerprint(s, **args)
    assert info.value.source == source


def test_walk_rejects_bad_input():
    empty = mc.pack_cylinders(1.0, 0.0)
    with pytest.raises(InputError, match="intra"):
        mc.simulate_fingerprint(empty, SHELLS, [0.5], n_walkers=10, n_steps=10, compartment="intra")
    with pytest.raises(InputError, match="substrate"):
        mc.random_walk("cylinders", 10, 10, 10.0)
    with pytest.raises(InputError, match="weights"):
        mc.random_walk(empty, 10, 10, 10.0, weights=np.zeros((1, 5)))
    with pytest.raises(InputError, match="duration"):
        mc.pgse_weights([12.9], [21.8], 10, duration=20.0)
    with pytest.raises(InputError, match="big_delta"):
        mc.pgse_weights([12.9], [10.0], 10)
