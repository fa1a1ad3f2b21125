"""Finish (DESIGN.md §2): orthonormal components along the principal axes of the coordinates."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def principal_axes(components, z, noise_cov, xp: ModuleType = np):
    """Rotate `(K, D, D, D)` components and `(N, K)` coordinates to the principal axes.

    The volumes `Σ_k z_ik V_k` are unchanged. The axes are those of the coordinates' covariance
    less `noise_cov` (K×K, the mean E-step error covariance), so noise in z does not reorder
    them. Returns orthonormal components sorted by that variance (largest first), the
    coordinates, and the variances, as `xp` arrays. Sign rule: each component's largest-|value|
    voxel is positive.
    """
    k = components.shape[0]
    flat = components.reshape(k, -1).astype(xp.float64)
    q, r = xp.linalg.qr(flat.T)  # flat = rᵀ qᵀ
    zq = z.astype(xp.float64) @ r.T
    cov = zq.T @ zq / max(len(zq), 1) - r @ xp.asarray(noise_cov, dtype=xp.float64) @ r.T
    variances, vecs = xp.linalg.eigh(cov)
    order = xp.argsort(variances)[::-1]
    variances, vecs = variances[order], vecs[:, order]
    basis = vecs.T @ q.T  # (K, M)
    coords = zq @ vecs
    peak = xp.argmax(xp.abs(basis), axis=1)
    signs = xp.sign(basis[xp.arange(k), peak])
    basis, coords = basis * signs[:, None], coords * signs[None, :]
    return basis.reshape(components.shape), coords, variances


def subspace_angle_deg(old, new, xp: ModuleType = np) -> float:
    """Largest principal angle (degrees) between the spans of two `(K, ...)` sets of volumes.

    The cosines are the singular values of `L_a⁻¹ (A Bᵀ) L_b⁻ᵀ`, with `L` the Cholesky factors of
    the sets' Gram matrices (`QᵀQ` of their QR factors, from K×K products: no `(N, K)` QR)."""
    a = old.reshape(len(old), -1).astype(xp.float64)
    b = new.reshape(len(new), -1).astype(xp.float64)
    low_a, low_b = xp.linalg.cholesky(a @ a.T), xp.linalg.cholesky(b @ b.T)
    inner = xp.linalg.solve(low_a, xp.linalg.solve(low_b, (a @ b.T).T).T)
    cosines = xp.linalg.svd(inner, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(float(cosines.min()), -1.0, 1.0))))
