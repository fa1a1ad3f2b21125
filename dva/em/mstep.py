"""M-step: one K×K solve per Fourier voxel, then mask, filters and Gram–Schmidt (DESIGN.md §2)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.em.chunk import band_rows, inside_band_half
from dva.em.estep import pair_index
from dva.em.mean import shell_mean
from dva.ops.filters import butterworth_highpass, butterworth_lowpass, filter_real, radius_3d, to_real
from dva.ops.slice import complete_plane, completed_rows, gridding_correction, half_rows


def solve_components(stats: dict, box: int, modes: int, lam: float, xp: ModuleType = np) -> np.ndarray:
    """Components `(K, D, D, D)` (real space) from summed statistics (`G`, `b` on the band's rows of
    the half spectra, `band_rows`):
    `v(ω) = (G(ω) + λ·s·I)⁻¹ b(ω)` in every voxel of the half inside the band (the other half is
    its conjugate), then the gridding correction.

    `s` is the mean of tr(G)/K over the voxel's shell, so λ is relative to the data's weight there.
    Only the voxels inside the band are copied out of the sums, channel-major, and solved in place:
    at box 256, K=10 this took 5.5 GB besides the sums (2.6 GB at the band's rows): 2.6 GB of
    systems and right-hand sides, 2.7 GB of components in float64 and their stack.
    """
    k = modes
    diagonal = [c for c, (a, b) in enumerate(pair_index(k)) if a == b]
    rows = band_rows(box, xp)
    inside = xp.flatnonzero(inside_band_half(box, xp)[rows])  # of the sums' rows
    trace = sum(stats["G"][:, c] for c in diagonal) / k
    scale = shell_mean(complete_plane(trace[None], rows, box, 1.0, xp)[0], rows, box, xp)[inside]
    systems = completed_rows(stats["G"], inside, rows, box, 1.0, xp)  # (K(K+1)/2, m)
    for c in diagonal:
        systems[c] += lam * scale + 1e-30
    rhs = xp.stack(
        [
            completed_rows(stats["b"][:, 0::2], inside, rows, box, 1.0, xp),
            completed_rows(stats["b"][:, 1::2], inside, rows, box, -1.0, xp),
        ],
        1,
    )  # (K, 2, m): re, im
    solution = solve_spd(systems, rhs, xp)
    correction = gridding_correction(box, xp)
    voxels = rows[inside]  # of the half spectra
    out = []
    for re, im in solution:
        spectrum = xp.zeros(half_rows(box), dtype=xp.complex128)
        spectrum[voxels] = re + 1j * im
        out.append(to_real(spectrum.reshape(box, box, box // 2), xp) / correction)
    return xp.stack(out)


def solve_spd(packed, rhs, xp: ModuleType = np):
    """`x = a⁻¹ rhs` for m symmetric positive definite K×K systems at once, in place: `packed
    (K(K+1)/2, m)` holds each a's entries a_ij (i ≤ j, in `pair_index` order) and is overwritten with
    its Cholesky factor, `rhs (K, r, m)` with x (returned). Vectorised over the last axis; pivots
    are floored at 1e-300 (an all-zero system gives x = 0)."""
    k = rhs.shape[0]
    at = {pair: c for c, pair in enumerate(pair_index(k))}

    def low(i: int, j: int):  # L_ij, i ≥ j: stored where a_ji was
        return packed[at[j, i]]

    product = xp.empty_like(packed[0])
    for j in range(k):
        pivot = low(j, j)
        for p in range(j):
            pivot -= xp.multiply(low(j, p), low(j, p), out=product)
        xp.sqrt(xp.maximum(pivot, 1e-300, out=pivot), out=pivot)
        for i in range(j + 1, k):
            entry = low(i, j)
            for p in range(j):
                entry -= xp.multiply(low(i, p), low(j, p), out=product)
            entry /= pivot
    for i in range(k):  # L y = rhs
        for p in range(i):
            rhs[i] -= low(i, p) * rhs[p]
        rhs[i] /= low(i, i)
    for i in reversed(range(k)):  # Lᵀ x = y
        for p in range(i + 1, k):
            rhs[i] -= low(p, i) * rhs[p]
        rhs[i] /= low(i, i)
    return rhs


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
    """Orthonormalise `(K, ...)` volumes in order (L2 over voxels), in float64: Q of their QR (R's
    diagonal positive). By CholeskyQR2: twice L⁻¹X, L the Cholesky factor of the K×K Gram matrix
    XXᵀ (a product over the voxels each; at box 256, K = 10 on one core 1.5 s against 11 s for
    Householder QR), orthonormal to ~1e-16 up to condition numbers ~1e7; by Householder QR where
    that is not orthonormal to 1e-10 (nearly dependent volumes; CuPy's Cholesky does not raise)."""
    flat = volumes.reshape(len(volumes), -1).astype(xp.float64, copy=False)
    q = flat
    try:
        for _ in range(2):
            q = xp.linalg.inv(xp.linalg.cholesky(q @ q.T)) @ q
    except np.linalg.LinAlgError:
        q = None
    if q is None or not bool(xp.all(xp.abs(q @ q.T - xp.eye(len(flat))) < 1e-10)):  # (NaN fails too)
        householder, r = xp.linalg.qr(flat.T)
        q = (householder * xp.where(xp.diag(r) < 0, -1.0, 1.0)).T
    return q.reshape(volumes.shape)


def regularize(components, mask, filt, *, orthonormalize: bool, xp: ModuleType = np):
    """Mask, filter and (optionally) Gram–Schmidt the components."""
    vols = xp.stack([filter_real(v * mask, filt, xp) for v in components])
    return gram_schmidt(vols, xp) if orthonormalize else vols


def random_components(modes: int, mask, filt, rng: np.random.Generator, xp: ModuleType = np):
    """Seeded random start: masked, filtered, orthonormal noise volumes."""
    noise = xp.asarray(rng.standard_normal((modes, *mask.shape)))
    return regularize(noise, mask, filt, orthonormalize=True, xp=xp)
