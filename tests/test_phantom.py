"""The blob phantom against independent references: interpolation, Monte Carlo, scipy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from dva.ops.rotation import euler_to_matrix, random_rotations
from dva.sim.phantom import (
    blob_state,
    make_phantom,
    project_blobs,
    render_volume,
    soft_mask,
    true_mean_and_components,
)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _rest(phantom):
    return blob_state(phantom, np.zeros(1), np.ones(1, dtype=bool))


@pytest.mark.parametrize("box", [32, 64, 128])
@pytest.mark.parametrize("pixel_size_A", [1.0, 6.0])
def test_make_phantom_fits_the_box(box, pixel_size_A):
    ph = make_phantom(box, pixel_size_A, np.random.default_rng(box))
    assert 12 <= np.sum(~ph.moving & ~ph.optional) <= 20
    assert 4 <= ph.moving.sum() <= 6
    assert 3 <= ph.optional.sum() <= 4
    assert not np.any(ph.moving & ph.optional)
    sigma_px = ph.sigma_A / pixel_size_A
    assert sigma_px.min() >= 1.5 and sigma_px.max() <= 3.0
    assert 25 <= np.rad2deg(ph.max_angle_rad) <= 35
    assert np.isclose(np.linalg.norm(ph.axis), 1.0)
    centres, _ = blob_state(ph, np.linspace(-1, 1, 11), np.ones(11, dtype=bool))
    assert np.linalg.norm(centres, axis=-1).max() <= 0.3 * box * pixel_size_A


def test_phantom_rejects_a_moving_optional_blob():
    ph = make_phantom(32, 2.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="both moving and optional"):
        dataclasses.replace(ph, optional=ph.optional | ph.moving)


def test_render_volume_matches_direct_sum_and_axis_order():
    box, px = 16, 2.0
    centres = np.array([[4.0, -6.0, 2.0], [-3.0, 1.0, -5.0], [0.5, 0.5, 7.0]])
    sigma, amp = np.array([3.0, 4.0, 3.5]), np.array([1.0, 0.5, 0.8])
    z, y, x = np.meshgrid(*(3 * [(np.arange(box) - box // 2) * px]), indexing="ij")
    ref = sum(
        a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s**2))
        for c, s, a in zip(centres, sigma, amp, strict=True)
    )
    np.testing.assert_allclose(render_volume(centres, sigma, amp, box, px), ref, atol=1e-12)
    one = render_volume(centres[:1], sigma[:1], amp[:1], box, px)
    assert np.unravel_index(np.argmax(one), one.shape) == (box // 2 + 1, box // 2 - 3, box // 2 + 2)


def test_projection_at_identity_is_the_volume_summed_along_z():
    ph = make_phantom(32, 3.0, np.random.default_rng(1))
    centres, amp = _rest(ph)
    img = project_blobs(centres, ph.sigma_A, amp, np.eye(3)[None], np.zeros((1, 2)), 32, 3.0)
    ref = render_volume(centres[0], ph.sigma_A, amp[0], 32, 3.0).sum(axis=0)
    assert img.dtype == np.float32 and img.shape == (1, 32, 32)
    np.testing.assert_allclose(img[0], ref, atol=1e-5 * ref.max())


def _interpolated_projection(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """`img(x, y) = Σ_z vol(a·(x, y, z))` by cubic interpolation of the voxels."""
    box = vol.shape[0]
    r = np.arange(box) - box // 2
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    p = a @ np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    idx = p[::-1] + box // 2  # (z, y, x) indices
    return ndimage.map_coordinates(vol, idx, order=3).reshape(vol.shape).sum(axis=0)


def test_projection_matches_interpolated_line_integral_with_a_transpose():
    box, px = 48, 2.0
    ph = make_phantom(box, px, np.random.default_rng(2))
    centres, amp = _rest(ph)
    vol = render_volume(centres[0], ph.sigma_A, amp[0], box, px)
    rots = euler_to_matrix(
        np.array([30.0, 120.0, -70.0]), np.array([60.0, 100.0, 140.0]), np.array([20.0, -45.0, 80.0])
    )
    n = len(rots)
    imgs = project_blobs(np.repeat(centres, n, 0), ph.sigma_A, np.repeat(amp, n, 0), rots, np.zeros((n, 2)), box, px)
    for a, img in zip(rots, imgs, strict=True):
        right, wrong = _interpolated_projection(vol, a.T), _interpolated_projection(vol, a)
        assert _corr(img, right) > 0.9999
        assert np.linalg.norm(img - right) < 1e-3 * np.linalg.norm(right)
        # A in place of Aᵀ: a different view of a smooth molecule, far from the right one.
        assert _corr(img, wrong) < 0.97
        assert np.linalg.norm(img - wrong) > 0.2 * np.linalg.norm(wrong)


def test_shift_moves_the_image_by_minus_t():
    box, px = 40, 3.0
    ph = make_phantom(box, px, np.random.default_rng(3))
    centres, amp = _rest(ph)
    a = random_rotations(1, np.random.default_rng(4))
    t = np.array([[3.0, -5.0]])
    centred = project_blobs(centres, ph.sigma_A, amp, a, np.zeros((1, 2)), box, px)[0]
    stored = project_blobs(centres, ph.sigma_A, amp, a, t, box, px)[0]
    expected = np.roll(centred, shift=(5, -3), axis=(0, 1))  # (y, x) by -t
    np.testing.assert_allclose(stored, expected, atol=1e-5 * centred.max())


def test_projection_batches_agree_with_single_particles():
    box, px, n = 24, 4.0, 300
    rng = np.random.default_rng(5)
    ph = make_phantom(box, px, rng)
    centres, amp = blob_state(ph, rng.uniform(-1, 1, n), rng.random(n) < 0.5)
    rots, shifts = random_rotations(n, rng), rng.normal(size=(n, 2))
    imgs = project_blobs(centres, ph.sigma_A, amp, rots, shifts, box, px)
    for i in (0, 257, 299):
        one = project_blobs(centres[i : i + 1], ph.sigma_A, amp[i : i + 1], rots[i : i + 1], shifts[i : i + 1], box, px)
        np.testing.assert_allclose(imgs[i], one[0], rtol=1e-6, atol=1e-6)


def test_blob_state_moves_the_domain_rigidly_and_drops_the_subunit():
    ph = make_phantom(64, 2.0, np.random.default_rng(6))
    centres, amp = blob_state(ph, np.array([0.0, 1.0, -0.4]), np.array([True, False, True]))
    np.testing.assert_allclose(centres[0], ph.centres_A, atol=1e-12)
    np.testing.assert_allclose(centres[:, ~ph.moving], np.repeat(ph.centres_A[None, ~ph.moving], 3, 0), atol=1e-12)
    moved = centres[:, ph.moving]
    dist = np.linalg.norm(moved[:, :, None] - moved[:, None], axis=-1)
    np.testing.assert_allclose(dist[1:], np.repeat(dist[:1], 2, 0), atol=1e-9)
    # Right-handed turn by max_angle_rad about the axis at latent 1.
    rel0, rel1 = moved[0] - ph.pivot_A, moved[1] - ph.pivot_A
    perp0 = rel0 - np.outer(rel0 @ ph.axis, ph.axis)
    perp1 = rel1 - np.outer(rel1 @ ph.axis, ph.axis)
    cos = np.sum(perp0 * perp1, 1) / np.linalg.norm(perp0, axis=1) / np.linalg.norm(perp1, axis=1)
    np.testing.assert_allclose(np.arccos(cos), ph.max_angle_rad, atol=1e-9)
    assert np.all(np.cross(perp0, perp1) @ ph.axis > 0)
    assert np.linalg.norm(moved[1] - moved[0], axis=1).min() > 2.0
    np.testing.assert_array_equal(amp[0], ph.amplitude)
    np.testing.assert_array_equal(amp[1], np.where(ph.optional, 0.0, ph.amplitude))


def test_true_components_are_orthonormal_and_sorted():
    ph = make_phantom(32, 4.0, np.random.default_rng(7))
    mean, comps, var, frac = true_mean_and_components(ph, 0.3, 5, 41)
    assert mean.shape == (32, 32, 32) and comps.shape == (5, 32, 32, 32)
    flat = comps.reshape(5, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(5), atol=1e-10)
    assert np.all(np.diff(var) <= 0) and np.all(np.diff(frac) <= 0)
    assert np.all(frac > 0) and frac.sum() <= 1 + 1e-12
    np.testing.assert_allclose(frac / var, frac[0] / var[0])
    assert np.all(flat[np.arange(5), np.argmax(np.abs(flat), axis=1)] > 0)


def test_true_components_match_monte_carlo():
    box, px, p, n = 24, 3.0, 0.5, 1500
    rng = np.random.default_rng(8)
    ph = make_phantom(box, px, rng)
    mean, comps, var, _ = true_mean_and_components(ph, p, 2, 41)
    centres, amp = blob_state(ph, rng.uniform(-1, 1, n), rng.random(n) < p)
    vols = np.stack([render_volume(c, ph.sigma_A, a, box, px).ravel() for c, a in zip(centres, amp, strict=True)])
    mc_mean = vols.mean(axis=0)
    vols -= mc_mean
    eigval, eigvec = np.linalg.eigh(vols @ vols.T)  # Gram matrix: fast SVD of a wide matrix
    top = eigvec[:, ::-1][:, :2].T @ vols
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    overlap = comps.reshape(2, -1) @ top.T
    assert np.sum(overlap**2) / 2 > 0.98
    assert _corr(mean, mc_mean) > 0.999
    np.testing.assert_allclose(eigval[::-1][:2] / n, var, rtol=0.15)


def test_soft_mask_covers_every_state():
    ph = make_phantom(48, 3.0, np.random.default_rng(9))
    mask = soft_mask(ph, 0.5)
    assert mask.dtype == np.float32 and mask.shape == (48, 48, 48)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask[0, 0, 0] == 0.0 and np.mean((mask > 0) & (mask < 1)) > 0
    rng = np.random.default_rng(10)
    centres, amp = blob_state(ph, rng.uniform(-1, 1, 40), np.ones(40, dtype=bool))
    for c, a in zip(centres, amp, strict=True):
        dens = render_volume(c, ph.sigma_A, a, 48, 3.0)
        assert np.all(mask[dens > 0.1 * ph.amplitude.min()] >= 0.99)
    without = soft_mask(ph, 0.0)
    assert np.all(without <= mask) and without.sum() < mask.sum()
