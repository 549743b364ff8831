"""Particle simulation: image formation, SNR, files RELION reads as they are."""

import shutil
import subprocess

import numpy as np
import pytest

from bioinverse.cryoem.ctf import ctf_image
from bioinverse.cryoem.io import read_map, read_particle_stack, read_stack
from bioinverse.cryoem.projection import FourierProjector, origin_to_shift
from bioinverse.cryoem.simulate import simulate_particles, write_simulation
from bioinverse.errors import InputError
from bioinverse.fourier import lowpass

BOX, APIX = 24, 2.5


def _volume():
    rng = np.random.default_rng(1)
    volume = np.zeros((BOX,) * 3, np.float32)
    for _ in range(6):
        z, y, x = rng.integers(7, 17, 3)
        volume[z - 1:z + 2, y - 2:y + 1, x - 1:x + 1] += rng.uniform(0.5, 1.5)
    return volume


def _clean_images(sim):
    """Noise-free images by a second route: real-space projection, then the CTF applied by FFT."""
    p = sim.particles
    shifts = origin_to_shift(p.origins, APIX)
    projections = FourierProjector(BOX).project(sim.ground_truth, p.angles, shifts)
    out = np.empty_like(projections)
    for i, image in enumerate(projections):
        contrast = ctf_image(BOX, APIX, p.defocus_u[i], p.defocus_v[i], p.defocus_angle[i], 300.0, 2.7, 0.1)
        spectrum = np.fft.rfft2(np.fft.ifftshift(image)) * contrast
        out[i] = np.fft.fftshift(np.fft.irfft2(spectrum, s=(BOX, BOX)))
    return out


@pytest.fixture(scope="module")
def sim():
    return simulate_particles(_volume(), APIX, n=300, snr=0.2, defocus=(0.8, 2.2), max_shift=2.0, seed=7)


def test_images_are_ctf_weighted_projections_plus_unit_white_noise(sim):
    clean = _clean_images(sim)
    noise = sim.images - clean
    assert noise.std() == pytest.approx(1.0, rel=0.02)
    assert abs(noise.mean()) < 0.01
    assert clean.var(axis=(1, 2)).mean() == pytest.approx(0.2, rel=0.01)  # the SNR asked for
    assert sim.snr == pytest.approx(0.2)
    defocus_um = sim.particles.defocus_u / 1e4
    assert defocus_um.min() >= 0.8 and defocus_um.max() <= 2.2
    assert np.abs(sim.shifts).max() <= 2.0


def test_written_files_read_back(sim, tmp_path):
    paths = write_simulation(sim, tmp_path)
    images, particles = read_particle_stack(paths["star"])
    np.testing.assert_array_equal(images, sim.images)
    np.testing.assert_allclose(particles.angles, sim.particles.angles, atol=1e-5)
    np.testing.assert_allclose(origin_to_shift(particles.origins, APIX), sim.shifts, atol=1e-5)
    truth, px = read_map(paths["ground_truth"])
    assert px == pytest.approx(APIX) and truth.shape == (BOX,) * 3
    reference, _ = read_map(paths["reference"])
    np.testing.assert_allclose(reference, lowpass(truth, APIX, 30.0), atol=1e-6 * np.abs(truth).max())


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="RELION is not installed")
def test_relion_reads_the_simulation_and_projects_it_identically(sim, tmp_path):
    paths = write_simulation(sim, tmp_path)
    subprocess.run(["relion_project", "--i", str(paths["ground_truth"]), "--ang", str(paths["star"]), "--ctf",
                    "--o", str(tmp_path / "relion")], check=True, capture_output=True, cwd=tmp_path)
    relion, _ = read_stack(tmp_path / "relion.mrcs")
    ours = _clean_images(sim)
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(relion, ours)]
    # Interpolation differs a little (RELION corrects gridding radially, we per axis) on these blocky maps.
    assert np.mean(correlation) > 0.995 and np.min(correlation) > 0.98


def test_bad_input_is_rejected():
    volume = _volume()
    with pytest.raises(InputError, match="volume"):
        simulate_particles(volume[:, :, :-1], APIX, 10, 0.1)
    with pytest.raises(InputError, match="volume"):
        simulate_particles(np.zeros_like(volume), APIX, 10, 0.1)
    with pytest.raises(InputError, match="snr"):
        simulate_particles(volume, APIX, 10, -1.0)
    with pytest.raises(InputError, match="defocus"):
        simulate_particles(volume, APIX, 10, 0.1, defocus=(2.0, 1.0))
    with pytest.raises(InputError, match="n"):
        simulate_particles(volume, APIX, 0, 0.1)
