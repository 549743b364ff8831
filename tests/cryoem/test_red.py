"""Learned priors: eq. 17 and its λ schedule, the denoiser, its training data, RED inside our refinement."""

import numpy as np
import pytest
import torch

from bioinverse.cli import main
from bioinverse.cryoem.denoiser import (
    CubeAugment,
    DenoiserArchitecture,
    MapDenoiser,
    coarsened_truth,
    cube_symmetry,
    load_denoiser,
    single_pass_ratio,
    train_denoiser,
)
from bioinverse.cryoem.denoiser_data import TEST_STRUCTURES
from bioinverse.cryoem.density import atoms_to_map
from bioinverse.cryoem.io import read_atoms
from bioinverse.cryoem.priors import (
    GAUSSIAN,
    Prior,
    cwred_weight,
    regularised_spectrum,
)
from bioinverse.cryoem.projection import FourierProjector
from bioinverse.cryoem.refine import (
    RefineConfig,
    _grid_shells,
    refine,
    soft_sphere_mask,
    unregularised_spectrum,
)
from bioinverse.cryoem.simulate import simulate_particles
from bioinverse.cryoem.structures import fetch_structure
from bioinverse.errors import InputError
from bioinverse.fourier import fsc, lowpass
from bioinverse.train import TrainConfig

BOX, APIX = 24, 3.0


def _random_denoiser(box: int = BOX, levels: int = 4, seed: int = 0) -> MapDenoiser:
    torch.manual_seed(seed)
    architecture = DenoiserArchitecture(levels=levels, base_channels=2)
    return MapDenoiser(architecture.build(), architecture, box, APIX)


class _Oracle:
    """A perfect denoiser: it returns the truth whatever it is given."""

    pixel_size = APIX

    def __init__(self, truth):
        self.truth = truth

    def __call__(self, volume):
        return self.truth


# --- eq. 17 and the λ schedule -------------------------------------------------------------------


def test_eq17_is_the_wiener_filter_at_zero_weight():
    rng = np.random.default_rng(1)
    b = torch.as_tensor(rng.normal(size=50) + 1j * rng.normal(size=50), dtype=torch.complex64)
    k = torch.as_tensor(rng.uniform(0.1, 5, 50), dtype=torch.float32)
    tau2 = torch.as_tensor(rng.uniform(0, 2, 50), dtype=torch.float32)
    tau2[:5] = 0.0
    d = torch.as_tensor(rng.normal(size=50) + 1j * rng.normal(size=50), dtype=torch.complex64)
    wiener = regularised_spectrum(b, k, tau2)
    torch.testing.assert_close(regularised_spectrum(b, k, tau2, d, 0.0), wiener)
    torch.testing.assert_close(wiener[5:], b[5:] / (k[5:] + 1 / tau2[5:]))  # eq. 11
    assert (wiener[:5] == 0).all()  # no signal: eq. 11 gives 0 …
    red = regularised_spectrum(b, k, tau2, d, 0.7)
    torch.testing.assert_close(red[:5], 0.7 * d[:5])  # … eq. 17 the denoiser's output
    torch.testing.assert_close(red[5:], (b[5:] + 0.7 * d[5:] / tau2[5:]) / (k[5:] + 1 / tau2[5:]))


def test_cwred_weight_follows_the_seeds_schedule():
    assert cwred_weight(25.0) == 0.0 and cwred_weight(10.0) == 0.0
    assert cwred_weight(4.5) == 1.0 and cwred_weight(3.0) == 1.0
    assert cwred_weight(7.25) == pytest.approx(0.5)
    assert cwred_weight(float("inf")) == 0.0
    assert cwred_weight(6.0, low=8.0, high=4.0) == pytest.approx(0.5)
    assert Prior("cwred", strength=0.5).weight(4.0) == 0.5
    assert Prior("red", strength=0.3).weight(50.0) == 0.3 and Prior().weight(3.0) == 0.0
    for bad in ({"kind": "tv"}, {"kind": "red", "strength": 1.5}, {"kind": "cwred", "low_resolution": 4.0}):
        with pytest.raises(InputError):
            Prior(**bad)


def test_the_unregularised_map_is_b_over_k_with_relions_floor():
    shells = torch.tensor([[[0, 0, 1, 1, 2]]])
    k = torch.tensor([[[4.0, 2.0, 1e-9, 3.0, 0.0]]])
    b = torch.tensor([[[8.0, 2.0, 1.0, 6.0, 5.0]]], dtype=torch.complex64)
    x = unregularised_spectrum(b, k, shells, n_shells=2)
    # shell 1's mean K is 1.5: its weak voxel is floored at 1.5e-3; voxel 4 lies beyond the shells: 0
    torch.testing.assert_close(x, torch.tensor([[[2.0, 1.0, 1.0 / 1.5e-3, 2.0, 0.0]]], dtype=torch.complex64))


# --- the denoiser -------------------------------------------------------------------------------


