"""Exhaustive fingerprinting: the closed-form pair search against scipy's NNLS, recovery of
dictionary atoms, the estimator's bookkeeping, files and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from bioinverse.dmri import fingerprint as fp
from bioinverse.dmri.crossing import Microstructure, simulate_crossings
from bioinverse.dmri.dictionary import build_dictionary
from bioinverse.dmri.fingerprint import (
    Fingerprinting,
    exhaustive_pair_search,
    exhaustive_pair_search_bruteforce,
)
from bioinverse.dmri.pgse import PGSEProtocol, hcp_mgh_protocol
from bioinverse.errors import InputError


def assert_same_search(result, reference, atol=1e-9):
    j1, j2, w, res = result
    rj1, rj2, rw, rres = reference
    np.testing.assert_array_equal(j1, rj1)
    np.testing.assert_array_equal(j2, rj2)
    np.testing.assert_allclose(w, rw, atol=atol, rtol=1e-8)
    np.testing.assert_allclose(res, rres, atol=atol, rtol=1e-8)


def random_unit(rng, n):
    u = rng.normal(size=(n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def hcp():
    return hcp_mgh_protocol()


@pytest.fixture(scope="module")
def hcp_dictionary(hcp):
    return build_dictionary(hcp, progress=False)


# ------------------------------------------------------------------------------ the pair search


def test_closed_form_equals_scipy_nnls_on_random_small_problems():
    rng = np.random.default_rng(0)
    kinds = {"interior": 0, "one atom": 0, "none": 0}
    for trial in range(40):
        M, N1, N2 = rng.integers(3, 12), rng.integers(1, 7), rng.integers(1, 7)
        C1, C2, y = rng.normal(size=(3, M, N1)), rng.normal(size=(3, M, N2)), rng.normal(size=(3, M))
        if trial % 2:  # non-negative atoms, as in a diffusion dictionary
            C1, C2 = np.abs(C1), np.abs(C2)
        result = exhaustive_pair_search(C1, C2, y)
        assert_same_search(result, exhaustive_pair_search_bruteforce(C1, C2, y))
        w = result[2]
        kinds["interior"] += int(((w > 0).all(axis=1)).sum())
        kinds["one atom"] += int(((w > 0).sum(axis=1) == 1).sum())
        kinds["none"] += int(((w == 0).all(axis=1)).sum())
    # the random cases cover every kind of solution of the two-variable NNLS
    assert min(kinds.values()) > 0, kinds


def test_boundary_solutions():
    rng = np.random.default_rng(1)
    C1, C2 = rng.random((3, 15, 5)), rng.random((3, 15, 4))
    y = np.stack([
        2.0 * C1[0, :, 3],                     # one atom fits exactly: w2 = 0, j2 the first (a tie)
        -(C1[1, :, 0] + C2[1, :, 2]),          # negatively correlated with every atom: w = 0
        0.5 * C1[2, :, 1] + 0.5 * C2[2, :, 3],  # interior
    ])
    j1, j2, w, res = result = exhaustive_pair_search(C1, C2, y)
    assert_same_search(result, exhaustive_pair_search_bruteforce(C1, C2, y))
    assert (j1[0], j2[0]) == (3, 0) and np.allclose(w[0], [2.0, 0.0]) and res[0] < 1e-24
    assert (j1[1], j2[1]) == (0, 0) and (w[1] == 0).all() and res[1] == pytest.approx(y[1] @ y[1])
    assert (j1[2], j2[2]) == (1, 3) and np.allclose(w[2], [0.5, 0.5])


def test_identical_and_degenerate_atoms():
    rng = np.random.default_rng(2)
    C1, C2 = rng.random((2, 12, 6)), rng.random((2, 12, 5))
    C1[:, :, 4] = C1[:, :, 1]  # duplicated atom: ties go to the first in row-major order
    C2[:, :, 0] = C1[:, :, 1]  # the same atom in both sub-dictionaries: a collinear pair
    C1[:, :, 2] = 0.0          # an atom of zero norm
    y = np.stack([0.3 * C1[0, :, 1] + 0.6 * C2[0, :, 3], 1.5 * C1[1, :, 1]])
    j1, j2, w, res = result = exhaustive_pair_search(C1, C2, y)
    assert_same_search(result, exhaustive_pair_search_bruteforce(C1, C2, y))
    assert (j1[0], j2[0]) == (1, 3) and np.allclose(w[0], [0.3, 0.6])
    # every pair (1 or 4, any) fits exactly with w = (1.5, 0), so does (j, 0) with w = (0, 1.5)
    assert (j1[1], j2[1]) == (0, 0) and np.allclose(w[1], [0.0, 1.5]) and res[1] < 1e-24


@pytest.mark.parametrize("noise", [0.0, 1e-4, 1.0])
def test_low_rank_path_equals_scipy_nnls(noise):
    # ≥ 40 measurements and atoms: the cross products go through the low-rank identity, with the
    # remainder only bounded (exactly low-rank atoms) or computed in float32 (noisy or generic)
    rng = np.random.default_rng(3)
    V, M, N1, N2 = 2, 48, 44, 41
    C1 = rng.random((V, M, 4)) @ rng.random((4, N1)) + noise * rng.random((V, M, N1))
    C2 = rng.random((V, M, 5)) @ rng.random((5, N2)) + noise * rng.random((V, M, N2))
    y = 0.4 * C1[:, :, 7] + 0.6 * C2[:, :, 30] + 0.05 * rng.normal(size=(V, M))
    assert_same_search(exhaustive_pair_search(C1, C2, y), exhaustive_pair_search_bruteforce(C1, C2, y))


def test_remainder_is_bounded_for_low_rank_atoms_and_computed_otherwise():
    rng = np.random.default_rng(4)
    V, M, N = 2, 60, 50
    exact = rng.random((V, M, 3)) @ rng.random((3, N))
    for C, computed in ((exact, False), (exact + 1e-3 * rng.random((V, M, N)), True)):
        aa = np.einsum("vmn,vmn->vn", C, C)
        index, sign = fp._sparse_sketch(N, fp._RANK, 0)
        sketch = np.einsum("vmn,nr->vmr", C, np.stack([np.bincount(i, s, N) for i, s in zip(index, sign)], 1))
        peak = np.abs(C).max(axis=(1, 2))
        G, _, descale, rho1, rho2, c_res, c64 = fp._cross_products(C, C, aa, aa, peak, peak, sketch, sketch,
                                                                    fp._Workspace())
        assert (descale != 0).all() == computed
        exact_G = np.matmul(C.transpose(0, 2, 1), C)
        if not computed:
            # the float64 low-rank part alone is within its stated bound of the exact products
            bound = (c_res[:, None, None] * rho1[:, :, None] * rho2[:, None, :] + c64[:, None, None]) * np.sqrt(
                aa[:, :, None] * aa[:, None, :])
            assert (np.abs(G - exact_G) <= bound).all()


def test_threads_and_chunks_do_not_change_the_result():
    rng = np.random.default_rng(5)
    C1, C2, y = rng.random((9, 50, 45)), rng.random((9, 50, 42)), rng.random((9, 50))
    reference = exhaustive_pair_search(C1, C2, y, threads=1, chunk=9)
    for threads, chunk in ((2, 1), (3, 2)):
        for a, b in zip(exhaustive_pair_search(C1, C2, y, threads=threads, chunk=chunk), reference):
            np.testing.assert_array_equal(a, b)


def test_search_rejects_bad_input():
    C1, C2, y = np.ones((2, 5, 3)), np.ones((2, 5, 4)), np.ones((2, 5))
    bad = [
        ((np.ones((2, 5)), C2, y), "C1"),
        ((C1, np.ones((2, 6, 4)), y), "C1, C2, y"),
        ((C1, C2, np.ones((3, 5))), "C1, C2, y"),
        ((C1.astype(complex), C2, y), "C1"),
        ((C1, C2.astype(object), y), "C2"),
        ((C1, np.ones((2, 5, 0)), y), "C1, C2"),
        ((np.where(np.arange(3) == 1, np.nan, C1), C2, y), "C1"),
        ((C1, C2, np.full((2, 5), np.inf)), "y"),
        ((C1, np.full((2, 5, 4), 1e200), y), "C2"),
    ]
    for args, source in bad:
        with pytest.raises(InputError) as info:
            exhaustive_pair_search(*args)
        assert info.value.source == source
    with pytest.raises(InputError, match="chunk"):
        exhaustive_pair_search(C1, C2, y, chunk=0)
    with pytest.raises(InputError, match="threads"):
        exhaustive_pair_search(C1, C2, y, threads=True)


# ------------------------------------------------------------------------------ the estimator


def test_recovers_the_atoms_of_noise_free_dictionary_signals(hcp, hcp_dictionary):
    rng = np.random.default_rng(6)
    d, V = hcp_dictionary, 6
    u = np.stack([random_unit(rng, V), random_unit(rng, V)], axis=1)
    large = np.flatnonzero(d.radius >= 1.0)  # radii the signal resolves (small ones barely differ)
    pick = rng.choice(large, size=(V, 2))
    nu1 = rng.uniform(0.2, 0.8, V)
    C1, C2 = d.atoms(hcp, u[:, 0]), d.atoms(hcp, u[:, 1])
    signals = 500.0 * (nu1[:, None] * C1[np.arange(V), :, pick[:, 0]]
                       + (1 - nu1[:, None]) * C2[np.arange(V), :, pick[:, 1]])
    estimate = Fingerprinting(d, hcp).fit().predict(signals, u, batch_size=4)
    np.testing.assert_array_equal(estimate.radius, d.radius[pick])
    np.testing.assert_array_equal(estimate.density, d.density[pick])
    np.testing.assert_allclose(estimate.nu, np.column_stack([nu1, 1 - nu1]), atol=1e-9)


def test_predict_equals_bruteforce_on_noisy_crossings(hcp, hcp_dictionary):
    d = hcp_dictionary
    keep = np.flatnonzero((np.arange(d.n_atoms) % 23) % 4 == 0)[::3]  # a coarse sub-grid of ~ 30 atoms
    from bioinverse.dmri.dictionary import FingerprintDictionary

    small = FingerprintDictionary(d.radius[keep], d.density[keep], d.shells, d.angles, d.signals[keep],
                                  d.generator, d.settings)
    data = simulate_crossings(hcp, 3, snr=25, seed=7)
    estimate = Fingerprinting(small, hcp).predict(data.signals, data.orientations)
    y = data.signals / data.signals[:, hcp.b0s_mask].mean(axis=1, keepdims=True)
    j1, j2, w, _ = exhaustive_pair_search_bruteforce(small.atoms(hcp, data.orientations[:, 0]),
                                                      small.atoms(hcp, data.orientations[:, 1]), y)
    np.testing.assert_array_equal(estimate.radius, np.column_stack([small.radius[j1], small.radius[j2]]))
    np.testing.assert_array_equal(estimate.density, np.column_stack([small.density[j1], small.density[j2]]))
    np.testing.assert_allclose(estimate.nu, w / w.sum(axis=1, keepdims=True), atol=1e-9)


def tiny_setup():
    p = PGSEProtocol([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], [0.0, 70.0, 70.0, 70.0, 150.0],
                     12.9, 21.8, 57.0)
    d = build_dictionary(p, radius=[0.5, 1.0, 2.0, 1.0], density=[0.3, 0.3, 0.5, 0.7], n_angles=19,
                         progress=False)
    return p, d


def test_no_explained_signal_gives_equal_fractions():
    p, d = tiny_setup()
    signals = np.array([[1.0, -5.0, -5.0, -5.0, -5.0]])  # anti-correlated with every atom: w = 0
    est = Fingerprinting(d, p).fit().predict(signals, np.array([[[1.0, 0, 0], [0, 0, 1.0]]]))
    assert est.nu.tolist() == [[0.5, 0.5]]


def test_save_load_round_trip_and_protocol_check(tmp_path):
    p, d = tiny_setup()
    rng = np.random.default_rng(8)
    u = np.stack([random_unit(rng, 5), random_unit(rng, 5)], axis=1)
    signals = 1.0 + 0.1 * rng.random((5, len(p)))
    fitted = Fingerprinting(d, p).fit()
    path = fitted.save(tmp_path / "fp.npz")
    loaded = Fingerprinting.load(path, p)
    assert isinstance(loaded.predict(signals, u), Microstructure)
    np.testing.assert_array_equal(loaded.predict(signals, u).as_array(), fitted.predict(signals, u).as_array())
    assert Fingerprinting.load(path).protocol.digest() == p.digest()
    other = p.subset([0, 1, 2, 3])
    with pytest.raises(InputError) as info:
        Fingerprinting.load(path, other)
    assert info.value.source == "protocol"
    (tmp_path / "junk.npz").write_bytes(b"not a file")
    for bad in (tmp_path / "missing.npz", tmp_path / "junk.npz", d.save(tmp_path / "dictionary.npz")):
        with pytest.raises(InputError):
            Fingerprinting.load(bad)


def test_estimator_rejects_bad_input():
    p, d = tiny_setup()
    u = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
    with pytest.raises(InputError, match="dictionary"):
        Fingerprinting(d.signals, p)
    with pytest.raises(InputError, match="protocol"):
        Fingerprinting(d, "hcp")
    richer = PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 90.0], 12.9, 21.8, 57.0)
    with pytest.raises(InputError) as info:
        Fingerprinting(d, richer).fit()  # a shell the dictionary lacks
    assert info.value.source == "protocol"
    no_b0 = p.subset([1, 2, 3])
    with pytest.raises(InputError, match="G = 0"):
        Fingerprinting(d, no_b0).fit()
    estimator = Fingerprinting(d, p).fit()
    signals = np.ones((1, len(p)))
    for args, source in (((signals[:, :3], u), "signals"), ((signals, u[:, :1]), "orientations"),
                         ((signals, np.zeros((1, 2, 3))), "orientations"), ((-signals, u), "signals")):
        with pytest.raises(InputError) as info:
            estimator.predict(*args)
        assert info.value.source == source
    with pytest.raises(InputError, match="batch_size"):
        estimator.predict(signals, u, batch_size=0)
