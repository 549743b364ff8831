import numpy as np
import pytest
import scipy.optimize
import torch

from bioinverse.dmri.acquisition import electrostatic_directions
from bioinverse.dmri.crossing import Microstructure, normalise_b0
from bioinverse.dmri.dictionary import build_dictionary, default_grid
from bioinverse.dmri.hybrid import HybridEstimator, hybrid_train_config
from bioinverse.dmri.pgse import PGSEProtocol
from bioinverse.errors import InputError


@pytest.fixture(autouse=True)
def one_thread():
    # Networks this small train faster on one thread than on two competing ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _protocol():
    directions, strengths = [np.zeros((2, 3))], [np.zeros(2)]
    for shell, (G, n) in enumerate(((70.0, 20), (120.0, 20), (200.0, 24))):
        directions.append(electrostatic_directions(n, seed=shell))
        strengths.append(np.full(n, G))
    return PGSEProtocol(np.concatenate(directions), np.concatenate(strengths), 12.9, 21.8, 57.0)


PROTOCOL = _protocol()
RADIUS, DENSITY = (a.ravel() for a in np.meshgrid(np.linspace(0.25, 2.23, 6), np.linspace(0.10, 0.76, 5),
                                                   indexing="ij"))
DICTIONARY = build_dictionary(PROTOCOL, radius=RADIUS, density=DENSITY, n_angles=46, progress=False)
N = DICTIONARY.n_atoms


