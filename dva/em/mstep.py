"""M-step: one K×K solve per Fourier voxel, then mask, filters and Gram–Schmidt (DESIGN.md §2)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.em.chunk import inside_band_3d
from dva.em.estep import pair_index
from dva.em.mean import shell_mean
from dva.ops.filters import butterworth_highpass, butterworth_lowpass, radius_3d, to_fourier, to_real
from dva.ops.slice import gridding_correction, symmetrize


def solve_components(stats: dict, box: int, modes: int, lam: float, xp: ModuleType = np) -> np.ndarray:
    """Components `(K, D, D, D)` (real space) from summed statistics: `v(ω) = (G(ω) + λ·s·I)⁻¹ b(ω)`,
    then the gridding correction.

    `s` is the mean of tr(G)/K over the voxel's shell, so λ is relative to the data's weight there.
    """
    k = modes
    full_g = symmetrize(stats["G"].T, box, 1.0, xp)  # (K(K+1)/2, D³)
    g = xp.zeros((box**3, k, k))
    for c, (a, b) in enumerate(pair_index(k)):
        g[:, a, b] = full_g[c]
        g[:, b, a] = full_g[c]
    re = symmetrize(stats["b"][:, 0::2].T, box, 1.0, xp)  # (K, D³)
    im = symmetrize(stats["b"][:, 1::2].T, box, -1.0, xp)
    rhs = xp.stack([re.T, im.T], -1)  # (D³, K, 2)
    inside = xp.flatnonzero(inside_band_3d(box, xp))
    scale = shell_mean(xp.trace(g, axis1=1, axis2=2) / k, box, xp)[inside]
    lhs = g[inside] + (lam * scale + 1e-30)[:, None, None] * xp.eye(k)
    sol = xp.linalg.solve(lhs, rhs[inside])  # (m, K, 2)
    spectrum = xp.zeros((k, box**3), dtype=xp.complex128)
    spectrum[:, inside] = (sol[..., 0] + 1j * sol[..., 1]).T
    correction = gridding_correction(box, xp)
    return xp.stack([to_real(s.reshape(box, box, box), xp) / correction for s in spectrum])


def band_filter(
    box: int,
    pixel_size_A: float,
    filter_res_A: float | None,
    order: float,
    highpass_res_A: float | None,
    highpass_order: float,
    xp: ModuleType = np,
):
    """Butterworth low-pass at `filter_res_A` and high-pass at `highpass_res_A` (each off when None),
    `(D, D, D)` centred."""
    k = radius_3d(box, xp) / pixel_size_A  # Å⁻¹
    filt = xp.ones_like(k)
    if filter_res_A:
        filt = butterworth_lowpass(k, 1.0 / filter_res_A, order)
    if highpass_res_A:
        filt = filt * butterworth_highpass(k, 1.0 / highpass_res_A, highpass_order)
    return filt


def gram_schmidt(volumes: np.ndarray, xp: ModuleType = np) -> np.ndarray:
    """Orthonormalise `(K, ...)` volumes in order (L2 over voxels)."""
    out = []
    for v in volumes:
        w = v.astype(xp.float64)
        for u in out:
            w = w - (u * w).sum() * u
        out.append(w / xp.sqrt((w * w).sum()))
    return xp.stack(out)


def regularize(components, mask, filt, *, orthonormalize: bool, xp: ModuleType = np):
    """Mask, filter and (optionally) Gram–Schmidt the components."""
    vols = xp.stack([to_real(to_fourier(v * mask, xp) * filt, xp) for v in components])
    return gram_schmidt(vols, xp) if orthonormalize else vols


def random_components(modes: int, mask, filt, rng: np.random.Generator, xp: ModuleType = np):
    """Seeded random start: masked, filtered, orthonormal noise volumes."""
    noise = xp.asarray(rng.standard_normal((modes, *mask.shape)))
    return regularize(noise, mask, filt, orthonormalize=True, xp=xp)
