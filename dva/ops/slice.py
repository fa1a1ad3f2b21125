"""Central slices of 3D Fourier volumes: trilinear gather (extraction) and its exact adjoint (insertion).

Volumes are in the centred Fourier layout `fftshift(fftn(ifftshift(vol)))` with DC at index
D//2, indexed `[z, y, x]`. A 2D frequency `(kx, ky)` in cycles/pixel of an image with pose A samples
the volume at `Aᵀ·(kx, ky, 0)` (DESIGN.md §1), i.e. at voxel coordinates `D·Aᵀk + D//2`.

The workers hold only the half `x ≥ D//2` of the spectra of real volumes (`D·D·D//2` rows,
`[z, y, x − D//2]`; `half_rows`): the other half is its conjugate mirror. A sample whose point has
x < D//2 is taken at its mirror −k instead, and conjugated (`slice_stencil`'s sign); insertions
into the half are completed by `complete_plane`; `dva.ops.filters` transforms half spectra.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def view_order(rotations, batch: int, xp: ModuleType = np):
    """An order `(n,)` of poses `(n, 3, 3)` in which each run of `batch` shares nearly one slice plane.

    Consecutive batches then gather from and insert into the same few voxels, which stay in the
    cache (two CPU workers at box 64: 1.5x the particles per second of the stored order). The key
    is the plane's normal `A[2]` up to sign: √(n / 2·batch) bands of polar angle (the count that
    gave the tightest batches for random poses), each walked in azimuth, back and forth."""
    normal = rotations[:, 2, :] * xp.where(rotations[:, 2, 2:3] < 0, -1.0, 1.0)
    bands = max(1, int(np.sqrt(len(rotations) / (2 * batch))))
    polar = xp.arccos(xp.clip(normal[:, 2], -1.0, 1.0)) / (np.pi / 2)  # [0, 1]
    band = xp.minimum(xp.floor(polar * bands), bands - 1)
    azimuth = xp.arctan2(normal[:, 1], normal[:, 0])  # [-π, π]
    snake = xp.where(band % 2 == 1, -azimuth, azimuth)
    return xp.argsort(band * 8 + snake, kind="stable")


def half_rows(box: int) -> int:
    """Rows of a worker's half spectrum: the `x ≥ D//2` half of the `D³` centred grid."""
    return box * box * (box // 2)


def neighbour_offsets(box: int, xp: ModuleType = np, width: int | None = None):
    """Flat-index offsets `(8,)` (int32) of a voxel's trilinear neighbours, j = 4·dz + 2·dy + dx, in
    a `(D, D, width)` grid (`width` D by default; D//2 for the half spectra)."""
    width = box if width is None else width
    return xp.asarray([(dz * box + dy) * width + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], xp.int32)


def slice_stencil(rotations, kx, ky, box: int, xp: ModuleType = np):
    """The trilinear stencil of n poses' central slices at frequencies `(P,)` (cycles/pixel) in the
    half spectra: flat indices `(n·P, 8)` int32 into the `(half_rows, ·)` volumes, weights
    `(n·P, 8)` float32 of the 8 neighbours j = 4·dz + 2·dy + dx, and signs `(n·P,)` float32: a
    sample whose point `u = D·Aᵀk` has u_x < 0 is taken at −u, sign −1 (its value is the conjugate
    of the half's). The half's coordinates are `(u_x, u_y + D//2, u_z + D//2)`, clipped inside the
    grid so every neighbour is a voxel (the band limit keeps them there anyway). Sample p = i·P + q.
    One compiled kernel per backend, no coordinate arrays."""
    if xp is np:
        from dva.ops.cpu import slice_stencil_cpu

        return slice_stencil_cpu(rotations, kx, ky, box)
    from dva.ops.kernels import slice_stencil_cuda

    return slice_stencil_cuda(rotations, kx, ky, box)


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
    """Trilinear samples `(m, C)` of flattened volumes `(V, C)` at a stencil `(m, 8)` of indices into
    their rows (real or complex volumes; the result has their dtype; no conjugation: for the half
    spectra apply `slice_stencil`'s signs to the imaginary parts)."""
    real = xp.ascontiguousarray(volumes).view(volumes.real.dtype)  # complex: re, im side by side
    if xp is np:
        from dva.ops.cpu import gather_cpu

        out = gather_cpu(real, index, weights)
    else:
        from dva.ops.kernels import gather_cuda

        out = gather_cuda(real, index, weights)
    return out.view(volumes.dtype)


def insert(values, index, weights, out, xp: ModuleType = np):
    """Adjoint of `gather` for real channels: add values `(m, C)` into voxel-major volumes
    `out (V, C)` (float64), in place, with no temporary the size of `out`.

    `out` is a local accumulator and is modified in place; it is also returned.
    """
    if out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError("insert: out must be a C-contiguous float64 (V, C) array")
    if xp is np:
        from dva.ops.cpu import insert_cpu

        insert_cpu(values, index, weights, out)
    else:
        from dva.ops.kernels import insert_cuda

        insert_cuda(values, index, weights, out)
    return out


def complete_plane(channels, stored, box: int, sign: float, xp: ModuleType = np):
    """Sums `(C, len(stored))` inserted into the half spectra, held at its rows `stored` (sorted:
    `dva.em.chunk.band_rows`, or every row), completed at each (`completed_rows`): on the kx = 0
    plane (its own mirror's half) each voxel also gets `sign`× its mirror's sum; elsewhere every
    sample already sits where it or its conjugate belongs. The result equals the full plane inserted
    on the full grid, on the half.

    `sign` is +1 for real parts (and real channels) and −1 for imaginary parts."""
    return completed_rows(channels.T, xp.arange(len(stored)), stored, box, sign, xp)


COPY_ROWS = 16384  # rows that `completed_rows` transposes, and `compact_rows` moves, at a time (its cache)


def compact_rows(sums, rows):
    """`sums[rows]` for sorted, distinct `rows` of `sums (V, C)`, moved in place to its first
    `len(rows)` rows and returned as that view (C-contiguous): no new array of the result's size
    (at box 256, K = 10 that was 2.6 GB per task on the GPU; on CPU workers under a memory limit,
    fresh pages to fault in). In blocks of `COPY_ROWS`: a block's rows are read before it is
    written (they are at or past it), and later blocks read rows past it. `sums` is overwritten."""
    for lo in range(0, len(rows), COPY_ROWS):
        hi = min(lo + COPY_ROWS, len(rows))
        sums[lo:hi] = sums[rows[lo:hi]]
    return sums[: len(rows)]


def completed_rows(sums, rows, stored, box: int, sign: float, xp: ModuleType = np):
    """Half-spectrum sums completed at some rows only: voxel-major sums `(len(stored), C)` held at
    the half spectra's rows `stored` (sorted: `dva.em.chunk.band_rows`, or every row), and their
    channels `(C, len(rows))` at the positions `rows` (the half spectra's rows `stored[rows]`), those
    on the kx = 0 plane with `sign`× the sums of their mirror `(−z, −y)` added (`complete_plane` at
    every row). The mirrors must be stored too. Sums of another number of rows are refused: the
    rows are indexed unchecked (sums of the whole half spectra would read, wrong, without an error)."""
    if sums.shape[0] != len(stored):
        raise ValueError(f"sums of {sums.shape[0]} rows, not the {len(stored)} stored (box {box})")
    out = xp.empty((sums.shape[1], len(rows)), dtype=sums.dtype)
    for lo in range(0, len(rows), COPY_ROWS):  # in blocks: 0.4 s instead of 1.0-1.4 at box 256 (NumPy)
        out[:, lo : lo + COPY_ROWS] = sums[rows[lo : lo + COPY_ROWS]].T
    half = box // 2
    full = stored[rows]
    on_plane = xp.flatnonzero(full % half == 0)
    line = full[on_plane] // half  # z·D + y
    z, y = line // box, line % box
    mate = (((box - z) % box) * box + (box - y) % box) * half
    # where the mirrors are stored, checked (CuPy would wrap a bad index, not raise)
    found = xp.minimum(xp.searchsorted(stored, mate), len(stored) - 1)
    if not bool(xp.all(stored[found] == mate)):
        raise ValueError("completed_rows: the mirror of a row is not among the stored rows")
    out[:, on_plane] += sign * sums[found].T
    return out
