"""Central slices of 3D Fourier volumes: trilinear gather (extraction) and its exact adjoint (insertion).

Volumes are in the centred Fourier layout `fftshift(fftn(ifftshift(vol)))` with DC at index
D//2, indexed `[z, y, x]`. A 2D frequency `(kx, ky)` in cycles/pixel of an image with pose A samples
the volume at `Aᵀ·(kx, ky, 0)` (DESIGN.md §1), i.e. at voxel coordinates `D·Aᵀk + D//2`.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def slice_coordinates(rotations, kx, ky, box: int, xp: ModuleType = np):
    """Voxel coordinates `(n, P, 3)` as (x, y, z) of the 2D frequencies `(P,)` for poses `(n, 3, 3)`."""
    k3 = kx[None, :, None] * rotations[:, None, 0, :] + ky[None, :, None] * rotations[:, None, 1, :]
    return k3 * box + box // 2


def trilinear_stencil(coords, box: int, xp: ModuleType = np):
    """Flat voxel indices `(m, 8)` and weights `(m, 8)` of the 8 neighbours of coordinates `(..., 3)`.

    Coordinates must lie inside `[0, box − 1]` on every axis (the band limit ensures it); the upper
    edge is nudged inside so the 8 neighbours exist.
    """
    c = xp.minimum(coords.reshape(-1, 3), box - 1 - 1e-6)
    base = xp.floor(c)
    f = (c - base).astype(xp.float32)
    i = base.astype(xp.int32)  # voxel indices up to D³ (< 2³¹ for any box used)
    idx, wts = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx.append(((i[:, 2] + dz) * box + (i[:, 1] + dy)) * box + (i[:, 0] + dx))
                wx = f[:, 0] if dx else 1 - f[:, 0]
                wy = f[:, 1] if dy else 1 - f[:, 1]
                wz = f[:, 2] if dz else 1 - f[:, 2]
                wts.append(wx * wy * wz)
    return xp.stack(idx, -1), xp.stack(wts, -1)


def gridding_correction(box: int, xp: ModuleType = np):
    """Real-space apodisation `(D, D, D)` of trilinear interpolation on a D-point Fourier grid.

    Sampling a centred spectrum with the trilinear (tent) kernel equals transforming the volume
    times `sinc²(x/D)·sinc²(y/D)·sinc²(z/D)` (x in voxels from the centre; aliases neglected), and
    inserting then normalising leaves the same factor on the reconstruction. So divide a volume by
    this before slicing it, and a reconstruction by it after (RELION's gridding correction).
    It is floored at sinc²(½) ≈ 0.405, its value where the inscribed sphere meets an axis, so the
    box corners (never molecule) gain at most 2.5× rather than 15×.
    """
    u = xp.sinc((xp.arange(box) - box // 2) / box) ** 2
    return xp.maximum(u[:, None, None] * u[None, :, None] * u[None, None, :], float(np.sinc(0.5) ** 2))


def gather(volumes, index, weights, xp: ModuleType = np):
    """Trilinear samples `(m, C)` of flattened volumes `(D³, C)` at a stencil `(m, 8)` (real or
    complex volumes; the result has their dtype)."""
    if xp is np:  # complex volumes as their real and imaginary parts side by side
        real = np.ascontiguousarray(volumes).view(volumes.real.dtype)
        return np.ascontiguousarray(_stencil_matrix(index, weights, len(volumes), real.dtype) @ real).view(
            volumes.dtype
        )
    out = volumes.take(index[:, 0], axis=0) * weights[:, 0, None]
    for j in range(1, 8):
        out += volumes.take(index[:, j], axis=0) * weights[:, j, None]
    return out


def insert(values, index, weights, out, xp: ModuleType = np):
    """Adjoint of `gather` for real channels: add values `(m, C)` into volumes `out (C, D³)` (float64).

    `out` is a local accumulator and is modified in place; it is also returned.
    """
    if xp is np:
        out += (_stencil_matrix(index, weights, out.shape[1], values.dtype).T @ values).T
        return out
    import cupyx

    flat = index.reshape(-1)
    for c in range(values.shape[1]):
        column = xp.zeros(out.shape[1], dtype=xp.float64)
        cupyx.scatter_add(column, flat, (weights * values[:, c, None]).reshape(-1).astype(xp.float64))
        out[c] += column
    return out


def _stencil_matrix(index, weights, size: int, dtype):
    """The SciPy CSR matrix `(m, size)` whose row i holds `weights[i]` at columns `index[i]`: a
    stencil `(m, 8)` as one sparse operator, so that a gather (`A @ volumes`) or an insertion
    (`A.T @ values`) passes over the stencil once for every channel (NumPy workers)."""
    import scipy.sparse

    m, width = index.shape
    indptr = np.arange(0, m * width + 1, width, dtype=index.dtype)
    return scipy.sparse.csr_matrix((weights.astype(dtype).ravel(), index.ravel(), indptr), shape=(m, size))


def mirror(volumes, xp: ModuleType = np):
    """`out[..., i] = volumes[..., D − i]` on the last three axes of centred `(..., D, D, D)` grids: the voxel at −k."""
    axes = (-3, -2, -1)
    return xp.roll(xp.flip(volumes, axis=axes), 1, axis=axes)


def symmetrize(channels, box: int, sign: float, xp: ModuleType = np):
    """Complete half-plane insertions `(C, D³)` with their Friedel mates: `x + sign·mirror(x)`.

    `sign` is +1 for real parts (and real channels) and −1 for imaginary parts. Inserting each
    half-plane sample once and then adding its mirrored conjugate equals inserting the full plane.
    """
    vols = channels.reshape(-1, box, box, box)
    return (vols + sign * mirror(vols, xp)).reshape(channels.shape)
