"""Implicit representations of maps: geometry, band-limited targets, fitting, rendering, files."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from bioinverse.cryoem import implicit
from bioinverse.cryoem.implicit import (
    Architecture,
    FitSettings,
    ImplicitMap,
    band_limited_upsample,
    central_slice,
    fit_map,
    grid_coordinates,
    load_implicit,
)
from bioinverse.errors import InputError
from bioinverse.metrics import psnr


def test_docstring_examples_run():
    assert doctest.testmod(implicit, raise_on_error=False).failed == 0


def band_limited_image(n=32, seed=0, max_frequency=5):
    """A random real image whose spectrum is zero beyond ``max_frequency`` cycles per box."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    image = np.zeros((n, n))
    for _ in range(12):
        kx, ky = rng.integers(-max_frequency, max_frequency + 1, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        image += rng.normal() * np.cos(2 * np.pi * (kx * x + ky * y) / n + phase)
    return image


def test_band_limited_upsample_is_exact_for_band_limited_signals():
    n, factor = 16, 3
    coarse = band_limited_image(n, max_frequency=6)
    fine = band_limited_upsample(coarse, factor)
    assert fine.shape == (n * factor, n * factor)
    np.testing.assert_allclose(fine[::factor, ::factor], coarse, atol=1e-12)
    # The interpolant at the fine points is the same sum of sinusoids evaluated there.
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(n * factor) / factor, np.arange(n * factor) / factor, indexing="ij")
    expected = np.zeros_like(fine)
    for _ in range(12):
        kx, ky = rng.integers(-6, 7, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        expected += rng.normal() * np.cos(2 * np.pi * (kx * x + ky * y) / n + phase)
    np.testing.assert_allclose(fine, expected, atol=1e-10)


def test_band_limited_upsample_splits_the_nyquist_term_into_a_real_cosine():
    n = 8
    nyquist = np.cos(np.pi * np.arange(n))  # (-1)^i: all its power in the Nyquist coefficient
    fine = band_limited_upsample(nyquist, 2)
    np.testing.assert_allclose(fine, np.cos(np.pi * np.arange(2 * n) / 2), atol=1e-12)


def test_grid_coordinates_put_the_same_physical_points_at_the_same_coordinates():
    coarse = grid_coordinates(8, 3, extent=8 * 1.5 / 2, pixel_size=1.5).reshape(8, 8, 8, 3)
    fine = grid_coordinates(16, 3, extent=8 * 1.5 / 2, pixel_size=0.75).reshape(16, 16, 16, 3)
    np.testing.assert_allclose(fine[::2, ::2, ::2], coarse, atol=1e-7)
    assert coarse[4, 4, 4].tolist() == [0.0, 0.0, 0.0]  # voxel N // 2 is the centre
    assert coarse[0, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    # (x, y, z) order: the last array axis is x.
    assert coarse[0, 0, 1, 0] > coarse[0, 0, 0, 0] and coarse[0, 0, 1, 2] == coarse[0, 0, 0, 2]
    shifted = grid_coordinates(8, 3, extent=6.0, pixel_size=1.5, shift=(3.0, 0.0, -1.5)).reshape(8, 8, 8, 3)
    np.testing.assert_allclose(shifted[4, 4, 4], [0.5, 0.0, -0.25])
    with pytest.raises(InputError, match="shift"):
        grid_coordinates(8, 3, extent=6.0, pixel_size=1.5, shift=(1.0, 2.0))


def test_central_slice():
    volume = np.random.default_rng(0).normal(size=(6, 6, 6))
    np.testing.assert_array_equal(central_slice(volume, "y"), volume[:, 3, :])
    with pytest.raises(InputError, match="slice"):
        central_slice(volume, "w")


@pytest.mark.parametrize("kind", ["siren", "fourier"])
@pytest.mark.parametrize("dimensions", [2, 3])
def test_architecture_counts_its_parameters(kind, dimensions):
    arch = Architecture(kind=kind, hidden_features=24, hidden_layers=2, n_features=10)
    net = arch.build(dimensions)
    assert arch.n_parameters(dimensions) == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_architecture_is_seeded_and_rejects_bad_values():
    a, b = Architecture(seed=3).build(3), Architecture(seed=3).build(3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    for bad in ({"kind": "relu"}, {"hidden_features": 0}, {"hidden_layers": -1}, {"first_omega0": 0.0},
                {"kind": "fourier", "hidden_layers": 0}, {"scale": float("nan")}):
        with pytest.raises(InputError):
            Architecture(**bad)
    for bad in ({"steps": 0}, {"batch_size": 1.5}, {"lr": -1.0}, {"importance": 1.0},
                {"supersample": 0}, {"final_lr_fraction": 0.0}):
        with pytest.raises(InputError):
            FitSettings(**bad)


def test_siren_fits_a_band_limited_image_to_high_psnr_in_few_steps():
    image = band_limited_image(32, max_frequency=5)
    model = fit_map(image, 2.0, architecture=Architecture(hidden_features=64, hidden_layers=2),
                    settings=FitSettings(steps=300, batch_size=1024, lr=1e-3))
    assert model.record["steps"] == 300
    assert psnr(model.render(), image) > 40
    curve = model.evaluate(image)  # FRC, Å axis from the 2 Å pixels: shell s at s / (32 · 2) Å⁻¹
    assert curve.frequency[5] == pytest.approx(5 / 64) and curve.frequency[-1] == pytest.approx(1 / 4.0)
    assert curve.values[1:6].min() > 0.99


@pytest.fixture(scope="module")
def small_model() -> ImplicitMap:
    rng = np.random.default_rng(1)
    volume = band_limited_upsample(rng.normal(size=(6, 6, 6)), 2).astype(np.float32)
    return fit_map(volume, 1.5, origin=(10.0, -3.0, 4.5),
                   architecture=Architecture(hidden_features=16, hidden_layers=1),
                   settings=FitSettings(steps=20, batch_size=256))


def test_render_is_chunk_invariant(small_model):
    full = small_model.render(box=20, pixel_size=0.9, shift=(1.0, 0.5, -2.0))
    chunked = small_model.render(box=20, pixel_size=0.9, shift=(1.0, 0.5, -2.0), chunk=333)
    assert full.shape == (20, 20, 20) and full.dtype == np.float32
    np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-6 * np.abs(full).max())


def test_render_defaults_and_origin(small_model):
    assert small_model.render().shape == (12, 12, 12)
    assert small_model.render(pixel_size=0.75).shape == (24, 24, 24)  # same box edge in Å
    # The fitted grid's own origin comes back, and a 2x render starts at the same point: voxel 2i of
    # the fine grid is voxel i of the coarse one.
    assert small_model.render_origin(12, 1.5) == pytest.approx((10.0, -3.0, 4.5))
    assert small_model.render_origin(24, 0.75) == pytest.approx((10.0, -3.0, 4.5))
    assert small_model.render_origin(4, 1.5, shift=(3.0, 0.0, 0.0)) == pytest.approx((19.0, 3.0, 10.5))
    with pytest.raises(InputError, match="box"):
        small_model.render(box=0)
    with pytest.raises(InputError, match="pixel_size"):
        small_model.render(pixel_size=-1.0)


def test_save_load_round_trip_renders_identically(small_model, tmp_path):
    path = small_model.save(tmp_path / "model.pt")
    loaded = load_implicit(path)
    np.testing.assert_array_equal(loaded.render(box=10, pixel_size=1.2), small_model.render(box=10, pixel_size=1.2))
    assert loaded.origin == small_model.origin and loaded.architecture == small_model.architecture
    assert loaded.record["steps"] == small_model.record["steps"]
    assert loaded.compression_ratio == pytest.approx(12 ** 3 / small_model.n_parameters)


def test_load_rejects_files_that_are_not_models(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_implicit(empty)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something else"}, foreign)
    with pytest.raises(InputError, match="not an implicit-map model"):
        load_implicit(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(InputError, match="not a readable model file"):
        load_implicit(garbage)
    with pytest.raises(InputError, match="no such file"):
        load_implicit(tmp_path / "missing.pt")


def test_load_rejects_a_truncated_model(small_model, tmp_path):
    path = small_model.save(tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model"):
        load_implicit(path)


def test_fit_rejects_bad_maps():
    for bad, match in ((np.zeros((4, 4, 5)), "cubic"), (np.full((4, 4), np.nan), "NaN"),
                       (np.ones((4, 4, 4)), "constant"), (np.zeros(5), "2-D image or a 3-D map")):
        with pytest.raises(InputError, match=match):
            fit_map(bad, 1.0)
    with pytest.raises(InputError, match="pixel_size"):
        fit_map(np.random.default_rng(0).normal(size=(4, 4)), 0.0)


def test_importance_sampling_draws_the_requested_share_from_the_molecule():
    volume = np.zeros((16, 16, 16), dtype=np.float32)
    volume[6:10, 6:10, 6:10] = 1.0
    _coords, targets = implicit._training_set(volume, 1.0, FitSettings(importance=0.5))
    inside = implicit._molecule_mask(volume).sum()
    extra = targets.size - volume.size
    assert extra % inside == 0
    assert extra / targets.size == pytest.approx(0.5, abs=0.02)
    uniform_coords, _ = implicit._training_set(volume, 1.0, FitSettings())
    assert uniform_coords.shape == (16 ** 3, 3)


def test_evaluate_puts_the_fsc_on_an_angstrom_axis_at_the_reference_sampling(small_model):
    # The fitted map: 12 voxels of 1.5 Å. Against itself, shell s lies at s / (12 · 1.5) Å⁻¹ and the
    # last shell at Nyquist, 3 Å; against a 24³ reference of 0.75 Å, the render is made at 0.75 Å and
    # the last shell is 1.5 Å.
    same = small_model.evaluate(small_model.render())
    assert same.frequency[1] == pytest.approx(1 / 18.0) and 1 / same.frequency[-1] == pytest.approx(3.0)
    assert same.resolution(0.5) == pytest.approx(3.0)  # a map against itself: FSC 1 up to Nyquist
    fine = small_model.evaluate(small_model.render(pixel_size=0.75), pixel_size=0.75)
    assert len(fine) == 13 and 1 / fine.frequency[-1] == pytest.approx(1.5)
    with pytest.raises(InputError, match="2-D"):
        small_model.evaluate(np.zeros((12, 12)))
