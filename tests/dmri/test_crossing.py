"""Two-population voxels: parameters, simulation, b0 normalisation, CSD orientations."""

import numpy as np
import pytest

from bioinverse.dmri.axons import axon_population_signal
from bioinverse.dmri.crossing import (
    Microstructure,
    crossing_signals,
    estimate_orientations,
    match_orientations,
    normalise_b0,
    simulate_crossings,
)
from bioinverse.dmri.pgse import hcp_mgh_protocol
from bioinverse.errors import InputError


@pytest.fixture(scope="module")
def protocol():
    return hcp_mgh_protocol()


def test_microstructure_round_trip_and_label_convention():
    a = np.array([[0.3, 1.0, 0.5, 0.7, 2.0, 0.6], [0.6, 0.5, 0.2, 0.4, 1.5, 0.7]])
    m = Microstructure.from_array(a)
    np.testing.assert_array_equal(m.as_array(), a)
    s = m.sorted_by_nu()
    assert (s.nu[:, 0] >= s.nu[:, 1]).all()
    np.testing.assert_array_equal(s.as_array()[0], a[0, [3, 4, 5, 0, 1, 2]])
    np.testing.assert_array_equal(s.as_array()[1], a[1])
    with pytest.raises(InputError, match="shape"):
        Microstructure(np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"\(V, 6\)"):
        Microstructure.from_array(np.zeros((2, 5)))


def test_simulated_parameters_respect_their_ranges(protocol):
    data = simulate_crossings(protocol, 500, snr=None, seed=3, radius_range=(0.5, 1.0), density_range=(0.3, 0.6),
                              nu_range=(0.2, 0.8), angle_range_deg=(45, 60))
    t = data.truth
    assert t.radius.min() >= 0.5 and t.radius.max() <= 1.0
    assert t.density.min() >= 0.3 and t.density.max() <= 0.6
    assert t.nu[:, 0].min() >= 0.2 and t.nu[:, 0].max() <= 0.8
    np.testing.assert_allclose(t.nu.sum(axis=1), 1.0)
    cos = np.abs(np.einsum("vc,vc->v", data.orientations[:, 0], data.orientations[:, 1]))
    angle = np.degrees(np.arccos(np.clip(cos, 0, 1)))
    assert angle.min() >= 45 - 1e-6 and angle.max() <= 60 + 1e-6
    np.testing.assert_allclose(np.linalg.norm(data.orientations, axis=2), 1.0)


def test_noise_free_signal_is_the_weighted_sum_of_populations(protocol):
    data = simulate_crossings(protocol, 3, snr=None, seed=1)
    t, u = data.truth, data.orientations
    for v in range(3):
        expected = sum(
            t.nu[v, k] * axon_population_signal(t.radius[v, k], t.density[v, k], protocol.gradient_strength,
                                                protocol.small_delta, protocol.big_delta,
                                                np.minimum(np.abs(protocol.directions @ u[v, k]), 1.0))
            for k in range(2))
        np.testing.assert_allclose(data.signals[v], expected, rtol=1e-9)  # shells are keyed at 1e-9
    np.testing.assert_allclose(data.signals[:, protocol.b0s_mask], 1.0)
    np.testing.assert_allclose(crossing_signals(protocol, u, t), data.signals)


def test_rician_noise_level_and_reproducibility(protocol):
    a = simulate_crossings(protocol, 400, snr=50, seed=7)
    b = simulate_crossings(protocol, 400, snr=50, seed=7)
    np.testing.assert_array_equal(a.signals, b.signals)
    clean = crossing_signals(protocol, a.orientations, a.truth)
    residual = (a.signals - clean)[:, protocol.b0s_mask]  # at S = 1 Rician ≈ Gaussian
    assert abs(residual.std() - 1 / 50) < 0.002


def test_normalise_b0_and_its_errors(protocol):
    y = 300.0 * simulate_crossings(protocol, 2, snr=None, seed=0).signals
    np.testing.assert_allclose(normalise_b0(y, protocol)[:, protocol.b0s_mask], 1.0)
    with pytest.raises(InputError, match="shape"):
        normalise_b0(y[:, :10], protocol)
    bad = y.copy()
    bad[1, protocol.b0s_mask] = 0.0
    with pytest.raises(InputError, match="voxel 1"):
        normalise_b0(bad, protocol)
    with pytest.raises(InputError, match="G = 0"):
        normalise_b0(y[:, ~protocol.b0s_mask], protocol.subset(~protocol.b0s_mask))


def test_csd_finds_a_right_angle_crossing(protocol):
    data = simulate_crossings(protocol, 20, snr=None, seed=2, angle_range_deg=(80, 90), nu_range=(0.4, 0.6))
    estimated = estimate_orientations(data.signals, protocol)
    assert estimated.shape == (20, 2, 3)
    _, error = match_orientations(estimated, data.orientations)
    assert np.median(error) < 5.0


def test_match_orientations_is_sign_invariant():
    ref = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
    est = np.array([[[0, -1.0, 0], [-1.0, 0, 0]]])
    ordered, error = match_orientations(est, ref)
    np.testing.assert_allclose(error, 0.0, atol=1e-6)
    np.testing.assert_array_equal(ordered[0, 0], [-1.0, 0, 0])


def test_bad_simulation_arguments(protocol):
    with pytest.raises(InputError, match="n_voxels"):
        simulate_crossings(protocol, 0, snr=20)
    with pytest.raises(InputError, match="snr"):
        simulate_crossings(protocol, 5, snr=-1)
    with pytest.raises(InputError, match="angle_range_deg"):
        simulate_crossings(protocol, 5, snr=20, angle_range_deg=(10, 120))
