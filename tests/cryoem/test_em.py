"""The E/M kernels against a brute-force evaluation of eqs. 5, 8 and 9, pose by pose."""

import numpy as np
import pytest
import torch

from bioinverse.cryoem.ctf import ctf
from bioinverse.cryoem.em import Band, global_search, hermitian_sum, local_search
from bioinverse.cryoem.projection import FourierProjector, half_plane_pixels, shift_phases
from bioinverse.cryoem.rotations import euler_to_matrix, random_rotations

BOX = 16


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    volume = np.zeros((BOX,) * 3, np.float32)
    volume[5:10, 6:9, 4:11] = 1.0
    volume[9:12, 4:7, 8:10] = 2.0
    projector = FourierProjector(BOX)
    volume_ft = projector.transform(volume)
    pixels, _, weight = half_plane_pixels(BOX, 6.0)
    n = 5
    truth = torch.as_tensor(euler_to_matrix(*random_rotations(n, seed=1).T), dtype=torch.float32)
    contrast = torch.as_tensor(ctf(pixels / (BOX * 3.0), rng.uniform(8e3, 2e4, n), rng.uniform(8e3, 2e4, n),
                                   rng.uniform(0, 180, n), 300.0, 2.7, 0.1))
    pix = torch.as_tensor(pixels, dtype=torch.float32)
    clean = contrast * projector.A(volume_ft, truth, pix)
    noise = torch.complex(torch.as_tensor(rng.normal(size=clean.shape)), torch.as_tensor(rng.normal(size=clean.shape)))
    spectra = (clean + 2.0 * noise).to(torch.complex64)
    band = Band(box=BOX, pixels=pix, shells=torch.as_tensor(np.round(np.hypot(*pixels.T)).astype(np.int64)),
                weight=torch.as_tensor(weight, dtype=torch.float32), spectra=spectra, ctf=contrast,
                inv_sigma2=torch.full((len(pixels),), 0.25))
    rotations = torch.cat([truth, torch.as_tensor(euler_to_matrix(*random_rotations(15, seed=2).T),
                                                  dtype=torch.float32)])
    translations = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.5, 0.5]])
    previous = torch.as_tensor(rng.uniform(-1, 1, (n, 2)), dtype=torch.float32)
    return {"projector": projector, "volume_ft": volume_ft, "band": band, "rotations": rotations,
            "translations": translations, "previous": previous}


def brute_force(p, offset_sigma):
    """Posterior of every (particle, orientation, shift) from |y − c S P x|² directly, and eq. 9's B and K."""
    band, projector = p["band"], p["projector"]
    proj = projector.A(p["volume_ft"], p["rotations"], band.pixels).to(torch.complex128)
    w = band.weight.double() * band.inv_sigma2.double()
    n, n_t = len(band), p["translations"].shape[0]
    posterior = np.zeros((n, n_t, len(proj)))
    size = projector.padded_box
    numerator = torch.zeros((size,) * 3, dtype=torch.complex64)
    denominator = torch.zeros((size,) * 3)
    for i in range(n):
        y, c = band.spectra[i].to(torch.complex128), band.ctf[i].double()
        for k in range(n_t):
            s = p["previous"][i] + p["translations"][k]
            phase = shift_phases(band.pixels.double(), s.double(), BOX).to(torch.complex128)
            for j in range(len(proj)):
                residual = y - c * phase * proj[j]
                log_likelihood = -0.5 * float((w * residual.abs() ** 2).sum())
                posterior[i, k, j] = log_likelihood - float(p["translations"][k].square().sum()) / (
                    2 * offset_sigma**2)
        posterior[i] = np.exp(posterior[i] - posterior[i].max())
        posterior[i] /= posterior[i].sum()
        for k in range(n_t):
            s = p["previous"][i] + p["translations"][k]
            phase = shift_phases(band.pixels, s, BOX)
            image = (band.ctf[i] * band.insertion_factor * band.inv_sigma2 * phase.conj() * band.spectra[i])
            weights = torch.as_tensor(posterior[i, k], dtype=torch.float32)
            projector.A_adjoint(weights[:, None] * image[None], p["rotations"], band.pixels, out=numerator)
            projector.insert_weights(weights[:, None] * (band.ctf[i] ** 2 * band.insertion_factor *
                                                         band.inv_sigma2)[None], p["rotations"], band.pixels,
                                     out=denominator)
    return posterior, numerator, denominator


