"""Rotation matrices in RELION's convention (DESIGN.md §1).

Matrices `A` left-multiply column vectors (x, y, z): a map point p lands at image position
`(A·p)_xy`, and the Fourier slice samples the volume's transform at `Aᵀ·(kx, ky, 0)`.
"""

from __future__ import annotations

import numpy as np


def _rz(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, s, z], -1), np.stack([-s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _ry(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, -s], -1), np.stack([z, o, z], -1), np.stack([s, z, c], -1)], -2)


def euler_to_matrix(rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """RELION angles (rot φ, tilt θ, psi ψ; degrees, ZYZ) to `(n, 3, 3)` matrices `Rz(ψ)Ry(θ)Rz(φ)`."""
    phi, theta, psi = (np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (rot_deg, tilt_deg, psi_deg))
    return _rz(psi) @ _ry(theta) @ _rz(phi)


def matrix_to_euler(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(n, 3, 3)` RELION matrices to (rot, tilt, psi) in degrees; tilt in [0, 180].

    At tilt 0 or 180 only rot ± psi is defined; psi is then set to 0.
    """
    a = np.asarray(a, dtype=np.float64)
    tilt = np.arccos(np.clip(a[..., 2, 2], -1.0, 1.0))
    sin_tilt = np.sin(tilt)
    regular = sin_tilt > 1e-6
    rot = np.where(regular, np.arctan2(a[..., 2, 1], a[..., 2, 0]), np.arctan2(-a[..., 1, 0], a[..., 1, 1]))
    psi = np.where(regular, np.arctan2(a[..., 1, 2], -a[..., 0, 2]), 0.0)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """CryoSPARC `alignments3D/pose` axis-angle vectors `(n, 3)` (radians) to RELION `A = R(v)ᵀ`."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)
    safe = np.where(theta > 0, theta, 1.0)
    k = v / safe[..., None]
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    z = np.zeros_like(kx)
    kmat = np.stack([np.stack([z, -kz, ky], -1), np.stack([kz, z, -kx], -1), np.stack([-ky, kx, z], -1)], -2)
    s, c = np.sin(theta)[..., None, None], (1 - np.cos(theta))[..., None, None]
    r = np.eye(3) + s * kmat + c * (kmat @ kmat)
    return np.swapaxes(r, -1, -2)


def matrix_to_rotvec(a: np.ndarray) -> np.ndarray:
    """RELION matrices `(n, 3, 3)` to CryoSPARC axis-angle poses `(n, 3)` (radians), `R = Aᵀ`."""
    r = np.swapaxes(np.asarray(a, dtype=np.float64), -1, -2)
    # Through the unit quaternion: stable for every angle in [0, π].
    tr = np.trace(r, axis1=-2, axis2=-1)
    q = np.stack(
        [
            1 + tr,
            1 + 2 * r[..., 0, 0] - tr,
            1 + 2 * r[..., 1, 1] - tr,
            1 + 2 * r[..., 2, 2] - tr,
        ],
        -1,
    )
    best = np.argmax(q, axis=-1)
    w = np.empty((*r.shape[:-2], 4))
    for i in range(4):
        sel = best == i
        rs = r[sel]
        d = np.sqrt(q[sel, i]) / 2  # the largest quaternion component, > 0.5
        comp = {
            0: [
                d,
                (rs[:, 2, 1] - rs[:, 1, 2]) / (4 * d),
                (rs[:, 0, 2] - rs[:, 2, 0]) / (4 * d),
                (rs[:, 1, 0] - rs[:, 0, 1]) / (4 * d),
            ],
            1: [
                (rs[:, 2, 1] - rs[:, 1, 2]) / (4 * d),
                d,
                (rs[:, 0, 1] + rs[:, 1, 0]) / (4 * d),
                (rs[:, 0, 2] + rs[:, 2, 0]) / (4 * d),
            ],
            2: [
                (rs[:, 0, 2] - rs[:, 2, 0]) / (4 * d),
                (rs[:, 0, 1] + rs[:, 1, 0]) / (4 * d),
                d,
                (rs[:, 1, 2] + rs[:, 2, 1]) / (4 * d),
            ],
            3: [
                (rs[:, 1, 0] - rs[:, 0, 1]) / (4 * d),
                (rs[:, 0, 2] + rs[:, 2, 0]) / (4 * d),
                (rs[:, 1, 2] + rs[:, 2, 1]) / (4 * d),
                d,
            ],
        }[i]
        w[sel] = np.stack(comp, -1)
    w *= np.where(w[..., :1] < 0, -1.0, 1.0)  # scalar part ≥ 0: angle in [0, π]
    vec = w[..., 1:]
    norm = np.linalg.norm(vec, axis=-1)
    angle = 2 * np.arctan2(norm, w[..., 0])
    scale = np.where(norm > 1e-12, angle / np.where(norm > 1e-12, norm, 1.0), 2.0)
    return vec * scale[..., None]


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """`(n, 3, 3)` rotation matrices uniform on SO(3) (from uniform unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
