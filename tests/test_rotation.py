from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from dva.ops.rotation import (
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_rotvec,
    random_rotations,
    rotvec_to_matrix,
)


def _angles(n: int, rng) -> np.ndarray:
    e = rng.uniform(-180, 180, (n, 3))
    e[:, 1] = rng.uniform(0, 180, n)
    e[:4, 1] = [0, 180, 0, 1e-9]
    return e


def test_euler_matches_scipy_zyz_transposed():
    e = _angles(200, np.random.default_rng(0))
    ref = Rotation.from_euler("ZYZ", e, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(euler_to_matrix(*e.T), ref, atol=1e-12)


def test_euler_round_trip_including_gimbal_lock():
    a = euler_to_matrix(*_angles(200, np.random.default_rng(1)).T)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-9)


def test_rotvec_matches_scipy_transposed_and_round_trips():
    v = Rotation.random(300, random_state=2).as_rotvec()
    v[0] = 0
    v[1] = [np.pi, 0, 0]
    ref = Rotation.from_rotvec(v).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(rotvec_to_matrix(v), ref, atol=1e-12)
    a = rotvec_to_matrix(v)
    np.testing.assert_allclose(rotvec_to_matrix(matrix_to_rotvec(a)), a, atol=1e-9)


def test_design_spot_values():
    # ../shared/data/formats/README.md: relion31.star particle 1
    a = euler_to_matrix(np.array([-102.30296]), np.array([82.318041]), np.array([124.706463]))[0]
    ref = [[0.819418, -0.100807, 0.564262], [-0.532881, 0.228689, 0.814702], [-0.211169, -0.968266, 0.133674]]
    np.testing.assert_allclose(a, ref, atol=2e-6)
    np.testing.assert_allclose(matrix_to_rotvec(a[None])[0], [1.324683, -0.576118, 0.321016], atol=2e-6)
    # cryosparc_P12_J24_001_particles.cs row 0
    b = rotvec_to_matrix(np.array([[2.338663, -0.255956, -1.223678]]))
    rot, tilt, psi = matrix_to_euler(b)
    np.testing.assert_allclose([rot[0], tilt[0], psi[0]], [-157.808487, 118.790972, 34.683300], atol=1e-4)


def test_random_rotations_are_rotations_and_uniform():
    r = random_rotations(20000, np.random.default_rng(3))
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1, atol=1e-12)
    # Uniform on SO(3): each rotated axis is uniform on the sphere, so its mean is ~0 and cos has variance 1/3.
    z = r[:, :, 2]
    assert np.abs(z.mean(axis=0)).max() < 0.02
    np.testing.assert_allclose((z**2).mean(axis=0), 1 / 3, atol=0.01)
