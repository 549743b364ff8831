import shutil
import subprocess

import numpy as np
import pytest
import torch

from bioinverse.cryoem.io import write_map
from bioinverse.cryoem.projection import FourierProjector, half_plane_pixels, origin_to_shift, shift_phases
from bioinverse.cryoem.rotations import euler_to_matrix, random_rotations
from bioinverse.errors import InputError

needs_relion = pytest.mark.skipif(
    shutil.which("relion_project") is None, reason="relion_project (RELION) not installed"
)


def gaussian_blobs(box, blobs):
    """Map [z, y, x] of 3-D Gaussians ((cx, cy, cz) px from the origin, sigma px, amplitude)."""
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    volume = np.zeros((box, box, box))
    for (cx, cy, cz), sigma, amp in blobs:
        volume += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return volume


def projected_blobs(box, blobs, rotations, shifts=None):
    """Line integrals of gaussian_blobs: p(u) = Σ amp σ√(2π) exp(-|u - (A c)_xy - s|² / 2σ²)."""
    y, x = np.mgrid[:box, :box] - box // 2
    shifts = np.zeros((len(rotations), 2)) if shifts is None else shifts
    images = np.zeros((len(rotations), box, box))
    for i, (rot, shift) in enumerate(zip(rotations, shifts)):
        for centre, sigma, amp in blobs:
            u = rot @ np.asarray(centre, float)
            r2 = (x - u[0] - shift[0]) ** 2 + (y - u[1] - shift[1]) ** 2
            images[i] += amp * sigma * np.sqrt(2 * np.pi) * np.exp(-r2 / (2 * sigma**2))
    return images


def relative_error(estimate, reference):
    return np.linalg.norm(estimate - reference) / np.linalg.norm(reference)