def test_the_denoiser_keeps_shape_and_grey_scale_and_is_deterministic(tmp_path):
    denoiser = _random_denoiser()
    x = np.random.default_rng(2).normal(size=(BOX,) * 3).astype(np.float32)
    y = denoiser(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(denoiser(x), y)  # eval mode: BatchNorm uses its running statistics
    # standardised in, de-standardised out: f(a x + c) = a f(x) + c
    np.testing.assert_allclose(denoiser(3.0 * x + 2.0), 3.0 * y + 2.0, rtol=1e-4, atol=1e-4)
    path = denoiser.save(tmp_path / "d.pt")
    again = load_denoiser(path)
    np.testing.assert_array_equal(again(x), y)
    assert again.digest() == denoiser.digest() != _random_denoiser(seed=1).digest()
    with pytest.raises(InputError, match="trained on 24³"):
        denoiser(np.zeros((16,) * 3, np.float32))
    with pytest.raises(InputError, match="trained at 3"):
        denoiser(x, pixel_size=1.5)


@pytest.mark.parametrize("content", [b"", b"not a model", None])
def test_load_denoiser_rejects_bad_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a truncated model
        _random_denoiser().save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match="bad.pt"):
        load_denoiser(path)
    with pytest.raises(InputError, match="no such file"):
        load_denoiser(tmp_path / "missing.pt")


def test_cube_symmetries_are_48_distinct_and_keep_the_centre():
    x = torch.as_tensor(np.random.default_rng(3).normal(size=(1, 8, 8, 8)), dtype=torch.float32)
    x[0, 4, 4, 4] = 100.0
    images = [cube_symmetry(x, i) for i in range(48)]
    assert len({tuple(im.flatten().tolist()) for im in images}) == 48
    assert all(float(im[0, 4, 4, 4]) == 100.0 for im in images)
    torch.testing.assert_close(cube_symmetry(x, 0), x)


def test_the_augmentation_crops_a_map_and_its_target_alike():
    x = torch.arange(4 * 8 ** 3, dtype=torch.float32).reshape(4, 1, 8, 8, 8)
    y = x + 0.5
    generator = torch.Generator().manual_seed(0)
    xa, ya = CubeAugment(crop=4)(x, y, generator)
    assert xa.shape == (4, 1, 4, 4, 4)
    torch.testing.assert_close(ya - xa, torch.full_like(xa, 0.5))  # the same symmetry and the same sub-box
    for a, whole in zip(xa, x):  # every crop is a sub-box of its own map's values
        assert set(a.flatten().tolist()) <= set(whole.flatten().tolist())
    assert len({tuple(a.flatten().tolist()) for a in xa}) == 4
    assert CubeAugment()(x, y, generator)[0].shape == x.shape


def test_train_denoiser_rejects_a_crop_the_network_cannot_take(blobs24):
    maps = np.stack([blobs24] * 4)
    with pytest.raises(InputError, match="crop"):
        train_denoiser(maps, maps, APIX, DenoiserArchitecture(levels=3), crop=10)


def test_coarsened_truth_keeps_what_the_estimate_knows(blobs24):
    truth = blobs24
    noise = np.random.default_rng(4).normal(size=truth.shape).astype(np.float32)
    coarse = coarsened_truth(truth, truth + 0.5 * noise * truth.std(), APIX)
    weights = np.clip(fsc(truth + 0.5 * noise * truth.std(), truth, APIX).values, 0, 1)
    ratio = np.abs(np.fft.rfftn(coarse)) / np.maximum(np.abs(np.fft.rfftn(truth)), 1e-12)
    assert ratio[0, 0, 0] == pytest.approx(weights[0], rel=1e-4)  # each shell scaled by its FSC
    assert ratio[0, 0, 5] == pytest.approx(weights[5], rel=1e-4)
    assert np.abs(coarsened_truth(truth, noise, APIX)).max() < 0.3 * np.abs(truth).max()  # knows nothing


