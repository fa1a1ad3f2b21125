"""The trilinear slice stencil in vectorised array code (NumPy or CuPy): the reference that the
compiled stencils of `dva.ops.slice.slice_stencil` (numba on CPU workers, CUDA on GPU workers)
reproduce bit for bit (`half_slice_stencil`), and a stencil on the full grid for any coordinates
in the slice tests."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.ops.slice import neighbour_offsets


def slice_coordinates(rotations, kx, ky, box: int, xp: ModuleType = np):
    """Voxel coordinates `(3, n, P)`, axis (x, y, z) first, of the 2D frequencies `(P,)` for poses
    `(n, 3, 3)` (axis first: every step of `trilinear_stencil` then runs over contiguous rows)."""
    rx, ry = rotations[:, 0, :].T[:, :, None], rotations[:, 1, :].T[:, :, None]  # (3, n, 1)
    return (kx[None, None, :] * rx + ky[None, None, :] * ry) * box + box // 2


def trilinear_stencil(coords, box: int, xp: ModuleType = np, width: int | None = None):
    """Flat voxel indices `(m, 8)` (int32) and weights `(m, 8)` (float32) of the 8 neighbours of
    coordinates `(3, ...)` (x, y, z) in a `(D, D, width)` grid (`width` D by default), neighbour
    j = 4·dz + 2·dy + dx, m the points in order.

    Coordinates must lie inside the grid on every axis (the band limit ensures it); they are
    clipped there, the upper edge nudged inside so the 8 neighbours exist: every index is a voxel.
    """
    width = box if width is None else width
    top = xp.asarray([width - 1, box - 1, box - 1], dtype=xp.float64)[:, None] - 1e-6
    c = xp.minimum(xp.maximum(xp.ascontiguousarray(coords.reshape(3, -1)), 0.0), top)
    base = xp.floor(c)
    f = (c - base).astype(xp.float32)
    i = base.astype(xp.int32)  # voxel indices up to D³ (< 2³¹ for any box used)
    corner = (i[2] * box + i[1]) * width + i[0]
    w = xp.stack([1 - f, f], 1).transpose(2, 0, 1)  # (m, 3, 2): each point's two weights along x, y, z
    wzy = (w[:, 2, :, None] * w[:, 1, None, :]).reshape(-1, 4)
    weights = xp.ascontiguousarray((wzy[:, :, None] * w[:, 0, None, :]).reshape(-1, 8))
    return xp.ascontiguousarray((neighbour_offsets(box, xp, width)[:, None] + corner).T), weights


def half_slice_stencil(rotations, kx, ky, box: int, xp: ModuleType = np):
    """`dva.ops.slice.slice_stencil` written out: the points `u = D·Aᵀk`, those with u_x < 0 negated
    (sign −1), at half-grid coordinates `(u_x, u_y + D//2, u_z + D//2)`; indices, weights, signs."""
    rx, ry = rotations[:, 0, :].T[:, :, None], rotations[:, 1, :].T[:, :, None]  # (3, n, 1)
    u = (kx[None, None, :] * rx + ky[None, None, :] * ry) * box
    sign = xp.where(u[0] < 0, -1.0, 1.0)
    coords = u * sign + xp.asarray([0.0, box // 2, box // 2])[:, None, None]
    index, weights = trilinear_stencil(coords, box, xp, box // 2)
    return index, weights, sign.ravel().astype(xp.float32)