def random_complex(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def test_half_plane_pixels_layout_and_weights():
    box = 12
    pixels, flat_index, weight = half_plane_pixels(box)
    assert pixels.shape == (box * (box // 2 + 1), 2)
    rows, cols = np.unravel_index(flat_index, (box, box // 2 + 1))
    np.testing.assert_array_equal(pixels[:, 0], cols)
    np.testing.assert_array_equal(pixels[:, 1], np.fft.fftfreq(box, 1 / box)[rows])
    # Parseval through the weights: Σ_full |F|² = N² Σ |img|² = Σ_half w |F|².
    image = np.random.default_rng(0).standard_normal((box, box))
    F = np.fft.rfft2(np.fft.ifftshift(image)).ravel()[flat_index]
    assert np.sum(weight * np.abs(F) ** 2) == pytest.approx(box**2 * np.sum(image**2), rel=1e-12)
    small, small_index, _ = half_plane_pixels(box, max_radius=3.5)
    assert (np.hypot(*small.T) <= 3.5).all()
    assert len(small) == np.sum(np.hypot(*pixels.T) <= 3.5)
    np.testing.assert_array_equal(pixels[small_index], small)


def test_shift_phases_move_a_blob():
    box, sigma = 32, 2.0
    y, x = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    pixels, flat_index, _ = half_plane_pixels(box)
    F = np.fft.rfft2(np.fft.ifftshift(blob)).ravel()[flat_index]
    for shift in ([2.5, -1.25], [3.0, 4.0]):
        moved_F = np.zeros(box * (box // 2 + 1), complex)
        moved_F[flat_index] = F * shift_phases(pixels, shift, box)
        moved = np.fft.fftshift(np.fft.irfft2(moved_F.reshape(box, box // 2 + 1), s=(box, box)))
        expected = np.exp(-((x - shift[0]) ** 2 + (y - shift[1]) ** 2) / (2 * sigma**2))
        assert np.abs(moved - expected).max() < 1e-5
    # Integer shifts are exact rolls; torch input gives a torch tensor of the same values.
    np.testing.assert_allclose(moved, np.roll(blob, (4, 3), axis=(0, 1)), atol=1e-6)
    as_torch = shift_phases(torch.from_numpy(pixels), torch.tensor([[3.0, 4.0]]), box)
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.complex64
    np.testing.assert_allclose(as_torch.numpy()[0], shift_phases(pixels, [3.0, 4.0], box), atol=1e-7)


def test_A_and_A_adjoint_are_adjoint():
    rng = np.random.default_rng(1)
    proj = FourierProjector(12)
    P = proj.padded_box
    rotations = euler_to_matrix(*random_rotations(7, seed=2).T)
    # Non-integer pixels, some beyond the padded grid (those read 0 and receive nothing).
    pixels = rng.uniform(-9.0, 9.0, (60, 2))
    x = torch.from_numpy(random_complex(rng, (P, P, P))).to(torch.complex64)
    y = torch.from_numpy(random_complex(rng, (7, 60))).to(torch.complex64)
    Ax = proj.A(x, rotations, pixels)
    Ay = proj.A_adjoint(y, rotations, pixels)
    assert Ax.shape == (7, 60) and Ax.dtype == torch.complex64
    assert Ay.shape == (P, P, P) and Ay.dtype == torch.complex64
    lhs = np.vdot(Ax.numpy().astype(np.complex128), y.numpy().astype(np.complex128))
    rhs = np.vdot(x.numpy().astype(np.complex128), Ay.numpy().astype(np.complex128))
    assert abs(lhs - rhs) < 1e-5 * abs(lhs)
    outside = np.abs(pixels).max(axis=1) * proj.padding > P // 2
    assert outside.any() and (Ax.numpy()[:, outside] == 0).any()
    # The real scatter is the same operator, and `out=` accumulates in place.
    w = rng.uniform(0, 1, (7, 60))
    K = proj.insert_weights(w, rotations, pixels)
    np.testing.assert_allclose(
        K.numpy(), proj.A_adjoint(w.astype(np.complex64), rotations, pixels).real.numpy(), atol=1e-6
    )
    acc = proj.insert_weights(w, rotations, pixels, out=K.clone())
    np.testing.assert_allclose(acc.numpy(), 2 * K.numpy(), atol=1e-6)


def test_project_and_backproject_are_adjoint():
    rng = np.random.default_rng(3)
    for box, padding in ((16, 2), (10, 1)):
        proj = FourierProjector(box, padding)
        volume = rng.standard_normal((box, box, box))
        images = rng.standard_normal((9, box, box))
        angles = random_rotations(9, seed=4)
        shifts = rng.uniform(-3, 3, (9, 2))
        for s in (None, shifts):
            lhs = np.vdot(proj.project(volume, angles, shifts).astype(np.float64), images)
            rhs = np.vdot(volume, proj.backproject(images, angles, shifts).astype(np.float64))
            assert abs(lhs - rhs) < 1e-5 * np.abs(lhs)


def test_fourier_slice_projection_equals_line_integrals():
    # A particle less than half the box across (RELION recommends a box ≥ 2 × the particle). The
    # trilinear error grows as (particle size / padded box)²: 0.55 % here, 1 % at box 32.
    box = 40
    blobs = [((2.0, -3.0, 1.0), 2.0, 1.0), ((-3.0, 1.0, 2.5), 1.6, 0.8), ((0.5, 2.5, -3.0), 2.4, 1.2)]
    angles = random_rotations(6, seed=5)
    shifts = np.random.default_rng(6).uniform(-2, 2, (6, 2))
    volume = gaussian_blobs(box, blobs)
    reference = projected_blobs(box, blobs, euler_to_matrix(*angles.T), shifts)
    padded = FourierProjector(box, padding=2).project(volume, angles, shifts)
    assert padded.dtype == np.float32 and padded.shape == (6, box, box)
    assert relative_error(padded, reference) < 1e-2  # measured 0.55 %
    # Without padding trilinear interpolation is about 4 times worse (measured 2.3 %).
    assert relative_error(FourierProjector(box, padding=1).project(volume, angles, shifts), reference) > 1e-2


def test_projection_conventions_by_hand():
    box, c = 24, 12
    proj = FourierProjector(box)

    def peak(image):
        return tuple(int(i) for i in np.unravel_index(np.argmax(image), image.shape))  # (row y, col x)

    at_plus_x = gaussian_blobs(box, [((6, 0, 0), 1.5, 1.0)])
    at_plus_z = gaussian_blobs(box, [((0, 0, 5), 1.5, 1.0)])
    # image(u, v) = Σ_w map(Aᵀ (u, v, w)): a feature at r appears at (A r)_xy.
    assert peak(proj.project(at_plus_x, [[0, 0, 0]])[0]) == (c, c + 6)
    assert peak(proj.project(at_plus_x, [[90, 0, 0]])[0]) == (c - 6, c)  # rot 90: +x → −y
    assert peak(proj.project(at_plus_x, [[0, 0, 90]])[0]) == (c - 6, c)  # psi 90 at tilt 0: the same
    assert peak(proj.project(at_plus_x, [[0, 90, 0]])[0]) == (c, c)  # tilt 90: looking along +x
    assert peak(proj.project(at_plus_z, [[0, 90, 0]])[0]) == (c, c - 5)  # +z → −x
    # Shifts: image(x) → image(x − s); RELION's origins move the projection by −origin / pixel size.
    shift = origin_to_shift([[6.0, -4.0]], pixel_size=2.0)
    np.testing.assert_array_equal(shift, [[-3.0, 2.0]])
    assert peak(proj.project(at_plus_x, [[0, 0, 0]], shift)[0]) == (c + 2, c + 6 - 3)
    # Scale: line integrals in voxel units (a 3-D Gaussian of amplitude 1 projects to peak σ√(2π)).
    image = proj.project(gaussian_blobs(box, [((0, 0, 0), 1.5, 1.0)]), random_rotations(1, seed=8))[0]
    assert image.max() == pytest.approx(1.5 * np.sqrt(2 * np.pi), rel=2e-3)


def test_transform_layout_and_reconstruct():
    box = 16
    proj = FourierProjector(box)
    P = proj.padded_box
    volume = gaussian_blobs(box, [((2, -1, 0), 1.5, 1.0), ((-3, 2, 2), 2.0, 0.6)])
    ft = proj.transform(volume)
    # Index P/2 is frequency 0; padding · k on the padded grid is frequency k of the N-box, with the
    # gridding pre-correction 1/g applied in real space.
    g = np.sinc((np.arange(box) - box // 2) / P) ** 2
    corrected = volume / (g[:, None, None] * g[None, :, None] * g[None, None, :])
    direct = np.fft.fftn(np.fft.ifftshift(corrected))  # N-box transform, origin at N // 2
    for k in ((0, 0, 0), (1, 0, 0), (0, -3, 2), (5, 4, -6)):
        expected = direct[k[2] % box, k[1] % box, k[0] % box]
        got = ft[P // 2 + 2 * k[2], P // 2 + 2 * k[1], P // 2 + 2 * k[0]].item()
        assert abs(got - expected) < 1e-5 * np.abs(direct).max()
    # reconstruct undoes the FFT and applies the insertion correction 1/g once more.
    np.testing.assert_allclose(
        proj.reconstruct(ft) * (g[:, None, None] * g[None, :, None] * g[None, None, :]) ** 2,
        volume,
        atol=1e-5,
    )
    # Noise-free central slices inserted with the adjoint and normalised by the inserted weights,
    # B / K, give back the map (the gridding conventions of A, A_adjoint and reconstruct agree).
    pixels, _, _ = half_plane_pixels(box)
    rotations = euler_to_matrix(*random_rotations(1000, seed=9).T)
    slices = proj.A(ft, rotations, pixels)
    B = proj.A_adjoint(slices, rotations, pixels)
    K = proj.insert_weights(np.ones(slices.shape), rotations, pixels)
    estimate = proj.reconstruct(B / (K + 1e-3))
    assert np.corrcoef(estimate.ravel(), volume.ravel())[0, 1] > 0.998
    assert (estimate * volume).sum() / (volume**2).sum() == pytest.approx(1.0, abs=0.02)


def test_batched_projection_matches_single_images():
    box = 16
    proj = FourierProjector(box)
    volume = gaussian_blobs(box, [((2, -1, 0), 1.5, 1.0), ((-3, 2, 2), 2.0, 0.6)])
    angles = random_rotations(1000, seed=10)  # several chunks of rotations
    images = proj.project(volume, angles)
    for i in (0, 454, 455, 999):
        np.testing.assert_allclose(images[i], proj.project(volume, angles[i : i + 1])[0], atol=1e-6)
    # Matrices and Euler angles are interchangeable inputs.
    np.testing.assert_allclose(proj.project(volume, euler_to_matrix(*angles[:3].T)), images[:3], atol=1e-6)


def test_bad_input():
    with pytest.raises(InputError, match="box"):
        FourierProjector(15)
    with pytest.raises(InputError, match="padding"):
        FourierProjector(16, padding=0.5)
    proj = FourierProjector(8)
    with pytest.raises(InputError, match="volume"):
        proj.transform(np.zeros((8, 8, 7)))
    bad = np.zeros((8, 8, 8))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="volume"):
        proj.transform(bad)
    ft = proj.transform(np.zeros((8, 8, 8)))
    with pytest.raises(InputError, match="rotations"):
        proj.A(ft, np.eye(3), [[0.0, 0.0]])
    with pytest.raises(InputError, match="pixels"):
        proj.A(ft, np.eye(3)[None], [0.0, 0.0, 0.0])
    with pytest.raises(InputError, match="ft3d"):
        proj.A(ft[:-1], np.eye(3)[None], [[0.0, 0.0]])
    with pytest.raises(InputError, match="slices"):
        proj.A_adjoint(np.zeros((2, 1), np.complex64), np.eye(3)[None], [[0.0, 0.0]])
    with pytest.raises(InputError, match="angles_or_rotations"):
        proj.project(np.zeros((8, 8, 8)), [[0.0, 0.0]])
    with pytest.raises(InputError, match="shifts"):
        proj.project(np.zeros((8, 8, 8)), [[0.0, 0.0, 0.0]], shifts=[[0.0, 0.0, 0.0]])
    with pytest.raises(InputError, match="pixel_size"):
        origin_to_shift([[1.0, 1.0]], 0.0)


STAR_HEADER = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
1 opticsGroup1 {pixel_size} {box} 2 300.0 2.7 0.1


# version 30001

data_particles

loop_
_rlnAngleRot #1
_rlnAngleTilt #2
_rlnAnglePsi #3
_rlnOriginXAngst #4
_rlnOriginYAngst #5
_rlnOpticsGroup #6
"""


@needs_relion
def test_matches_relion_project(tmp_path):
    import mrcfile

    box, pixel_size = 40, 2.0
    blobs = [((6, 0, 0), 2.0, 1.0), ((0, -4, 0), 1.5, 0.7), ((0, 0, 5), 2.5, 0.5), ((-3, 5, -2), 1.8, 0.9)]
    volume = gaussian_blobs(box, blobs).astype(np.float32)
    write_map(tmp_path / "map.mrc", volume, pixel_size)
    angles = np.vstack(
        [[[0, 0, 0], [90, 0, 0], [0, 90, 0], [0, 0, 90], [30, 60, -20]], random_rotations(5, seed=11)]
    )
    origins = np.zeros((len(angles), 2))
    origins[5:] = np.random.default_rng(12).uniform(-8, 8, (5, 2))  # Å
    rows = "".join(" ".join(f"{v:.6f}" for v in (*a, *o)) + " 1\n" for a, o in zip(angles, origins))
    (tmp_path / "particles.star").write_text(STAR_HEADER.format(pixel_size=pixel_size, box=box) + rows)
    subprocess.run(
        ["relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "particles.star"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    with mrcfile.open(tmp_path / "proj.mrcs") as mrc:
        relion = mrc.data.astype(np.float64)
    ours = (
        FourierProjector(box).project(volume, angles, origin_to_shift(origins, pixel_size)).astype(np.float64)
    )
    for r, o in zip(relion, ours):
        assert np.corrcoef(r.ravel(), o.ravel())[0, 1] > 0.9999
        assert (r * o).sum() / (o * o).sum() == pytest.approx(1.0, abs=1e-3)  # no extra factor
        assert relative_error(o, r) < 1e-3  # measured 2e-5
    # The opposite origin sign does not match.
    flipped = FourierProjector(box).project(volume, angles[5:], -origin_to_shift(origins[5:], pixel_size))
    assert all(relative_error(o, r) > 0.1 for o, r in zip(flipped, relion[5:]))