@pytest.mark.parametrize("crop", [None, 16])
def test_a_trained_denoiser_brings_noisy_maps_closer_to_their_truth(blobs24, crop):
    rng = np.random.default_rng(5)
    truth = blobs24
    clean, noisy = [], []
    for i in range(48):
        shifted = np.roll(truth, tuple(rng.integers(-3, 4, 3)), axis=(0, 1, 2))
        clean.append(shifted)
        noisy.append(shifted + rng.normal(scale=truth.std(), size=truth.shape))
    noisy, clean = np.asarray(noisy, np.float32), np.asarray(clean, np.float32)
    config = TrainConfig(lr=3e-3, batch_size=8, max_epochs=20, early_stopping="none", val_fraction=0.1,
                         progress=False, device="cpu")
    denoiser, result = train_denoiser(noisy[:40], clean[:40], APIX, DenoiserArchitecture(levels=3, base_channels=4),
                                      config=config, groups=np.arange(40) // 8, crop=crop)
    assert result.epochs_run == 20 and denoiser.record["n_pairs"] == 40 and denoiser.record["crop"] == crop
    assert denoiser.record["n_validation"] == 8  # one whole group of the five held out
    before = np.linalg.norm(noisy[40:] - clean[40:])
    after = np.linalg.norm(np.stack([denoiser(x) for x in noisy[40:]]) - clean[40:])
    assert after < 0.65 * before  # trained on crops, it still denoises whole maps


# --- RED in our refinement ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_set(blobs24):
    return simulate_particles(blobs24, APIX, n=300, snr=0.3, defocus=(1.0, 2.5), max_shift=1.0,
                              reference_resolution=20.0, seed=6)


def _config(prior=GAUSSIAN, **changes):
    settings = {"particle_diameter": 66.0, "initial_resolution": 20.0, "healpix_order": 1, "max_healpix_order": 2,
                "offset_range": 2.0, "offset_step": 1.0, "max_iterations": 3, "prior": prior}
    settings.update(changes)
    return RefineConfig(**settings)


def test_red_at_zero_weight_is_the_gaussian_refinement(noisy_set):
    sim = noisy_set
    ctf = sim.particles.ctf_parameters()._asdict()
    gaussian = refine(sim.images, APIX, ctf, sim.reference, _config())
    red0 = refine(sim.images, APIX, ctf, sim.reference, _config(Prior("red", strength=0.0)),
                  denoiser=_random_denoiser())
    np.testing.assert_array_equal(red0.final_map, gaussian.final_map)
    assert [h["prior_weight"] for h in red0.history] == [0.0] * len(red0.history)


def test_red_with_a_perfect_denoiser_moves_the_map_to_the_truth(noisy_set):
    sim = noisy_set
    ctf = sim.particles.ctf_parameters()._asdict()
    mask = soft_sphere_mask(BOX, 11.0, 2.0)
    seen = []
    gaussian = refine(sim.images, APIX, ctf, sim.reference, _config(), observer=seen.append)
    red = refine(sim.images, APIX, ctf, sim.reference, _config(Prior("red")), denoiser=_Oracle(sim.ground_truth))

    def error(m):
        return np.linalg.norm((m - sim.ground_truth) * mask) / np.linalg.norm(sim.ground_truth * mask)

    assert error(red.final_map) < 0.8 * error(gaussian.final_map)
    assert [h["prior_weight"] for h in red.history] == [1.0] * len(red.history)
    # the observer saw each half's B / K every iteration, then the final one
    assert [(r.get("iteration"), r["half"]) for r in seen] == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2),
                                                               (None, 0)]
    assert seen[0]["map"].shape == (BOX,) * 3 and np.isfinite(seen[-1]["resolution_A"])


def test_the_denoiser_input_carries_the_data_without_the_prior(blobs24):
    """B / K from the projector's accumulators is the map itself when the data are noise-free."""
    projector = FourierProjector(BOX)
    truth = lowpass(blobs24, APIX, 8.0)
    spectrum = projector.reconstruction_spectrum(truth)
    k = torch.full(spectrum.shape, 3.0)
    shells = _grid_shells(projector.padded_box, projector.padding, BOX // 2 + 1)
    x = projector.reconstruct(unregularised_spectrum(spectrum * k, k, shells, BOX // 2 + 1))
    np.testing.assert_allclose(x, truth, atol=2e-3 * np.abs(truth).max())


def test_refine_rejects_a_denoiser_of_another_box(noisy_set):
    sim = noisy_set
    with pytest.raises(InputError, match="trained on 32³"):
        refine(sim.images, APIX, sim.particles.ctf_parameters()._asdict(), sim.reference, _config(Prior("red")),
               denoiser=_random_denoiser(box=32))


@pytest.mark.parametrize("option", [["--snrs", "0.5,x"], ["--structures", "0"], ["--crop", "40"],
                                    ["--noise", "white"]])
def test_train_denoiser_rejects_bad_options_before_any_work(tmp_path, option, capsys):
    with pytest.raises(SystemExit) as failed:
        main(["cryoem", "train-denoiser", "--out", str(tmp_path / "d.pt"), "--work", str(tmp_path / "w"),
              "--no-progress", *option])
    assert failed.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "w").exists()


def test_the_shipped_denoiser_brings_an_unseen_protein_closer_to_its_truth():
    denoiser = load_denoiser()  # the package's own file
    assert (denoiser.box, denoiser.pixel_size) == (64, 1.5)
    trained_on = set(denoiser.record["recipe"]["structures"])
    assert trained_on and not trained_on & set(TEST_STRUCTURES)
    truth = atoms_to_map(read_atoms(fetch_structure("adk_open")), 64, 1.5)  # a test structure: never seen
    # White noise as strong as the map: the protein's falling spectrum makes the high shells noise, as
    # in an intermediate map, which is what the denoiser learnt to take out (0.56 when it was shipped).
    noisy = truth + np.random.default_rng(7).normal(scale=truth.std(), size=truth.shape)
    assert single_pass_ratio(denoiser, noisy[None], truth[None])[0] < 0.7
