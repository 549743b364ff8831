"""Analytic axon-population model: limits of the Van Gelderen cylinder, the zeppelin, broadcasting."""

from __future__ import annotations

import numpy as np
import pytest

from bioinverse.dmri import axons
from bioinverse.dmri.axons import DIFFUSIVITY, axon_population_signal, cylinder_perpendicular_signal
from bioinverse.dmri.pgse import GAMMA_UM
from bioinverse.errors import InputError

SMALL, BIG = 12.9, 21.8  # the HCP MGH timing, ms


def b_value(G, small=SMALL, big=BIG):
    """b in ms/µm² (the units in which b·D is dimensionless with D in µm²/ms)."""
    return GAMMA_UM**2 * np.square(G) * small**2 * (big - small / 3.0)


def test_zero_gradient_and_zero_radius_give_one():
    assert np.all(cylinder_perpendicular_signal(0.0, SMALL, BIG, [0.1, 1.0, 10.0]) == 1.0)
    assert np.all(cylinder_perpendicular_signal([50.0, 300.0], SMALL, BIG, 0.0) == 1.0)
    s = axon_population_signal([0.5, 2.0], [[0.1], [0.7]], 0.0, SMALL, BIG, [[[0.0]], [[0.3]], [[1.0]]])
    assert s.shape == (3, 2, 2)
    np.testing.assert_array_equal(s, 1.0)


def test_small_radius_limit_tends_to_one_as_r_to_the_fourth():
    G = 300.0
    lnE = np.log(cylinder_perpendicular_signal(G, SMALL, BIG, [0.01, 0.02]))
    assert -1e-6 < lnE[0] < 0
    # motional narrowing: ln E ∝ r⁴ when r²/(Dδ) → 0
    assert lnE[1] / lnE[0] == pytest.approx(16.0, rel=1e-4)


def test_long_time_limit_matches_neuman():
    """δ, Δ ≫ r²/D: ln E → −(7/48) γ²G²δ r⁴ / D (Neuman 1974), error O(r²/(Dδ))."""
    G, small, big, D = 100.0, 100.0, 200.0, 2.0
    errors = []
    for r in (0.5, 0.25):
        lnE = np.log(cylinder_perpendicular_signal(G, small, big, r, D))
        neuman = -7.0 / 48.0 * GAMMA_UM**2 * G**2 * small * r**4 / D
        errors.append(abs(lnE / neuman - 1))
    assert errors[0] < 1e-3
    assert errors[1] == pytest.approx(errors[0] / 4, rel=0.05)  # the r²/(Dδ) correction


def test_large_radius_tends_to_free_diffusion():
    """r → ∞: ln E → −bD, with a surface-to-volume correction O(√(DΔ)/r) (Mitra et al., 1992)."""
    G = 60.0
    free = -b_value(G) * DIFFUSIVITY
    radii = np.array([100.0, 1000.0, 10000.0])
    lnE = np.log(cylinder_perpendicular_signal(G, SMALL, BIG, radii))
    deviation = lnE / free - 1
    assert np.all(deviation < 0)  # the walls always slow the spread
    assert abs(deviation[-1]) < 1e-3
    np.testing.assert_allclose(deviation[:-1] / deviation[1:], 10.0, rtol=0.05)


def test_sum_identity_limit_is_exact_for_slow_modes():
    # The numerator's Taylor series makes very wide cylinders (all modes slow) exact to the last digits.
    G, small, big = 20.0, 10.0, 30.0
    r = 1e5
    lnE = np.log(cylinder_perpendicular_signal(G, small, big, r))
    free = -b_value(G, small, big) * DIFFUSIVITY
    assert lnE / free - 1 == pytest.approx(0.0, abs=1e-3)


def test_truncation_of_the_root_sum_has_converged(monkeypatch):
    G = np.array([50.0, 150.0, 300.0])
    radii = np.array([0.25, 1.0, 2.23, 8.0])[:, None]
    reference = np.log(cylinder_perpendicular_signal(G, SMALL, BIG, radii))
    monkeypatch.setattr(axons, "_MIN_ROOTS", 4 * axons._MIN_ROOTS)
    np.testing.assert_allclose(np.log(cylinder_perpendicular_signal(G, SMALL, BIG, radii)), reference, rtol=1e-10)


def test_numerator_series_and_direct_forms_agree_at_the_switch():
    a = np.array([0.4, 0.5, 0.6]) / (BIG + SMALL)
    small, big = np.full(3, SMALL), np.full(3, BIG)
    both = axons._gpd_numerator(a, small, big)
    x_s, x_b = a * SMALL, a * BIG
    direct = 2 * x_s - 2 + 2 * np.exp(-x_s) + 2 * np.exp(-x_b) - np.exp(-(x_b - x_s)) - np.exp(-(x_b + x_s))
    np.testing.assert_allclose(both, direct, rtol=1e-9)
    leading = a**3 * SMALL**2 * (BIG - SMALL / 3)
    np.testing.assert_allclose(both, leading, rtol=0.5)