def _atom_pairs(n, seed, protocol=PROTOCOL, dictionary=DICTIONARY):
    """Noise-free voxels made of two dictionary atoms at random orientations and fractions."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 2, 3))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    j1, j2 = rng.integers(0, N, n), rng.integers(0, N, n)
    nu = rng.uniform(0.2, 0.8, n)
    rows = np.arange(n)
    y = (nu[:, None] * dictionary.atoms(protocol, u[:, 0])[rows, :, j1]
         + (1 - nu[:, None]) * dictionary.atoms(protocol, u[:, 1])[rows, :, j2])
    truth = np.stack([nu, RADIUS[j1], DENSITY[j1], 1 - nu, RADIUS[j2], DENSITY[j2]], axis=1)
    return 300.0 * y, u, truth  # any signal scale: codes are computed on b0-normalised signals


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    y, u, truth = _atom_pairs(1200, 0)
    config = hybrid_train_config(max_epochs=150, batch_size=100, lr=3e-3, optimizer="adam", patience=150,
                                 device="cpu")
    net = HybridEstimator(DICTIONARY, PROTOCOL, branch_hidden=(32,), head_hidden=(32,), dropout=0.0,
                          config=config, seed=1)
    net.fit(y, u, Microstructure.from_array(truth))
    torch.set_num_threads(threads)
    return net


def test_low_rank_reduction_reproduces_the_rotated_dictionary():
    net = HybridEstimator(DICTIONARY, PROTOCOL, branch_hidden=(4,), head_hidden=(4,))
    coder = net._coder
    assert coder.reduced and 2 * coder.rank < len(PROTOCOL) // 2
    u = np.random.default_rng(2).standard_normal((5, 2, 3))
    full = coder.full(u)
    np.testing.assert_allclose(full[:, :, :N], DICTIONARY.atoms(PROTOCOL, u[:, 0]))
    np.testing.assert_allclose(coder.left(u) @ coder.right, full, rtol=0, atol=1e-12)


def test_codes_are_exact_nnls_on_the_full_dictionary():
    rng = np.random.default_rng(3)
    y, u, _ = _atom_pairs(40, 4)
    y = y / 300.0 + rng.normal(0, 0.02, y.shape)  # noisy: a non-trivial optimum
    net = HybridEstimator(DICTIONARY, PROTOCOL, branch_hidden=(4,), head_hidden=(4,))
    codes = net.sparse_codes(y, u)
    y = normalise_b0(y, PROTOCOL)
    D = net._coder.full(u)
    residual = y - np.einsum("vmn,vn->vm", D, codes)
    dual = np.einsum("vmn,vm->vn", D, residual)
    scale = np.linalg.norm(D, axis=1) * np.linalg.norm(y, axis=1)[:, None]
    assert (codes >= 0).all()
    assert (dual / scale).max() < 1e-11 and (np.abs(dual[codes > 0]) / scale[codes > 0]).max() < 1e-11
    reference = np.array([scipy.optimize.nnls(D[v], y[v])[1] for v in range(10)])
    np.testing.assert_allclose(np.linalg.norm(residual[:10], axis=1), reference, rtol=1e-9)
    # The same problems solved on the full (M × 2N) dictionaries reach the same optimum.
    net._coder.reduced = False
    full_codes = net.sparse_codes(y, u)
    np.testing.assert_allclose(np.linalg.norm(y - np.einsum("vmn,vn->vm", D, full_codes), axis=1),
                               np.linalg.norm(residual, axis=1), rtol=1e-9)


def test_noise_free_codes_reproduce_the_signal():
    y, u, _ = _atom_pairs(30, 5)
    net = HybridEstimator(DICTIONARY, PROTOCOL, branch_hidden=(4,), head_hidden=(4,))
    codes = net.sparse_codes(y, u)
    D = net._coder.full(u)
    # Exact to round-off in the objective ½‖Dw − y‖² (ε‖y‖² ≈ 1e-15): coherent atoms leave
    # residuals up to ~1e-8 that no dual value can distinguish from zero.
    np.testing.assert_allclose(np.einsum("vmn,vn->vm", D, codes), y / 300.0, atol=1e-7)
    # Every atom is 1 at b = 0 and so is the b0-normalised signal: the weights sum to 1.
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, atol=1e-7)
    assert ((codes > 0).sum(axis=1) <= 12).all()


def test_recovers_parameters_of_atom_signals(trained):
    y, u, truth = _atom_pairs(300, 6)
    estimate = trained.predict(y, u)
    mae = np.abs(estimate.as_array() - truth).mean(axis=0)
    assert mae[[0, 3]].max() < 0.03  # ν
    assert mae[[1, 4]].max() < 0.15  # r, µm, grid step 0.4
    assert mae[[2, 5]].max() < 0.03  # f, grid step 0.165
    np.testing.assert_allclose(estimate.nu.sum(axis=1), 1.0)


def test_save_load_round_trip(trained, tmp_path):
    y, u, _ = _atom_pairs(20, 7)
    path = trained.save(tmp_path / "hybrid.pt")
    loaded = HybridEstimator.load(path, protocol=PROTOCOL)
    np.testing.assert_array_equal(loaded.sparse_codes(y, u), trained.sparse_codes(y, u))
    np.testing.assert_allclose(loaded.predict(y, u).as_array(), trained.predict(y, u).as_array(), atol=1e-6)
    assert loaded.branch_hidden == (32,) and loaded.dictionary.n_atoms == N
    np.testing.assert_array_equal(loaded.dictionary.signals, DICTIONARY.signals)
    other = PROTOCOL.subset(np.flatnonzero(PROTOCOL.gradient_strength < 150))
    with pytest.raises(InputError, match="transfer"):
        HybridEstimator.load(path, protocol=other)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.pt"):
        HybridEstimator.load(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="no such file"):
        HybridEstimator.load(tmp_path / "missing.pt")


def test_transfer_to_a_shorter_protocol_keeps_predictions_sensible(trained):
    keep = np.flatnonzero(PROTOCOL.gradient_strength < 150)  # drop the strongest shell
    short = PROTOCOL.subset(keep)
    moved = trained.transfer(DICTIONARY.for_protocol(short), short)
    y, u, truth = _atom_pairs(300, 8)
    mae = np.abs(moved.predict(y[:, keep], u).as_array() - truth).mean(axis=0)
    chance = np.abs(truth - truth.mean(axis=0)).mean(axis=0)
    assert (mae[[0, 2, 3, 5]] < 0.3 * chance[[0, 2, 3, 5]]).all()  # ν and f
    assert (mae[[1, 4]] < 0.6 * chance[[1, 4]]).all()  # r, the least identifiable
    # The original estimator is untouched and refuses the other protocol's signals.
    with pytest.raises(InputError, match="signals"):
        trained.predict(y[:, keep], u)
    coarse = build_dictionary(PROTOCOL, radius=RADIUS[:10], density=DENSITY[:10], n_angles=46, progress=False)
    with pytest.raises(InputError, match="atom grid"):
        trained.transfer(coarse, PROTOCOL)
    with pytest.raises(InputError, match="protocol"):
        trained.transfer(DICTIONARY.for_protocol(short), PROTOCOL)


def test_activations_are_named_by_layer(trained):
    y, u, _ = _atom_pairs(7, 9)
    acts = trained.activations(y, u)
    assert list(acts) == ["branch1.0", "branch2.0", "head.0"]
    assert all(a.shape == (7, 32) and (a >= 0).all() for a in acts.values())


def test_default_architecture_matches_table_1():
    radius, density = default_grid()
    dictionary = build_dictionary(PROTOCOL, radius=radius, density=density, n_angles=19, progress=False)
    net = HybridEstimator(dictionary, PROTOCOL)
    model = net._build_model()
    assert net.n_parameters == sum(p.numel() for p in model.parameters())
    assert abs(net.n_parameters - 4.6e5) < 0.05 * 4.6e5
    assert abs(net.n_hidden_units - 1700) < 50
    assert net.ranges_[1].tolist() == [0.25, 2.23] and net.ranges_[0].tolist() == [0.0, 1.0]


def test_bad_input(trained):
    y, u, truth = _atom_pairs(5, 10)
    with pytest.raises(InputError, match="orientations"):
        trained.predict(y, u[:, 0])
    with pytest.raises(InputError, match="orientations"):
        trained.predict(y, np.zeros_like(u))
    with pytest.raises(InputError, match="signals"):
        trained.predict(y[:, :-1], u)
    with pytest.raises(InputError, match="signals"):
        trained.predict(np.where(y > 100, np.nan, y), u)
    untrained = HybridEstimator(DICTIONARY, PROTOCOL, branch_hidden=(4,), head_hidden=(4,))
    bad_truth = truth.copy()
    bad_truth[0, 1] = 3.0  # radius outside the dictionary's grid
    with pytest.raises(InputError, match="r1"):
        untrained.fit(y, u, bad_truth)
    with pytest.raises(RuntimeError, match="not fitted"):
        untrained.predict(y, u)
    with pytest.raises(InputError, match="dictionary"):
        HybridEstimator("dictionary.npz", PROTOCOL)
    with pytest.raises(InputError, match="dropout"):
        HybridEstimator(DICTIONARY, PROTOCOL, dropout=1.5)
