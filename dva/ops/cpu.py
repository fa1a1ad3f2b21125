"""Compiled kernels of the CPU workers' hot path (numba): the slice stencil, the trilinear gather
and insert and the M-step channels (the twins of the CUDA kernels in `dva.ops.kernels`, with the
same arguments), and the E-step sums `Re(SᴴWS)`, `Re(SᴴWy)` (GEMMs on GPU workers).

Each is compiled once per channel count (a constant in the compiled loop, which is then unrolled
and vectorised: 2x the speed of the same loop over a run-time count) and cached on disk by numba,
so a worker pays the compilation (~1.4 s for an E/M pass's four) only on a machine's first run.
Loading numba and LLVM adds ~150 MB to a worker's memory. Sums run sample by sample, neighbour by
neighbour, as SciPy's sparse kernels (which these replaced) ran them.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

JIT = {"nogil": True, "boundscheck": False, "cache": True}


@numba.njit(**JIT)
def _slice_stencil(rotations, kx, ky, box, index, weights):
    # `dva.ops.slice.slice_stencil` sample by sample, as the CUDA kernel does it, each product and
    # sum rounded on its own (no fused multiply-add without fastmath): the vectorised array
    # stencil's result, bit for bit
    f = np.empty(3, np.float32)
    corner = np.empty(3, np.int64)
    edge = (box - 1) - 1e-6
    for i in range(rotations.shape[0]):
        for q in range(kx.shape[0]):
            p = i * kx.shape[0] + q
            for a in range(3):
                v = (kx[q] * rotations[i, 0, a] + ky[q] * rotations[i, 1, a]) * box + box // 2
                v = min(max(v, 0.0), edge)
                base = np.floor(v)
                corner[a] = np.int64(base)
                f[a] = np.float32(v - base)
            first = (corner[2] * box + corner[1]) * box + corner[0]
            for dz in range(2):
                wz = f[2] if dz else np.float32(1) - f[2]
                for dy in range(2):
                    wzy = wz * (f[1] if dy else np.float32(1) - f[1])
                    for dx in range(2):
                        j = 4 * dz + 2 * dy + dx
                        index[p, j] = first + (dz * box + dy) * box + dx
                        weights[p, j] = wzy * (f[0] if dx else np.float32(1) - f[0])


@functools.cache
def _gather(channels: int):
    @numba.njit(**JIT)
    def gather(volumes, index, weights, out):
        for p in range(index.shape[0]):
            for c in range(channels):
                out[p, c] = 0
            for j in range(8):
                row = index[p, j]
                w = weights[p, j]
                for c in range(channels):
                    out[p, c] += w * volumes[row, c]

    return gather


@functools.cache
def _insert(channels: int):
    @numba.njit(**JIT)
    def insert(values, index, weights, out):
        for p in range(index.shape[0]):
            for j in range(8):
                row = index[p, j]
                w = np.float64(weights[p, j])
                for c in range(channels):
                    out[row, c] += w * values[p, c]

    return insert


@functools.cache
def _insert_statistics(modes: int):
    channels = modes * (modes + 1) // 2 + 2 * modes

    @numba.njit(**JIT)
    def insert_statistics(index, weights, ctf, half_weight, residual, za, out):
        n, pixels = ctf.shape
        v = np.empty(channels)
        for i in range(n):
            for q in range(pixels):
                p = i * pixels + q
                c = np.float64(ctf[i, q])
                cw = c * half_weight[q]
                g = c * cw
                re, im = cw * residual[i, q].real, cw * residual[i, q].imag
                k = 0
                for a in range(modes):
                    for b in range(a, modes):
                        v[k] = g * (za[i, a] * za[i, b])
                        k += 1
                for a in range(modes):
                    v[k] = re * za[i, a]
                    v[k + 1] = im * za[i, a]
                    k += 2
                for j in range(8):
                    row = index[p, j]
                    w = np.float64(weights[p, j])
                    for c in range(channels):
                        out[row, c] += w * v[c]

    return insert_statistics


@functools.cache
def _gram(width: int):
    @numba.njit(**JIT)
    def gram(s, weight, y, out, proj):
        for i in range(s.shape[0]):
            g = np.zeros((width, width))
            b = np.zeros(width)
            for q in range(s.shape[1]):
                w = np.float64(weight[q])
                yr, yi = np.float64(y[i, q].real), np.float64(y[i, q].imag)
                for a in range(width):
                    ar, ai = w * np.float64(s[i, q, a].real), w * np.float64(s[i, q, a].imag)
                    b[a] += ar * yr + ai * yi
                    for c in range(a, width):
                        g[a, c] += ar * np.float64(s[i, q, c].real) + ai * np.float64(s[i, q, c].imag)
            for a in range(width):
                proj[i, a] = b[a]
                for c in range(a, width):
                    out[i, a, c] = g[a, c]
                    out[i, c, a] = g[a, c]

    return gram


def _check(index, voxels: int) -> None:
    """The kernels do not check their indices: a stencil of another box would write outside `out`."""
    if index.size and (int(index.min()) < 0 or int(index.max()) >= voxels):
        raise ValueError(f"stencil indices outside the {voxels} voxels of the volumes")


def slice_stencil_cpu(rotations, kx, ky, box: int):
    """`dva.ops.slice.slice_stencil` on a CPU: indices `(n·P, 8)` int32 and weights float32 of n poses
    `(n, 3, 3)` at frequencies `(P,)` (cycles/pixel), with no `(3, n·P)` coordinate arrays."""
    n, pixels = len(rotations), len(kx)
    index, weights = np.empty((n * pixels, 8), np.int32), np.empty((n * pixels, 8), np.float32)
    _slice_stencil(
        np.ascontiguousarray(rotations, dtype=np.float64),
        np.ascontiguousarray(kx, dtype=np.float64),
        np.ascontiguousarray(ky, dtype=np.float64),
        box,
        index,
        weights,
    )
    return index, weights


def gather_cpu(volumes, index, weights):
    """Samples `(m, C)` of real volumes `(V, C)` (float32 or float64; the result and the sums have
    their dtype) at a stencil `(m, 8)`."""
    volumes = np.ascontiguousarray(volumes)
    _check(index, len(volumes))
    out = np.empty((len(index), volumes.shape[1]), volumes.dtype)
    _gather(volumes.shape[1])(volumes, index, weights.astype(volumes.dtype, copy=False), out)
    return out


def insert_cpu(values, index, weights, out) -> None:
    """Add values `(m, C)` into a C-contiguous float64 accumulator `out (V, C)`, in place."""
    _check(index, len(out))
    _insert(out.shape[1])(np.ascontiguousarray(values, dtype=np.float64), index, weights, out)


def insert_statistics_cpu(index, weights, ctf, half_weight, residual, za, out) -> None:
    """`dva.em.estep.add_statistics` on a CPU: each sample's M-step channels made and inserted in
    one loop, with no `(m, C)` array of them (arguments as `insert_statistics_cuda`)."""
    _check(index, len(out))
    _insert_statistics(za.shape[1])(
        index,
        weights,
        np.ascontiguousarray(ctf),
        np.ascontiguousarray(half_weight, dtype=np.float64),
        np.ascontiguousarray(residual, dtype=np.complex128),
        np.ascontiguousarray(za, dtype=np.float64),
        out,
    )


def gram_cpu(s, weight, y):
    """`Re(Sᴴ W S)` `(n, C, C)` and `Re(Sᴴ W y)` `(n, C)` in float64 of n particles' slices `s (n, P, C)`
    with weights `W (P,)` and data `y (n, P)`, summed in float64 over the pixels in one pass."""
    n, _, width = s.shape
    out, proj = np.empty((n, width, width)), np.empty((n, width))
    _gram(width)(np.ascontiguousarray(s), np.ascontiguousarray(weight), np.ascontiguousarray(y), out, proj)
    return out, proj
