import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bioinverse.cryoem.rotations import (
    angular_distance,
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
    viewing_direction,
)
from bioinverse.errors import InputError


def test_matrix_values_at_hand_computed_angles():
    # RELION's Euler_angles2matrix: A = Rz(psi) Ry(tilt) Rz(rot), Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]].
    np.testing.assert_allclose(euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(0, 0, 90), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(90, 90, 0), [[0, 0, -1], [-1, 0, 0], [0, 1, 0]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(0, 90, 90), [[0, 1, 0], [0, 0, 1], [1, 0, 0]], atol=1e-15)
    # A generic angle against the closed form of the contract, element by element.
    a, b, g = np.deg2rad([30.0, 40.0, 50.0])
    cc, cs, sc, ss = (
        np.cos(b) * np.cos(a),
        np.cos(b) * np.sin(a),
        np.sin(b) * np.cos(a),
        np.sin(b) * np.sin(a),
    )
    expected = [
        [
            np.cos(g) * cc - np.sin(g) * np.sin(a),
            np.cos(g) * cs + np.sin(g) * np.cos(a),
            -np.cos(g) * np.sin(b),
        ],
        [
            -np.sin(g) * cc - np.cos(g) * np.sin(a),
            -np.sin(g) * cs + np.cos(g) * np.cos(a),
            np.sin(g) * np.sin(b),
        ],
        [sc, ss, np.cos(b)],
    ]
    np.testing.assert_allclose(euler_to_matrix(30, 40, 50), expected, atol=1e-15)


def test_matrix_is_the_transpose_of_scipys_intrinsic_zyz():
    angles = random_rotations(50, seed=1)
    ours = euler_to_matrix(*angles.T)
    scipy_active = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(ours, np.swapaxes(scipy_active, -1, -2), atol=1e-13)
    np.testing.assert_allclose(
        ours @ np.swapaxes(ours, -1, -2), np.broadcast_to(np.eye(3), ours.shape), atol=1e-13
    )
    np.testing.assert_allclose(np.linalg.det(ours), 1.0, atol=1e-13)


def test_euler_round_trip():
    angles = random_rotations(2000, seed=2)
    matrices = euler_to_matrix(*angles.T)
    back = matrix_to_euler(matrices)
    np.testing.assert_allclose(euler_to_matrix(*back.T), matrices, atol=1e-12)
    # Away from gimbal lock the angles themselves come back (rot, psi in (-180, 180], tilt in [0, 180]).
    np.testing.assert_allclose(back, angles, atol=1e-9)
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()


def test_gimbal_lock_sets_rot_to_zero():
    locked = np.array([[30.0, 0.0, 20.0], [30.0, 180.0, 20.0], [-100.0, 0.0, 170.0], [12.0, 1e-5, 7.0]])
    back = matrix_to_euler(euler_to_matrix(*locked.T))
    np.testing.assert_allclose(back[:, 0], 0.0)
    np.testing.assert_allclose(back[:, 1], [0.0, 180.0, 0.0, 0.0])
    # tilt 0: only rot + psi is defined; tilt 180: only psi - rot.
    np.testing.assert_allclose(back[:, 2], [50.0, -10.0, 70.0, 19.0], atol=1e-9)
    np.testing.assert_allclose(euler_to_matrix(*back.T), euler_to_matrix(*locked.T), atol=1e-6)


def test_random_rotations_are_uniform():
    angles = random_rotations(40000, seed=3)
    assert angles.shape == (40000, 3)
    assert (angles[:, [0, 2]] >= -180).all() and (angles[:, [0, 2]] < 180).all()
    # Haar measure: E[A] = 0 (every element), and cos(tilt) uniform on [-1, 1].
    mean = euler_to_matrix(*angles.T).mean(axis=0)
    assert np.abs(mean).max() < 0.015  # 5 standard errors of sqrt(1/3 / 40000)
    counts, _ = np.histogram(np.cos(np.deg2rad(angles[:, 1])), bins=10, range=(-1, 1))
    assert np.abs(counts / 4000 - 1).max() < 0.08
    np.testing.assert_array_equal(random_rotations(5, seed=7), random_rotations(5, seed=7))


def test_angular_distance():
    rng = np.random.default_rng(4)
    axes = rng.standard_normal((6, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    theta = np.array([0.0, 1e-7, 5.0, 90.0, 179.9999999, 180.0])
    base = euler_to_matrix(*random_rotations(6, seed=5).T)
    turn = Rotation.from_rotvec(axes * np.deg2rad(theta)[:, None]).as_matrix()
    np.testing.assert_allclose(angular_distance(base, base @ turn), theta, atol=1e-9)
    np.testing.assert_allclose(angular_distance(base @ turn, base), theta, atol=1e-9)
    assert angular_distance(euler_to_matrix(10, 20, 30), euler_to_matrix(10, 20, 35)) == pytest.approx(5.0)
    # Equivalent descriptions of one rotation are at distance 0.
    assert angular_distance(euler_to_matrix(30, 0, 20), euler_to_matrix(0, 0, 50)) == pytest.approx(
        0, abs=1e-9
    )


def test_viewing_direction_is_third_row():
    angles = random_rotations(20, seed=6)
    directions = viewing_direction(angles)
    np.testing.assert_allclose(directions, euler_to_matrix(*angles.T)[:, 2, :], atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0)
    np.testing.assert_allclose(viewing_direction([0, 0, 0]), [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(viewing_direction([90, 90, 33]), [0, 1, 0], atol=1e-15)


def test_bad_input():
    with pytest.raises(InputError, match="tilt"):
        euler_to_matrix(0.0, np.nan, 0.0)
    with pytest.raises(InputError, match="A"):
        matrix_to_euler(np.eye(2))
    with pytest.raises(InputError, match="B"):
        angular_distance(np.eye(3), np.ones((3, 4)))
    with pytest.raises(InputError, match="angles"):
        viewing_direction([1.0, 2.0])
    with pytest.raises(InputError, match="n"):
        random_rotations(-1)
