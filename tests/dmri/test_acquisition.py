import numpy as np
import pytest

from bioinverse.dmri.acquisition import (
    PROTOCOLS,
    electrostatic_directions,
    five_shell_protocol,
    multi_shell_protocol,
    noddi_protocol,
    subsample,
    subsample_pattern,
    three_shell_protocol,
)
from bioinverse.dmri.io import GradientTable, b_from_gradient
from bioinverse.errors import InputError


def _min_angle_deg(u, antipodal=True):
    cos = u @ u.T
    if antipodal:
        cos = np.abs(cos)
    np.fill_diagonal(cos, -1.0)
    return float(np.degrees(np.arccos(np.clip(cos.max(), -1.0, 1.0))))


def _energy(u):
    iu = np.triu_indices(len(u), 1)
    diff = np.linalg.norm(u[:, None] - u[None], axis=-1)[iu]
    summ = np.linalg.norm(u[:, None] + u[None], axis=-1)[iu]
    return float(np.sum(1 / diff) + np.sum(1 / summ))


def _random_directions(n, seed):
    u = np.random.default_rng(seed).standard_normal((n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


# Best known smallest angles between n antipodal directions (packings of 2n points into ±pairs):
# 6 → 63.43° (icosahedron), 30 → ≈ 26°; electrostatic sets come close without maximising it.
@pytest.mark.parametrize(
    "n, min_angle", [(3, 89.9), (6, 63.0), (15, 34.0), (30, 24.0), (60, 16.5), (150, 10.5)]
)
def test_electrostatic_directions_are_well_spread(n, min_angle):
    u = electrostatic_directions(n, seed=0)
    assert u.shape == (n, 3)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-12)
    assert (u[:, 2] >= 0).all()  # folded onto the upper hemisphere
    assert _min_angle_deg(u) >= min_angle
    random = _random_directions(n, seed=0)
    assert _min_angle_deg(u) > 1.4 * _min_angle_deg(random)
    assert _energy(u) < _energy(random)


def test_electrostatic_directions_reproducible_and_seeded():
    a, b, c = (
        electrostatic_directions(20, seed=4),
        electrostatic_directions(20, seed=4),
        electrostatic_directions(20, seed=5),
    )
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert electrostatic_directions(1).shape == (1, 3)


def test_electrostatic_without_antipodal_symmetry_spreads_full_sphere():
    u = electrostatic_directions(4, antipodal=False)
    # Four charges on a sphere form a regular tetrahedron: all angles arccos(-1/3) = 109.47°.
    assert _min_angle_deg(u, antipodal=False) == pytest.approx(109.47, abs=0.1)
    assert np.linalg.norm(u.sum(axis=0)) < 1e-4


@pytest.mark.parametrize("bad", [0, -3, 2.5, "6"])
def test_electrostatic_rejects_bad_count(bad):
    with pytest.raises(InputError, match="^n: "):
        electrostatic_directions(bad)


@pytest.mark.parametrize(
    "builder, size, shells, echo_time",
    [
        (
            five_shell_protocol,
            158,
            [(0.0, 8), (600.0, 30), (1200.0, 30), (1800.0, 30), (2400.0, 30), (3000.0, 30)],
            80.7,
        ),
        (three_shell_protocol, 148, [(0.0, 8), (750.0, 25), (1070.0, 40), (3000.0, 75)], 80.7),
        (noddi_protocol, 99, [(0.0, 9), (711.0, 30), (2855.0, 60)], None),
    ],
)
def test_protocols_as_published(builder, size, shells, echo_time):
    gtab = builder()
    assert len(gtab) == size
    assert gtab.shells() == shells
    assert gtab.echo_time == echo_time
    assert gtab.bvals[0] == 0 and gtab.bvals[-1] > 0  # one b0 first, the series ends diffusion-weighted
    weighted = ~gtab.b0s_mask
    np.testing.assert_allclose(np.linalg.norm(gtab.bvecs[weighted], axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(gtab.bvecs[gtab.b0s_mask], 0.0)
    for b, count in shells[1:]:
        u = gtab.bvecs[gtab.bvals == b]
        # Packing bound for `count` antipodal points is ≈ sqrt(4π / (2·count)) rad; ask for 80% of it.
        assert _min_angle_deg(u) > 0.8 * np.degrees(np.sqrt(2 * np.pi / count))
    assert PROTOCOLS[{158: "five-shell", 148: "three-shell", 99: "noddi"}[size]] is builder


def test_b0s_interleaved_evenly():
    gtab = five_shell_protocol()
    positions = np.flatnonzero(gtab.b0s_mask)
    assert positions[0] == 0
    gaps = np.diff(positions) - 1  # diffusion-weighted volumes between consecutive b0s
    assert gaps.min() >= 18 and gaps.max() <= 19
    assert len(gtab) - 1 - positions[-1] in (18, 19)
    first = multi_shell_protocol([(1000, 10)], n_b0=3, interleave=False)
    np.testing.assert_array_equal(np.flatnonzero(first.b0s_mask), [0, 1, 2])


def test_shells_are_not_copies_of_each_other():
    gtab = five_shell_protocol()
    a, b = gtab.bvecs[gtab.bvals == 600], gtab.bvecs[gtab.bvals == 1200]
    nearest = np.degrees(np.arccos(np.clip(np.abs(a @ b.T).max(axis=1), 0.0, 1.0)))
    assert np.median(nearest) > 4.0  # typical offset between the sets; the spacing within one is ≈ 25°


def test_protocol_seed_changes_directions_only():
    a, b = three_shell_protocol(seed=0), three_shell_protocol(seed=1)
    np.testing.assert_array_equal(a.bvals, b.bvals)
    assert not np.allclose(a.bvecs, b.bvecs)
    np.testing.assert_array_equal(a.bvecs, three_shell_protocol(seed=0).bvecs)


@pytest.mark.parametrize(
    "shells, n_b0, problem",
    [
        ([], 1, "at least one shell"),
        ([(1000, 0)], 1, "at least 1"),
        ([(30, 5)], 1, "above 50"),
        ([(1000, 5)], -1, "n_b0"),
    ],
)
def test_multi_shell_rejects_bad_input(shells, n_b0, problem):
    with pytest.raises(InputError, match=problem):
        multi_shell_protocol(shells, n_b0)


def test_subsample_pattern_one_b0_and_reproducible():
    gtab = three_shell_protocol()
    first_b0 = int(np.flatnonzero(gtab.b0s_mask)[0])
    for seed in range(5):
        alpha = subsample_pattern(gtab, 12, seed=seed)
        assert alpha.shape == (12,) and alpha.dtype == np.int64
        assert np.all(np.diff(alpha) > 0)
        assert gtab.b0s_mask[alpha].sum() == 1 and alpha[0] == first_b0
        np.testing.assert_array_equal(alpha, subsample_pattern(gtab, 12, seed=seed))
    patterns = {tuple(subsample_pattern(gtab, 12, seed=s)) for s in range(10)}
    assert len(patterns) == 10
    full = subsample_pattern(gtab, 141)
    np.testing.assert_array_equal(full, np.r_[first_b0, np.flatnonzero(~gtab.b0s_mask)])


def test_stratified_pattern_follows_shell_sizes():
    gtab = three_shell_protocol()  # 25 / 40 / 75 directions of 140
    for seed in range(3):
        alpha = subsample_pattern(gtab, 15, seed=seed, stratified=True)  # 14 DWIs → 2.5, 4, 7.5
        counts = [int(np.sum(gtab.bvals[alpha] == b)) for b in (750, 1070, 3000)]
        assert sum(counts) == 14 and counts[1] == 4 and sorted([counts[0], counts[2]]) in ([2, 8], [3, 7])
        assert gtab.b0s_mask[alpha].sum() == 1


@pytest.mark.parametrize("n", [1, 0, 93])
def test_subsample_pattern_rejects_bad_size(n):
    with pytest.raises(InputError, match="n_volumes"):
        subsample_pattern(noddi_protocol(), n)


def test_subsample_pattern_needs_a_b0():
    gtab = GradientTable([1000.0, 1000.0, 1000.0], np.eye(3))
    with pytest.raises(InputError, match="no b=0"):
        subsample_pattern(gtab, 2)


def test_subsample_keeps_table_and_signals_aligned():
    gtab = noddi_protocol()
    data = np.broadcast_to(gtab.bvals, (2, 3, len(gtab)))
    alpha = subsample_pattern(gtab, 8, seed=3)
    sub, signals = subsample(gtab, data, alpha)
    assert signals.shape == (2, 3, 8)
    np.testing.assert_array_equal(signals[1, 2], sub.bvals)
    np.testing.assert_array_equal(sub.bvecs, gtab.bvecs[alpha])
    with pytest.raises(InputError, match="^data: "):
        subsample(gtab, data[..., :-1], alpha)


def test_b_from_gradient_stejskal_tanner():
    gamma = 2.675221874e8
    G, small, big = 0.04, 0.02, 0.04  # T/m, s
    expected = gamma**2 * G**2 * small**2 * (big - small / 3) / 1e6
    assert b_from_gradient(40.0, 20.0, 40.0) == pytest.approx(expected, rel=1e-8)
    assert b_from_gradient(40.0, 20.0, 40.0) == pytest.approx(1526.8, abs=0.1)
    # b scales with G²: doubling the amplitude quadruples b.
    np.testing.assert_allclose(b_from_gradient([20.0, 40.0], 20.0, 40.0), [expected / 4, expected])
    with pytest.raises(InputError, match="big_delta_ms"):
        b_from_gradient(40.0, 20.0, 10.0)
    with pytest.raises(InputError, match="small_delta_ms"):
        b_from_gradient(40.0, 0.0, 10.0)
