"""Fingerprint dictionaries: grid, generators, rotation to orientations, protocols, files, caching."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from bioinverse.dmri import dictionary as dictionary_module
from bioinverse.dmri.axons import axon_population_signal
from bioinverse.dmri.dictionary import FingerprintDictionary, build_dictionary, default_grid
from bioinverse.dmri.pgse import PGSEProtocol, hcp_mgh_protocol
from bioinverse.errors import InputError

SMALL, BIG, TE = 12.9, 21.8, 57.0


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def perpendicular_units(u, rng, n):
    """n random unit vectors perpendicular to the unit vector u."""
    w = rng.normal(size=(n, 3))
    w -= (w @ u)[:, None] * u
    return unit(w)


@pytest.fixture(scope="module")
def hcp():
    return hcp_mgh_protocol()


@pytest.fixture(scope="module")
def hcp_dictionary(hcp):
    return build_dictionary(hcp, progress=False)


def test_default_grid_is_the_seed_grid():
    radius, density = default_grid()
    assert radius.shape == density.shape == (782,)
    np.testing.assert_allclose(np.unique(radius), np.linspace(0.25, 2.23, 34))
    np.testing.assert_allclose(np.unique(density), np.linspace(0.10, 0.76, 23))
    assert len({(r, f) for r, f in zip(radius, density)}) == 782
    assert radius[0] == radius[22] < radius[23]  # radius major


def test_analytic_build_equals_the_model_atom_by_atom(hcp, hcp_dictionary):
    d = hcp_dictionary
    shells = hcp.shell_table()[0]
    assert d.n_atoms == 782 and d.signals.shape == (782, 5, 181)
    assert d.generator == "analytic" and d.settings == {"diffusivity": 2.0}
    np.testing.assert_array_equal(d.shells, shells)
    np.testing.assert_array_equal(d.signals[:, 0], 1.0)  # the b = 0 shell
    for j in (0, 400, 781):
        expected = axon_population_signal(d.radius[j], d.density[j], shells[:, :1], SMALL, BIG, np.cos(d.angles))
        np.testing.assert_allclose(d.signals[j], expected, rtol=1e-14)
    assert not d.signals.flags.writeable


def test_rotation_is_exact_on_the_angle_grid(hcp_dictionary):
    """Directions at grid angles θ_k (and π − θ_k) to the fibres reproduce the model to 1e-12."""
    rng = np.random.default_rng(0)
    d = hcp_dictionary
    shells = d.shells[1:]
    n_per_shell = 40
    orientations = unit(rng.normal(size=(3, 3)))
    for u in orientations:
        grid_index = np.concatenate([[0, 180, 1, 179, 90], rng.integers(0, 181, size=n_per_shell - 5)])
        theta = d.angles[grid_index]
        w = perpendicular_units(u, rng, n_per_shell)
        sign = np.where(rng.random(n_per_shell) < 0.5, 1.0, -1.0)  # θ or π − θ
        g = sign[:, None] * (np.cos(theta)[:, None] * u + np.sin(theta)[:, None] * w)
        directions = np.tile(g, (len(shells), 1))
        G = np.repeat(shells[:, 0], n_per_shell)
        protocol = PGSEProtocol(directions, G, SMALL, BIG, TE)
        C = d.atoms(protocol, [u])[0]
        expected = axon_population_signal(d.radius[None, :], d.density[None, :], G[:, None], SMALL, BIG,
                                          np.tile(np.cos(theta), len(shells))[:, None])
        np.testing.assert_allclose(C, expected, rtol=0, atol=1e-12)


def test_rotation_off_the_grid_is_within_the_linear_interpolation_bound(hcp, hcp_dictionary):
    rng = np.random.default_rng(1)
    d = hcp_dictionary
    orientations = unit(rng.normal(size=(4, 3)))
    C = d.atoms(hcp, orientations)
    assert C.shape == (4, 552, 782)
    shell_of = hcp.shell_table()[1]
    cos = np.abs(orientations @ hcp.directions.T)  # (V, M)
    expected = axon_population_signal(d.radius, d.density, hcp.gradient_strength[None, :, None], SMALL, BIG,
                                      cos[:, :, None])
    error = np.abs(C - expected).max(axis=(0, 2))  # per measurement
    # |error| ≤ h²/8 max|S''| and h² S'' ≈ the second difference on the grid (with a margin for the
    # variation of S'' within a cell)
    bound = np.abs(np.diff(d.signals, n=2, axis=2)).max(axis=(0, 2)) / 8
    assert np.all(error <= 1.5 * bound[shell_of] + 1e-15)
    assert error.max() < 5e-4
    # a coarse grid is worse, with the h² scaling
    coarse = build_dictionary(hcp, n_angles=19, progress=False)
    coarse_error = np.abs(coarse.atoms(hcp, orientations) - expected).max()
    assert coarse_error > 20 * error.max()


def test_atoms_details(hcp, hcp_dictionary):
    d = hcp_dictionary
    u = np.array([[0.3, -0.4, 0.8]])
    C = d.atoms(hcp, u)
    np.testing.assert_array_equal(C[0, hcp.b0s_mask], 1.0)
    np.testing.assert_allclose(d.atoms(hcp, -5.0 * u), C, rtol=0, atol=1e-14)  # sign and length are irrelevant
    out = np.full((2, 552, 782), np.nan)
    assert d.atoms(hcp, np.vstack([u, u]), out=out) is out
    np.testing.assert_allclose(out[1], C[0], rtol=0, atol=1e-14)
    with pytest.raises(InputError, match="out"):
        d.atoms(hcp, u, out=np.empty((1, 552, 781)))
    for bad in ([0.0, 0.0, 1.0], [[0.0, 0.0, 0.0]], [[np.nan, 0.0, 1.0]], np.ones((2, 2))):
        with pytest.raises(InputError) as info:
            d.atoms(hcp, bad)
        assert info.value.source == "orientations"


def test_for_protocol_keeps_the_shells_used(hcp, hcp_dictionary):
    """Dropping the b = 10000 shell: the restricted dictionary gives the same atoms, no simulation."""
    keep = hcp.bvals < 9000
    reduced_protocol = hcp.subset(keep)
    reduced = hcp_dictionary.for_protocol(reduced_protocol)
    assert reduced.shells.shape == (4, 3) and reduced.signals.shape == (782, 4, 181)
    np.testing.assert_array_equal(reduced.shells, hcp_dictionary.shells[:4])
    u = unit(np.random.default_rng(2).normal(size=(2, 3)))
    # (the subset's directions are renormalised, hence rounding-level differences)
    np.testing.assert_allclose(reduced.atoms(reduced_protocol, u), hcp_dictionary.atoms(hcp, u)[:, keep], rtol=0,
                               atol=1e-14)
    assert reduced.settings == hcp_dictionary.settings and reduced.generator == "analytic"
    # a scheme-file round trip perturbs G in its last digits: still the same shells
    perturbed = PGSEProtocol(hcp.directions, hcp.gradient_strength * (1 + 1e-12), SMALL, BIG, TE)
    assert hcp_dictionary.for_protocol(perturbed).shells.shape == (5, 3)


def test_missing_shell_is_an_input_error(hcp_dictionary):
    u = [[0.0, 0.0, 1.0]]
    for G, small, big in ((100.0, SMALL, BIG), (69.3, 10.0, BIG), (154.9, SMALL, 30.0)):
        protocol = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, G], small, big, 80.0)
        with pytest.raises(InputError, match="not in the dictionary") as info:
            hcp_dictionary.for_protocol(protocol)
        assert info.value.source == "protocol"
        with pytest.raises(InputError, match="not in the dictionary"):
            hcp_dictionary.atoms(protocol, u)
    # b = 0 measurements need no shell, whatever their timing
    b0_only = PGSEProtocol([[0, 0, 0]], 0.0, 5.0, 9.0, 20.0)
    np.testing.assert_array_equal(hcp_dictionary.atoms(b0_only, u), 1.0)


def test_save_load_round_trip(tmp_path, hcp, hcp_dictionary):
    path = hcp_dictionary.save(tmp_path / "hcp_dictionary")  # no .npz suffix: written as given
    assert path == tmp_path / "hcp_dictionary" and path.is_file()
    loaded = FingerprintDictionary.load(path)
    for name in ("radius", "density", "shells", "angles", "signals"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(hcp_dictionary, name))
    assert loaded.generator == hcp_dictionary.generator and loaded.settings == hcp_dictionary.settings
    assert loaded.metadata() == hcp_dictionary.metadata()
    u = [[1.0, 2.0, 3.0]]
    np.testing.assert_array_equal(loaded.atoms(hcp, u), hcp_dictionary.atoms(hcp, u))


def test_load_rejects_what_is_not_a_dictionary(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        FingerprintDictionary.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="readable"):
        FingerprintDictionary.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not a fingerprint dictionary"):
        FingerprintDictionary.load(tmp_path / "other.npz")


def test_analytic_cache_is_reused_and_checked(tmp_path, monkeypatch):
    protocol = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 120.0], SMALL, BIG, TE)
    cache = tmp_path / "cache.npz"
    grid = {"radius": [1.0, 2.0], "density": [0.3, 0.6]}
    first = build_dictionary(protocol, n_angles=31, cache=cache, progress=False, **grid)
    assert cache.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been loaded")

    monkeypatch.setattr(dictionary_module, "_analytic_signals", fail)
    again = build_dictionary(protocol, n_angles=31, cache=cache, progress=False, **grid)
    np.testing.assert_array_equal(again.signals, first.signals)
    for other in ({"n_angles": 61}, {"diffusivity": 1.7}, {"radius": [1.0, 2.5], "density": [0.3, 0.6]}):
        arguments = {"n_angles": 31, **grid, **other}
        with pytest.raises(InputError, match="other arguments") as info:
            build_dictionary(protocol, cache=cache, progress=False, **arguments)
        assert info.value.source == str(cache)
    monkeypatch.undo()
    rebuilt = build_dictionary(protocol, n_angles=61, cache=cache, progress=False, overwrite=True, **grid)
    assert FingerprintDictionary.load(cache).angles.size == 61 == rebuilt.angles.size


class FakeMonteCarlo:
    """Stands in for bioinverse.dmri.montecarlo: signals drawn from the seeds, calls counted, and an
    optional failure after a number of atoms (an interrupted build)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def pack_cylinders(self, mean_radius, density, *, radius_cv=0.1, n_cylinders=8, seed=0):
        return (mean_radius, density, radius_cv, n_cylinders, seed)

    def simulate_fingerprint(self, substrate, shells, angles, *, n_walkers=10, seed=0):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        mean_radius, density, _, _, pack_seed = substrate
        noise = np.random.default_rng([pack_seed, seed]).uniform(size=(len(shells), len(angles)))
        return np.exp(-shells[:, :1] * mean_radius * 1e-3 * (1 + np.sin(angles))) * density + 1e-3 * noise


