"""HEALPix orientation grids, translation grids and local searches, against closed forms, brute force
and relion_refine's own sampling."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
from scipy.spatial import cKDTree

from bioinverse.cryoem.sampling import (
    angular_step,
    healpix_pixel_centres,
    local_orientations,
    nearest_orientation,
    orientation_grid,
    translation_grid,
    viewing_directions,
)
from bioinverse.errors import InputError


def euler_matrices(angles):
    """RELION's Euler_angles2matrix (the cryo-EM contract's formula), for test-side brute force."""
    a, b, g = (np.radians(np.asarray(angles, float)[:, i]) for i in range(3))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack(
        [
            np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            np.stack([sc, ss, cb], -1),
        ],
        -2,
    )


def rotation_angles(poses, grid):
    """Rotation angle (degrees) between every pose and every grid orientation: (m, n)."""
    trace = np.einsum("pij,gij->pg", euler_matrices(poses), euler_matrices(grid))
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def random_poses(rng, m):
    poses = np.column_stack(
        [rng.uniform(-180, 180, m), np.degrees(np.arccos(rng.uniform(-1, 1, m))), rng.uniform(-360, 720, m)]
    )
    poses[: m // 6, 1] = rng.uniform(0, 3, m // 6)  # near the north pole, where rot and psi couple
    poses[m // 6 : m // 3, 1] = rng.uniform(177, 180, m // 3 - m // 6)
    return poses


# ----------------------------------------------------------------------------------------------
# HEALPix
# ----------------------------------------------------------------------------------------------


def test_nside_1_centres_are_the_known_twelve():
    c = healpix_pixel_centres(0)
    z, phi = np.cos(c[:, 0]), np.degrees(c[:, 1])
    np.testing.assert_allclose(z, [2 / 3] * 4 + [0] * 4 + [-2 / 3] * 4, atol=1e-12)
    np.testing.assert_allclose(phi, [45, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315], atol=1e-12)


def test_nside_2_rings_match_gorski_closed_forms():
    c = healpix_pixel_centres(1)
    z = np.cos(c[:, 0])
    # Caps: z = 1 − i²/12 (i = 1); belt: z = 4/3 − i/3 (i = 2 … 6); south cap mirrors the north.
    expected = (
        [11 / 12] * 4 + [2 / 3] * 8 + [1 / 3] * 8 + [0] * 8 + [-1 / 3] * 8 + [-2 / 3] * 8 + [-11 / 12] * 4
    )
    np.testing.assert_allclose(z, expected, atol=1e-12)
    np.testing.assert_allclose(np.degrees(c[:4, 1]), np.arange(4) * 90.0 + 45.0)  # cap ring i = 1
    np.testing.assert_allclose(np.degrees(c[4:12, 1]), np.arange(8) * 45.0 + 22.5)  # belt ring i = 2
    np.testing.assert_allclose(np.degrees(c[12:20, 1]), np.arange(8) * 45.0)  # belt ring i = 3
    np.testing.assert_allclose(np.degrees(c[-4:, 1]), np.arange(4) * 90.0 + 45.0)  # south cap


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_healpix_counts_rings_and_equal_spacing(order):
    nside = 2**order
    c = healpix_pixel_centres(order)
    assert c.shape == (12 * nside**2, 2)
    theta, phi = c[:, 0], c[:, 1]
    assert (theta >= 0).all() and (theta <= math.pi).all() and (phi >= 0).all() and (phi < 2 * math.pi).all()
    z = np.round(np.cos(theta), 12)
    rings, counts = np.unique(z, return_counts=True)
    assert rings.size == 4 * nside - 1
    ring_sizes = np.minimum(np.arange(1, 4 * nside), 4 * nside - np.arange(1, 4 * nside))
    np.testing.assert_array_equal(counts[::-1], 4 * np.minimum(ring_sizes, nside))
    for ring in rings:  # equally spaced in phi within a ring
        p = np.sort(phi[z == ring])
        np.testing.assert_allclose(np.diff(p), 2 * math.pi / p.size, atol=1e-12)
    belt = rings[np.abs(rings) <= 2 / 3 + 1e-12]
    np.testing.assert_allclose(np.diff(belt), 2 / (3 * nside), atol=1e-12)  # equally spaced in z
    # Symmetric under z → −z, and each pixel is distinct.
    np.testing.assert_allclose(np.sort(z), np.sort(-z), atol=1e-12)
    assert np.unique(np.round(viewing_directions(np.degrees(c[:, ::-1])), 9), axis=0).shape[0] == c.shape[0]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_healpix_is_uniform_on_the_sphere(order):
    c = healpix_pixel_centres(order)
    n = c.shape[0]
    v = viewing_directions(np.degrees(c[:, ::-1]))
    assert np.abs(v.mean(axis=0)).max() < 1e-12
    np.testing.assert_allclose((v**2).mean(axis=0), 1 / 3, atol=2e-3)
    dist, _ = cKDTree(v).query(v, k=2)
    nearest = 2 * np.arcsin(dist[:, 1] / 2)
    assert nearest.mean() == pytest.approx(math.sqrt(4 * math.pi / n), rel=0.15)
    assert nearest.max() / nearest.min() < 1.6


@pytest.mark.parametrize("bad", [-1, 11, 2.0, True, "3"])
def test_bad_order_is_refused(bad):
    with pytest.raises(InputError, match="order"):
        healpix_pixel_centres(bad)


# ----------------------------------------------------------------------------------------------
# Orientation grid
# ----------------------------------------------------------------------------------------------


def test_angular_step_is_relions():
    assert [angular_step(o) for o in range(5)] == [60.0, 30.0, 15.0, 7.5, 3.75]


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_orientation_grid_layout(order):
    g = orientation_grid(order)
    n_dir, n_psi = 12 * 4**order, 6 * 2**order
    assert g.shape == (n_dir * n_psi, 3)
    blocks = g.reshape(n_dir, n_psi, 3)
    np.testing.assert_allclose(
        blocks[:, :, 2], np.broadcast_to(np.arange(n_psi) * angular_step(order), (n_dir, n_psi))
    )
    assert (blocks[:, :, :2] == blocks[:, :1, :2]).all()
    assert (g[:, 0] > -180).all() and (g[:, 0] <= 180).all()
    c = healpix_pixel_centres(order)
    np.testing.assert_allclose(
        viewing_directions(blocks[:, 0]), viewing_directions(np.degrees(c[:, ::-1])), atol=1e-12
    )


def test_viewing_direction_is_third_row_of_the_rotation_matrix():
    poses = random_poses(np.random.default_rng(3), 30)
    np.testing.assert_allclose(viewing_directions(poses), euler_matrices(poses)[:, 2, :], atol=1e-12)


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="RELION (relion_refine) not installed")
@pytest.mark.parametrize("order", [1, 2])
def test_directions_match_relion_refine_sampling(tmp_path, order):
    """relion_refine writes its (rot, tilt) directions to <out>_sampling.star; run one tiny iteration."""
    mrcfile = pytest.importorskip("mrcfile")
    n, apix = 16, 2.0
    rng = np.random.default_rng(0)
    with mrcfile.new(tmp_path / "ref.mrc") as mrc:
        mrc.set_data(rng.normal(size=(n, n, n)).astype(np.float32))
        mrc.voxel_size = apix
    with mrcfile.new(tmp_path / "parts.mrcs") as mrc:
        mrc.set_data(rng.normal(size=(3, n, n)).astype(np.float32))
        mrc.voxel_size = apix
    (tmp_path / "parts.star").write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnVoltage\n_rlnSphericalAberration\n"
        f"_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n_rlnImageDimensionality\n"
        f"1 og1 300 2.7 0.1 {apix} {n} 2\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
        + "".join(f"{i + 1}@parts.mrcs 1\n" for i in range(3))
    )
    (tmp_path / "out").mkdir()
    subprocess.run(
        ["relion_refine", "--i", "parts.star", "--ref", "ref.mrc", "--o", "out/run", "--iter", "1",
         "--healpix_order", str(order), "--offset_range", "0", "--offset_step", "1",
         "--particle_diameter", "28", "--ini_high", "10", "--firstiter_cc", "--K", "1", "--sym", "C1",
         "--j", "1", "--pad", "1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    text = (tmp_path / "out" / "run_it001_sampling.star").read_text()
    psi_step = float(next(line.split()[1] for line in text.splitlines() if line.startswith("_rlnPsiStep ")))
    assert psi_step == pytest.approx(angular_step(order))
    table = text.split("data_sampling_directions")[1].splitlines()
    relion = np.array([[float(x) for x in line.split()] for line in table if line.strip()[:1].isdigit()
                       or line.strip()[:1] == "-"])  # fmt: skip
    ours = orientation_grid(order)[:: 6 * 2**order, :2]
    assert relion.shape == ours.shape
    # Same set of directions (RELION orders them NEST, this module RING): match each to its nearest.
    dist, idx = cKDTree(viewing_directions(ours)).query(viewing_directions(relion))
    assert np.unique(idx).size == ours.shape[0] and dist.max() < 1e-6
    np.testing.assert_allclose(ours[idx], relion, atol=1e-5)  # same rot wrapping to (−180, 180]


# ----------------------------------------------------------------------------------------------
# Translation grid
# ----------------------------------------------------------------------------------------------


def test_translation_grid_is_relions_disc():
    t = translation_grid(2.0, 1.0)
    assert t.shape == (13, 2)
    assert ((t == 0).all(axis=1)).sum() == 1
    assert (np.hypot(t[:, 0], t[:, 1]) <= 2.0 + 1e-9).all()
    np.testing.assert_array_equal(t, np.array(sorted(map(tuple, t))))  # x outer, y inner
    np.testing.assert_allclose(np.sort(-t, axis=0), np.sort(t, axis=0))
    t = translation_grid(5.0, 1.5)
    x, y = np.meshgrid(np.arange(-4, 5) * 1.5, np.arange(-4, 5) * 1.5, indexing="ij")
    inside = x**2 + y**2 < 25.001
    assert len(t) == inside.sum() == 37
    # Lattice points exactly on the circle are kept (RELION's +0.001 tolerance).
    assert len(translation_grid(5.0, 5.0)) == 5
    np.testing.assert_array_equal(translation_grid(0.0, 1.0), [[0.0, 0.0]])
    np.testing.assert_array_equal(translation_grid(0.7, 1.0), [[0.0, 0.0]])


@pytest.mark.parametrize(
    "args, name", [((2.0, 0.0), "step"), ((-1.0, 1.0), "max_shift"), ((np.nan, 1.0), "max_shift")]
)
def test_translation_grid_refuses_bad_input(args, name):
    with pytest.raises(InputError, match=name):
        translation_grid(*args)


# ----------------------------------------------------------------------------------------------
# Nearest and local orientations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2])
def test_nearest_orientation_is_the_geodesic_nearest(order):
    rng = np.random.default_rng(order)
    poses = random_poses(rng, 120)
    grid = orientation_grid(order)
    angles = rotation_angles(poses, grid)
    got = nearest_orientation(order, poses)
    assert got.dtype == np.int64 and got.shape == (120,)
    np.testing.assert_allclose(angles[np.arange(120), got], angles.min(axis=1), atol=1e-7)


def test_nearest_orientation_of_grid_points_is_themselves():
    grid = orientation_grid(2)
    pick = np.random.default_rng(5).choice(len(grid), 50, replace=False)
    for mode in ("aligned", "prior"):
        np.testing.assert_array_equal(nearest_orientation(2, grid[pick], psi_mode=mode), pick)
    # Equivalent Euler angles of the same rotation (psi + 360, rot − 360) give the same answer.
    shifted = grid[pick] + np.array([-360.0, 0.0, 360.0])
    np.testing.assert_array_equal(nearest_orientation(2, shifted), pick)


def test_prior_mode_uses_nearest_direction_and_psi():
    poses = np.array([[12.0, 41.0, 100.0], [-170.0, 179.0, 3.0], [50.0, 90.0, 359.0]])
    grid = orientation_grid(2)
    got = grid[nearest_orientation(2, poses, psi_mode="prior")]
    dirs = grid[::24, :2]
    cos = viewing_directions(poses) @ viewing_directions(dirs).T
    np.testing.assert_allclose(got[:, :2], dirs[np.argmax(cos, axis=1)])
    np.testing.assert_allclose(got[:, 2], [105.0, 0.0, 0.0])


def brute_force_local(order, pose, max_angle, psi_mode, slack):
    """Indices with direction and psi within range, psi0 found by a dense 0.01° search (aligned)."""
    grid = orientation_grid(order)
    n_psi = 6 * 2**order
    dirs = grid[::n_psi, :2]
    d = viewing_directions(pose[None])[0]
    ang = np.degrees(np.arccos(np.clip(viewing_directions(dirs) @ d, -1, 1)))
    if psi_mode == "prior":
        psi0 = np.full(len(dirs), pose[2])
    else:
        trial = np.radians(np.arange(0.0, 360.0, 0.01))
        m = euler_matrices(np.column_stack([dirs, np.zeros(len(dirs))])) @ euler_matrices(pose[None])[0].T
        score = np.cos(trial)[None] * (m[:, 0, 0] + m[:, 1, 1])[:, None]
        score += np.sin(trial)[None] * (m[:, 1, 0] - m[:, 0, 1])[:, None]
        psi0 = np.degrees(trial[np.argmax(score, axis=1)])
    dpsi = np.abs(np.mod(grid[:, 2] - np.repeat(psi0, n_psi) + 180.0, 360.0) - 180.0)
    return np.flatnonzero((np.repeat(ang, n_psi) <= max_angle + 1e-9) & (dpsi <= max_angle + slack))


@pytest.mark.parametrize("psi_mode", ["aligned", "prior"])
@pytest.mark.parametrize("order, max_angle", [(1, 40.0), (2, 20.0), (2, 30.0)])
def test_local_orientations_match_brute_force(order, max_angle, psi_mode):
    poses = random_poses(np.random.default_rng(11), 18)
    got = local_orientations(order, poses, max_angle, psi_mode=psi_mode)
    assert len(got) == len(poses)
    for pose, idx in zip(poses, got):
        assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
        if psi_mode == "prior":
            np.testing.assert_array_equal(idx, brute_force_local(order, pose, max_angle, psi_mode, 1e-9))
        else:  # the dense search finds psi0 to ±0.005°
            assert set(brute_force_local(order, pose, max_angle, psi_mode, -0.02)) <= set(idx.tolist())
            assert set(idx.tolist()) <= set(brute_force_local(order, pose, max_angle, psi_mode, 0.02))


@pytest.mark.parametrize("order, max_angle", [(1, 35.0), (2, 16.0), (3, 9.0)])
def test_aligned_local_search_contains_every_orientation_within_the_angle(order, max_angle):
    poses = random_poses(np.random.default_rng(order), 24)
    got = local_orientations(order, poses, max_angle)
    angles = rotation_angles(poses, orientation_grid(order))
    nearest = nearest_orientation(order, poses)
    for p, idx in enumerate(got):
        assert set(np.flatnonzero(angles[p] <= max_angle)) <= set(idx.tolist())
        assert nearest[p] in idx
        # ... and nothing much farther: direction and psi each within max_angle.
        assert angles[p, idx].max() <= 2.0 * max_angle + 1e-6


def test_prior_mode_misses_in_plane_angles_near_the_pole():
    # RELION's psi window around the pose's psi ignores the rot–psi coupling at small tilt.
    pose = np.array([[100.0, 2.0, 40.0]])
    angles = rotation_angles(pose, orientation_grid(2))[0]
    close = set(np.flatnonzero(angles <= 15.0))
    assert close <= set(local_orientations(2, pose, 15.0)[0].tolist())
    assert not close <= set(local_orientations(2, pose, 15.0, psi_mode="prior")[0].tolist())


def test_local_orientations_never_empty_and_wide_searches_take_everything():
    poses = random_poses(np.random.default_rng(2), 10)
    tiny = local_orientations(3, poses, 0.5)
    assert all(len(idx) >= 1 for idx in tiny)
    np.testing.assert_array_equal(np.concatenate(tiny), nearest_orientation(3, poses))
    everything = local_orientations(1, poses[:2], 180.0)
    for idx in everything:
        np.testing.assert_array_equal(idx, np.arange(len(orientation_grid(1))))


def test_local_orientations_wrap_psi_around_zero():
    grid = orientation_grid(2)
    idx = local_orientations(2, [[0.0, 90.0, 359.0]], 15.0, psi_mode="prior")[0]
    assert set(np.unique(grid[idx, 2])) == {0.0, 345.0}
    idx = local_orientations(2, [[0.0, 90.0, 1.0]], 16.0, psi_mode="prior")[0]
    assert set(np.unique(grid[idx, 2])) == {0.0, 15.0, 345.0}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"angles": [[0.0, 0.0]], "max_angle": 5.0}, "angles"),
        ({"angles": [[0.0, np.nan, 0.0]], "max_angle": 5.0}, "angles"),
        ({"angles": [[0.0, 0.0, 0.0]], "max_angle": 0.0}, "max_angle"),
        ({"angles": [[0.0, 0.0, 0.0]], "max_angle": 5.0, "psi_mode": "relion"}, "psi_mode"),
    ],
)
def test_local_orientations_refuse_bad_input(kwargs, name):
    with pytest.raises(InputError, match=name):
        local_orientations(2, **kwargs)