def test_global_search_is_the_posterior_of_eq_8_and_the_sums_of_eq_9(problem):
    posterior, numerator, denominator = brute_force(problem, offset_sigma=1.5)
    p = problem
    step = global_search(p["volume_ft"], p["projector"], p["band"], p["rotations"], p["translations"],
                         p["previous"], 1.5, n_shells=BOX // 2 + 1, adaptive_fraction=1.0)
    flat = posterior.reshape(len(posterior), -1)
    best = flat.argmax(1)
    n_orient = len(p["rotations"])
    np.testing.assert_array_equal(step.orientation, best % n_orient)
    np.testing.assert_allclose(step.shift, (p["previous"] + p["translations"][best // n_orient]).numpy(), atol=1e-6)
    np.testing.assert_allclose(step.max_probability, flat.max(1), rtol=1e-3, atol=1e-6)
    scale = numerator.abs().max()
    np.testing.assert_allclose(step.numerator.numpy(), numerator.numpy(), atol=1e-4 * float(scale))
    np.testing.assert_allclose(step.denominator.numpy(), denominator.numpy(), atol=1e-4 * float(denominator.max()))
    # The true orientations are in the grid (first five) and this noise leaves them the most probable.
    np.testing.assert_array_equal(step.orientation, np.arange(len(p["band"])))


def test_local_search_over_every_orientation_equals_the_global_search(problem):
    p = problem
    n, n_orient = len(p["band"]), len(p["rotations"])
    step_global = global_search(p["volume_ft"], p["projector"], p["band"], p["rotations"], p["translations"],
                                p["previous"], 1.5, n_shells=BOX // 2 + 1, adaptive_fraction=1.0)
    candidates = torch.arange(n_orient).repeat(n, 1)
    step_local = local_search(p["volume_ft"], p["projector"], p["band"], p["rotations"], candidates,
                              torch.ones_like(candidates, dtype=torch.bool), p["translations"], p["previous"], 1.5,
                              n_shells=BOX // 2 + 1, adaptive_fraction=1.0)
    np.testing.assert_array_equal(step_local.orientation, step_global.orientation)
    np.testing.assert_allclose(step_local.max_probability, step_global.max_probability, rtol=1e-4)
    scale = float(step_global.numerator.abs().max())
    np.testing.assert_allclose(step_local.numerator.numpy(), step_global.numerator.numpy(), atol=1e-4 * scale)
    np.testing.assert_allclose(step_local.noise_power, step_global.noise_power, rtol=1e-4)


def test_pruning_keeps_the_poses_holding_the_asked_fraction(problem):
    p = problem
    n, n_orient = len(p["band"]), len(p["rotations"])
    candidates = torch.arange(n_orient).repeat(n, 1)
    valid = torch.ones_like(candidates, dtype=torch.bool)
    valid[:, -3:] = False  # padding must never be chosen or counted
    full = local_search(p["volume_ft"], p["projector"], p["band"], p["rotations"], candidates, valid,
                        p["translations"], p["previous"], 1.5, BOX // 2 + 1, adaptive_fraction=1.0)
    pruned = local_search(p["volume_ft"], p["projector"], p["band"], p["rotations"], candidates, valid,
                          p["translations"], p["previous"], 1.5, BOX // 2 + 1, adaptive_fraction=0.5)
    assert (full.significant == (n_orient - 3) * len(p["translations"])).all()
    assert (pruned.significant >= 1).all() and (pruned.significant < full.significant).all()
    assert (full.orientation < n_orient - 3).all()
    # Pruning renormalises what is left: the best pose keeps the top probability or more.
    assert (pruned.max_probability >= full.max_probability - 1e-6).all()


def test_hermitian_sum_makes_the_grid_hermitian():
    g = torch.randn(6, 6, 6, dtype=torch.complex64)
    s = hermitian_sum(g)
    mirrored = torch.roll(torch.flip(s, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
    torch.testing.assert_close(mirrored, s.conj())
    real = torch.rand(6, 6, 6)
    torch.testing.assert_close(hermitian_sum(real)[3, 3, 3], 2 * real[3, 3, 3])


@pytest.mark.parametrize("fraction", [1.0, 0.999, 0.5])
def test_the_sparse_m_step_equals_the_dense_one(problem, monkeypatch, fraction):
    import bioinverse.cryoem.em as em

    p = problem
    args = (p["volume_ft"], p["projector"], p["band"], p["rotations"], p["translations"], p["previous"], 1.5,
            BOX // 2 + 1, fraction)
    monkeypatch.setattr(em, "SPARSE_BELOW", 0.0)
    dense = global_search(*args)
    monkeypatch.setattr(em, "SPARSE_BELOW", 1.1)
    sparse = global_search(*args)
    scale = float(dense.numerator.abs().max())
    np.testing.assert_allclose(sparse.numerator.numpy(), dense.numerator.numpy(), atol=1e-5 * scale)
    np.testing.assert_array_equal(sparse.significant, dense.significant)
    if fraction < 1.0:
        assert (dense.significant < len(p["rotations"]) * len(p["translations"])).all()