def install(monkeypatch, fake):
    from bioinverse.dmri import montecarlo

    monkeypatch.setattr(montecarlo, "pack_cylinders", fake.pack_cylinders)
    monkeypatch.setattr(montecarlo, "simulate_fingerprint", fake.simulate_fingerprint)


def test_montecarlo_cache_resumes_to_the_uninterrupted_build(tmp_path, monkeypatch):
    protocol = PGSEProtocol([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [0.0, 70.0, 150.0], SMALL, BIG, TE)
    radius, density = np.linspace(0.5, 2.0, 20), np.linspace(0.2, 0.7, 20)
    arguments = {"generator": "montecarlo", "radius": radius, "density": density, "n_angles": 7,
                 "progress": False, "seed": 5, "n_walkers": 99}
    install(monkeypatch, FakeMonteCarlo())
    uninterrupted = build_dictionary(protocol, **arguments)
    assert uninterrupted.settings == {"radius_cv": 0.1, "n_cylinders": 8, "n_walkers": 99, "seed": 5}

    cache = tmp_path / "mc.npz"
    interrupted = FakeMonteCarlo(fail_after=11)
    install(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dictionary(protocol, cache=cache, **arguments)
    with pytest.raises(InputError, match="unfinished build"):
        FingerprintDictionary.load(cache)
    partial = np.load(cache)["done"]
    assert partial.sum() == 11 and partial[:11].all()

    resumed_fake = FakeMonteCarlo()
    install(monkeypatch, resumed_fake)
    resumed = build_dictionary(protocol, cache=cache, **arguments)
    assert resumed_fake.calls == 20 - 11
    np.testing.assert_array_equal(resumed.signals, uninterrupted.signals)
    np.testing.assert_array_equal(FingerprintDictionary.load(cache).signals, uninterrupted.signals)

    # a finished cache is loaded without simulating; other settings or seed are refused
    build_dictionary(protocol, cache=cache, **arguments)
    assert resumed_fake.calls == 9
    for other in ({"seed": 6}, {"n_walkers": 100}, {"generator": "analytic", "n_walkers": None}):
        changed = {k: v for k, v in {**arguments, **other}.items() if v is not None}
        with pytest.raises(InputError, match="other arguments"):
            build_dictionary(protocol, cache=cache, **changed)
    with pytest.raises(InputError, match="unknown Monte Carlo settings"):
        build_dictionary(protocol, **{**arguments, "n_particles": 10})


def test_montecarlo_generator_end_to_end_resumes(tmp_path, monkeypatch):
    """The real simulator with tiny settings: a build interrupted after one atom resumes exactly."""
    from bioinverse.dmri import montecarlo

    protocol = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 70.0], SMALL, BIG, TE)
    arguments = {"generator": "montecarlo", "radius": [1.0, 1.8, 1.4], "density": [0.5, 0.6, 0.4],
                 "n_angles": 5, "progress": False, "n_walkers": 64, "n_steps": 40, "n_cylinders": 6}
    uninterrupted = build_dictionary(protocol, **arguments)
    np.testing.assert_allclose(uninterrupted.signals[:, 0], 1.0, atol=1e-12)
    assert np.all((uninterrupted.signals > 0) & (uninterrupted.signals <= 1 + 1e-12))
    assert uninterrupted.settings["n_walkers"] == 64 and uninterrupted.settings["seed"] == 0

    simulate, calls = montecarlo.simulate_fingerprint, []

    @functools.wraps(simulate)  # keeps the signature, whose defaults the build records
    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(montecarlo, "simulate_fingerprint", interrupted)
    cache = tmp_path / "mc.npz"
    with pytest.raises(KeyboardInterrupt):
        build_dictionary(protocol, cache=cache, **arguments)
    monkeypatch.undo()
    resumed = build_dictionary(protocol, cache=cache, **arguments)
    np.testing.assert_array_equal(resumed.signals, uninterrupted.signals)


