"""RELION 3.1's CTF: hand-computed values, an independent formulation, and relion_project itself."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
from scipy import constants

from bioinverse.cryoem.ctf import ctf, ctf_image, electron_wavelength, half_plane_frequencies
from bioinverse.errors import InputError

TYPICAL = {
    "defocus_u": 15000.0,
    "defocus_v": 11000.0,
    "defocus_angle": 30.0,
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast": 0.1,
}


def relion_ctf_getdeltaf(kx, ky, u, v, angle, kv, cs, q, bfac=0.0, phase=0.0, scale=1.0):
    """RELION's pre-3.1 formulation (CTF::getDeltaF with atan2, K3 = atan(Q/sqrt(1-Q^2))), in plain
    scalar Python: an independent route to the same numbers."""
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k1 = math.pi / 2 * 2 * lam
    k2 = math.pi / 2 * cs * 1e7 * lam**3
    k3 = math.atan(q / math.sqrt(1 - q * q))
    k4 = -bfac / 4.0
    k5 = math.radians(phase)
    u2 = kx * kx + ky * ky
    if abs(kx) < 1e-6 and abs(ky) < 1e-6:
        deltaf = 0.0
    else:
        ellipsoid_ang = math.atan2(ky, kx) - math.radians(angle)
        deltaf = -(u + v) / 2 + -(u - v) / 2 * math.cos(2 * ellipsoid_ang)
    argument = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -math.sin(argument) * math.exp(k4 * u2) * scale


# ----------------------------------------------------------------------------------------------
# Wavelength
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", [80.0, 120.0, 200.0, 300.0])
def test_wavelength_matches_relativistic_de_broglie(kv):
    e, m, c, h = constants.e, constants.m_e, constants.c, constants.h
    volts = kv * 1e3
    expected = h / math.sqrt(2 * m * e * volts * (1 + e * volts / (2 * m * c * c))) * 1e10
    assert electron_wavelength(kv) == pytest.approx(
        expected, rel=1e-5
    )  # RELION's constants are an older CODATA set


def test_wavelength_known_values_and_arrays():
    assert electron_wavelength(300) == pytest.approx(0.0196876, abs=1e-7)
    assert electron_wavelength(200) == pytest.approx(0.0250795, abs=1e-7)
    lam = electron_wavelength([200.0, 300.0])
    assert lam.shape == (2,) and lam[0] > lam[1]
    with pytest.raises(InputError, match="voltage_kv"):
        electron_wavelength(0.0)


# ----------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------


def test_isotropic_value_computed_by_hand():
    # 300 kV, Cs 2.7 mm, Q 0.1, defocus 20000 Å, k = 0.1 1/Å along x:
    lam = 12.2643247 / math.sqrt(300e3 * (1 + 300e3 * 0.978466e-6))
    gamma = math.pi * lam * (-20000.0) * 0.01 + math.pi / 2 * 2.7e7 * lam**3 * 1e-4 - math.asin(0.1)
    expected = -math.sin(gamma)
    got = ctf([[0.1, 0.0], [0.0, 0.1], [0.0707106781, 0.0707106781]], 20000, 20000, 0, 300, 2.7, 0.1)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    assert got[0, 0] == pytest.approx(-0.12812, abs=1e-5)


def test_zero_frequency_is_amplitude_contrast_and_phase_shift():
    zero = np.zeros((1, 2))
    assert ctf(zero, **TYPICAL)[0, 0] == pytest.approx(0.1, abs=1e-7)
    # A 90° phase plate turns sin(asin Q) into sin(asin Q + π/2) = sqrt(1 − Q²).
    assert ctf(zero, **TYPICAL, phase_shift=90.0)[0, 0] == pytest.approx(math.sqrt(0.99), abs=1e-6)
    # Q = 1: K3 = π/2 without a division by zero (RELION's atan(+inf)).
    params = {**TYPICAL, "amplitude_contrast": 1.0}
    assert ctf(zero, **params)[0, 0] == pytest.approx(1.0)
    assert ctf(zero, **TYPICAL, scale=0.5)[0, 0] == pytest.approx(0.05, abs=1e-7)


def test_first_zero_of_a_pure_defocus_ctf():
    # Cs = 0, Q = 0: CTF = sin(π λ Δf u²), first zero at u² = 1/(λ Δf).
    defocus = 10000.0
    lam = electron_wavelength(300)
    u0 = 1.0 / math.sqrt(lam * defocus)
    k = np.array([[u0 * 0.99, 0.0], [u0, 0.0], [u0 * 1.01, 0.0]])
    c = ctf(k, defocus, defocus, 0.0, 300.0, 0.0, 0.0)[0]
    assert c[0] > 0.01 and c[2] < -0.01
    # RELION never returns |CTF| < 1e-8 (keeps the sign, sgn(0) = +1).
    assert abs(c[1]) == pytest.approx(1e-8, rel=1e-3)


def test_astigmatism_axes_follow_the_defocus_angle():
    angle = 30.0
    r = 0.08
    a = math.radians(angle)
    k = np.array([[r * math.cos(a), r * math.sin(a)], [-r * math.sin(a), r * math.cos(a)]])
    got = ctf(k, **TYPICAL)[0]
    iso_u = ctf(k, 15000, 15000, 0, 300, 2.7, 0.1)[0]
    iso_v = ctf(k, 11000, 11000, 0, 300, 2.7, 0.1)[0]
    assert got[0] == pytest.approx(iso_u[0], abs=1e-6)  # along the U axis: defocus U
    assert got[1] == pytest.approx(iso_v[1], abs=1e-6)  # perpendicular: defocus V
    assert abs(got[0] - got[1]) > 0.1


def test_bfactor_damps_by_exp_minus_b_u2_over_4():
    k = np.array([[0.05, 0.0], [0.1, 0.2], [0.3, -0.1]])
    plain = ctf(k, **TYPICAL).astype(np.float64)
    damped = ctf(k, **TYPICAL, bfactor=80.0).astype(np.float64)
    u2 = (k**2).sum(axis=1)
    np.testing.assert_allclose(damped[0], plain[0] * np.exp(-80.0 * u2 / 4), rtol=1e-5)


def test_agrees_with_relion_getdeltaf_formulation():
    rng = np.random.default_rng(7)
    k = rng.uniform(-0.3, 0.3, size=(400, 2))
    n = 5
    params = {
        "defocus_u": rng.uniform(5000, 30000, n),
        "defocus_v": rng.uniform(5000, 30000, n),
        "defocus_angle": rng.uniform(-180, 180, n),
        "voltage": np.array([300.0, 200.0, 300.0, 120.0, 300.0]),
        "spherical_aberration": rng.uniform(0, 3, n),
        "amplitude_contrast": np.array([0.07, 0.1, 0.0, 0.2, 0.999]),
        "bfactor": np.array([0.0, 40.0, -20.0, 100.0, 0.0]),
        "phase_shift": np.array([0.0, 0.0, 90.0, 30.0, -45.0]),
        "scale": np.array([1.0, 0.8, 1.0, 1.2, 1.0]),
    }
    got = ctf(k, **params)
    assert got.shape == (n, 400) and got.dtype == np.float32
    for p in range(n):
        args = [params[name][p] for name in params]
        expected = [relion_ctf_getdeltaf(kx, ky, *args) for kx, ky in k]
        np.testing.assert_allclose(got[p], expected, atol=2e-6)


def test_broadcasting_scalars_and_per_particle_arrays():
    k = np.random.default_rng(0).uniform(-0.2, 0.2, (50, 2))
    u = np.array([9000.0, 12000.0, 25000.0])
    batch = ctf(k, u, u - 500, 10.0, 300.0, 2.7, 0.07)
    for p in range(3):
        np.testing.assert_array_equal(batch[p], ctf(k, u[p], u[p] - 500, 10.0, 300.0, 2.7, 0.07)[0])


@pytest.mark.parametrize(
    "change, name",
    [
        ({"amplitude_contrast": 1.2}, "amplitude_contrast"),
        ({"amplitude_contrast": -0.1}, "amplitude_contrast"),
        ({"voltage": 0.0}, "voltage"),
        ({"defocus_u": np.nan}, "defocus_u"),
        ({"defocus_u": [1e4, 2e4], "defocus_v": [1e4, 2e4, 3e4]}, "different lengths"),
        ({"defocus_angle": np.zeros((2, 2))}, "defocus_angle"),
        (
            {"defocus_u": 0.0, "defocus_v": 0.0, "amplitude_contrast": 0.0, "spherical_aberration": 0.0},
            "all zero",
        ),
    ],
)
def test_bad_parameters_are_refused(change, name):
    with pytest.raises(InputError, match=name):
        ctf(np.zeros((3, 2)), **{**TYPICAL, **change})


def test_bad_frequencies_are_refused():
    with pytest.raises(InputError, match="frequencies"):
        ctf(np.zeros((3, 3)), **TYPICAL)
    with pytest.raises(InputError, match="frequencies"):
        ctf(np.array([[0.1, np.inf]]), **TYPICAL)


# ----------------------------------------------------------------------------------------------
# Half-plane images
# ----------------------------------------------------------------------------------------------


def test_half_plane_frequencies_follow_numpy_rfft2_layout():
    n, apix = 8, 1.25
    f = half_plane_frequencies(n, apix)
    assert f.shape == (n, n // 2 + 1, 2)
    np.testing.assert_allclose(f[:, 0, 1], np.fft.fftfreq(n, apix))
    np.testing.assert_allclose(f[0, :, 0], np.fft.rfftfreq(n, apix))
    assert f[n // 2, 0, 1] == pytest.approx(-0.5 / apix)  # NumPy's Nyquist row is negative
    with pytest.raises(InputError, match="box"):
        half_plane_frequencies(7, 1.0)


def test_ctf_image_is_the_half_of_a_centrosymmetric_full_plane():
    n, apix = 32, 1.5
    img = ctf_image(n, apix, **TYPICAL, bfactor=20.0)
    assert img.shape == (n, n // 2 + 1) and img.dtype == np.float32
    ky, kx = np.meshgrid(np.fft.fftfreq(n, apix), np.fft.fftfreq(n, apix), indexing="ij")
    full = ctf(np.column_stack([kx.ravel(), ky.ravel()]), **TYPICAL, bfactor=20.0)[0].reshape(n, n)
    np.testing.assert_array_equal(img[:, : n // 2], full[:, : n // 2])
    # The half-plane's last column is kx = +N/2, the full plane's column N/2 is kx = −N/2.
    rows = np.delete(np.arange(n), n // 2)  # (N/2, ±N/2) are different corners
    np.testing.assert_allclose(img[rows, n // 2], full[(-rows) % n, n // 2], atol=1e-6)
    # CTF(k) = CTF(−k): the filtered image of a real image stays real.
    # (Away from the Nyquist row and column, where −k aliases onto another sample.)
    inner = np.ix_(rows, rows)
    mirrored = full[(-rows) % n][:, (-rows) % n]
    np.testing.assert_allclose(full[inner], mirrored, atol=1e-6)
    image = np.random.default_rng(1).normal(size=(n, n))
    spectrum = np.zeros((n, n), complex)
    spectrum[inner] = np.fft.fft2(image)[inner] * full[inner]
    assert np.abs(np.fft.ifft2(spectrum).imag).max() < 1e-9 * np.abs(image).max() * n


def test_ctf_image_refuses_arrays():
    with pytest.raises(InputError, match="defocus_u"):
        ctf_image(16, 1.0, [1e4, 2e4], 1e4, 0, 300, 2.7, 0.1)


# ----------------------------------------------------------------------------------------------
# RELION itself
# ----------------------------------------------------------------------------------------------

RELION_PARTICLES = [
    # defocus_u, defocus_v, defocus_angle, bfactor, phase_shift, scale
    (15000.0, 11000.0, 30.0, 0.0, 0.0, 1.0),
    (20000.0, 20000.0, 0.0, 50.0, 30.0, 1.0),
    (8000.0, 12000.0, -65.0, 0.0, 0.0, 0.7),
    (30000.0, 26000.0, 120.0, -30.0, 0.0, 1.0),
]


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="RELION (relion_project) not installed")
def test_matches_relion_project(tmp_path):
    """A point at the box centre has a flat Fourier transform, so the FT of RELION's CTF-multiplied
    projection divided by that of the plain projection is RELION's CTF on the half-plane."""
    mrcfile = pytest.importorskip("mrcfile")
    n, apix, kv, cs, q = 32, 1.5, 300.0, 2.7, 0.1
    volume = np.zeros((n, n, n), np.float32)
    volume[n // 2, n // 2, n // 2] = 1.0
    with mrcfile.new(tmp_path / "point.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = apix
    rows = "\n".join(
        f"0 0 0 0 0 {u} {v} {a} {b} {ph} {s} 1 {i + 1}@x.mrcs"
        for i, (u, v, a, b, ph, s) in enumerate(RELION_PARTICLES)
    )
    (tmp_path / "particles.star").write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n_rlnImageDimensionality\n"
        f"1 opticsGroup1 {kv} {cs} {q} {apix} {n} 2\n\n"
        "data_particles\nloop_\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginXAngst\n"
        "_rlnOriginYAngst\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnCtfBfactor\n_rlnPhaseShift\n"
        f"_rlnCtfScalefactor\n_rlnOpticsGroup\n_rlnImageName\n{rows}\n"
    )
    for name, extra in (("with_ctf", ["--ctf"]), ("plain", [])):
        subprocess.run(
            ["relion_project", "--i", "point.mrc", "--o", name, "--ang", "particles.star",
             "--angpix", str(apix), *extra],
            cwd=tmp_path, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def spectra(name):
        with mrcfile.open(tmp_path / f"{name}.mrcs") as mrc:
            stack = mrc.data.astype(np.float64)
        return np.fft.rfft2(np.fft.ifftshift(stack, axes=(-2, -1))).real

    with_ctf, plain = spectra("with_ctf"), spectra("plain")
    # RELION's projector keeps |k| < N/2 and zeroes the Nyquist row; compare where it is flat.
    flat = np.abs(plain[0] - 1.0) < 1e-5
    assert flat.sum() > 300
    for p, (u, v, a, b, ph, s) in enumerate(RELION_PARTICLES):
        ours = ctf_image(n, apix, u, v, a, kv, cs, q, bfactor=b, phase_shift=ph, scale=s)
        np.testing.assert_allclose(with_ctf[p][flat], ours[flat], atol=2e-6)
    # A mirrored astigmatism angle does not match: the angle's sign convention is tested.
    mirrored = ctf_image(n, apix, 15000.0, 11000.0, -30.0, kv, cs, q)
    assert np.abs(with_ctf[0][flat] - mirrored[flat]).max() > 0.5