def test_agrees_with_amico_cylinder_gpd():
    """An independent implementation: AMICO's CylinderGPD (SI units, its own γ and root table)."""
    amico_scheme = pytest.importorskip("amico.scheme")
    from amico.synthesis import _GAMMA, CylinderGPD

    G = np.array([40.0, 120.0, 220.0])
    small = np.array([5.0, 12.9, 20.0])
    big = np.array([30.0, 21.8, 40.0])
    raw = np.column_stack([np.ones(3), np.zeros(3), np.zeros(3), G * 1e-3, big * 1e-3, small * 1e-3,
                           (big + small) * 1e-3 + 0.01])
    for r in (0.5, 2.0, 5.0):
        # fibre along z (θ = 0) and gradient along x: the whole gradient is perpendicular
        reference = CylinderGPD(amico_scheme.Scheme(raw)).get_signal(2.0e-3, r * 1e-6, theta=0.0, phi=0.0)
        ours = cylinder_perpendicular_signal(G * _GAMMA / (GAMMA_UM * 1e12), small, big, r, 2.0)
        np.testing.assert_allclose(np.log(ours), np.log(reference), rtol=1e-5)


def test_parallel_gradient_gives_free_diffusion_in_both_compartments():
    G = np.array([69.3, 120.0, 219.0])
    expected = np.exp(-b_value(G) * DIFFUSIVITY)
    for f in (0.0, 0.3, 1.0):
        for cos in (1.0, -1.0):
            np.testing.assert_allclose(axon_population_signal(1.5, f, G, SMALL, BIG, cos), expected, rtol=1e-13)


def test_perpendicular_gradient_is_cylinder_plus_tortuous_zeppelin():
    G = np.array([69.3, 219.0])
    r, f, D = 1.2, 0.55, 1.7
    expected = (f * cylinder_perpendicular_signal(G, SMALL, BIG, r, D)
                + (1 - f) * np.exp(-b_value(G) * (1 - f) * D))
    np.testing.assert_allclose(axon_population_signal(r, f, G, SMALL, BIG, 0.0, D), expected, rtol=1e-13)


def test_oblique_angle_splits_the_gradient_and_is_folded():
    G, r, f = 150.0, 2.0, 0.4
    theta = np.deg2rad(35.0)
    cos, sin = np.cos(theta), np.sin(theta)
    b = b_value(G)
    expected = (f * cylinder_perpendicular_signal(G * sin, SMALL, BIG, r) * np.exp(-b * DIFFUSIVITY * cos**2)
                + (1 - f) * np.exp(-b * DIFFUSIVITY * (cos**2 + (1 - f) * sin**2)))
    s = axon_population_signal(r, f, G, SMALL, BIG, [cos, -cos])
    np.testing.assert_allclose(s, expected, rtol=1e-13)


def test_broadcasting_equals_elementwise_evaluation():
    rng = np.random.default_rng(3)
    radius = rng.uniform(0.25, 2.23, size=(4, 1, 1))
    density = rng.uniform(0.1, 0.76, size=(4, 1, 1))
    G = np.array([0.0, 69.3, 219.0])[None, :, None]
    cos = rng.uniform(-1, 1, size=(1, 1, 5))
    s = axon_population_signal(radius, density, G, SMALL, BIG, cos)
    assert s.shape == (4, 3, 5) and s.dtype == np.float64
    for i, j, k in [(0, 0, 0), (1, 2, 3), (3, 1, 4), (2, 2, 0)]:
        single = axon_population_signal(radius[i, 0, 0], density[i, 0, 0], G[0, j, 0], SMALL,
                                        BIG, cos[0, 0, k])
        assert s[i, j, k] == pytest.approx(float(single), rel=1e-13)
    assert np.all((s > 0) & (s <= 1))
    # the signal decreases with G and, across the fibres, increases with the density (more restriction)
    perp = axon_population_signal(1.0, [0.2, 0.5, 0.8], [[50.0], [150.0]], SMALL, BIG, 0.0)
    assert np.all(np.diff(perp, axis=0) < 0) and np.all(np.diff(perp, axis=1) > 0)


@pytest.mark.parametrize(
    ("kwargs", "source"),
    [
        ({"radius": -1.0}, "radius"),
        ({"radius": np.nan}, "radius"),
        ({"density": 1.2}, "density"),
        ({"density": -0.1}, "density"),
        ({"cos_theta": 1.5}, "cos_theta"),
        ({"small_delta": 0.0}, "small_delta"),
        ({"big_delta": 5.0}, "big_delta"),
        ({"diffusivity": 0.0}, "diffusivity"),
        ({"G": np.inf}, "G"),
        ({"G": "strong"}, "G"),
    ],
)
def test_bad_input_names_the_argument(kwargs, source):
    args = {"radius": 1.0, "density": 0.5, "G": 100.0, "small_delta": SMALL, "big_delta": BIG, "cos_theta": 0.3}
    args.update(kwargs)
    with pytest.raises(InputError) as info:
        axon_population_signal(**args)
    assert source in info.value.source


def test_shapes_that_do_not_broadcast_are_rejected():
    with pytest.raises(InputError):
        cylinder_perpendicular_signal(np.ones(3), SMALL, BIG, np.ones(4))
    with pytest.raises(InputError):
        axon_population_signal(np.ones(2), np.full(3, 0.5), 100.0, SMALL, BIG, 0.0)