@pytest.mark.parametrize(
    ("arguments", "source"),
    [
        ({"generator": "bloch"}, "generator"),
        ({"n_angles": 1}, "n_angles"),
        ({"n_angles": 3.5}, "n_angles"),
        ({"seed": -1}, "seed"),
        ({"radius": [1.0]}, "radius, density"),
        ({"radius": [1.0, 2.0], "density": [0.5]}, "radius, density"),
        ({"radius": [-1.0], "density": [0.5]}, "radius"),
        ({"radius": [1.0], "density": [1.0]}, "density"),
        ({"radius": [np.nan], "density": [0.5]}, "radius"),
        ({"walkers": 10}, "generator_settings"),
        ({"diffusivity": -2.0}, "diffusivity"),
    ],
)
def test_build_rejects_bad_arguments(arguments, source):
    protocol = PGSEProtocol([[1, 0, 0]], 70.0, SMALL, BIG, TE)
    with pytest.raises(InputError) as info:
        build_dictionary(protocol, progress=False, **arguments)
    assert info.value.source == source


def test_dictionary_validates_its_arrays():
    good = {"radius": [1.0], "density": [0.5], "shells": [[70.0, SMALL, BIG]], "angles": np.linspace(0, np.pi / 2, 3),
            "signals": np.ones((1, 1, 3)), "generator": "analytic"}
    assert FingerprintDictionary(**good).n_atoms == 1
    for change, source in (({"angles": np.linspace(0, np.pi, 3)}, "angles"),
                           ({"angles": [0.0, 0.2, np.pi / 2]}, "angles"),
                           ({"signals": np.ones((1, 1, 4))}, "signals"),
                           ({"shells": [[70.0, SMALL]]}, "shells"),
                           ({"generator": "other"}, "generator"),
                           ({"settings": {"f": object()}}, "settings")):
        with pytest.raises(InputError) as info:
            FingerprintDictionary(**{**good, **change})
        assert info.value.source == source
