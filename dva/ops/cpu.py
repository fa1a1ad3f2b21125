"""Compiled kernels of the CPU workers' hot path (numba), the twins of the CUDA kernels in
`dva.ops.kernels` with the same arguments: the E-step's two fused passes, the slice stencil, and
the trilinear gather and insert.

The passes loop particle by particle, pixel by pixel: each pixel's trilinear neighbours come
from the pose, the K+1 slices are gathered there and used at once (no stencil or slice stack is
stored). Their per-pixel arrays live on the kernel's stack (`_stack`), where LLVM can keep them in
registers. Each kernel is compiled once per channel or mode count (a constant in the compiled
loops, which are then unrolled and vectorised: 2x the speed of the same loop over a run-time
count) and cached on disk by numba where it can write (`_can_cache`), so a worker pays the
compilation (1.5 s for the two E-step passes at one K) only on a machine's first run. Loading numba
and LLVM adds ~150 MB to a worker's memory.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _can_cache() -> bool:
    """Whether numba finds a folder to cache this module's kernels in (beside it, `NUMBA_CACHE_DIR`,
    or the user's cache folder). A read-only install run by a user with no writable home (a
    container run as another user) has none: the kernels are then compiled in every process (a few
    seconds per worker) rather than failing the import; set `NUMBA_CACHE_DIR` to keep them."""

    def probe() -> None:
        pass

    try:
        numba.njit(cache=True)(probe)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return False
    return True


JIT = {"nogil": True, "boundscheck": False, "cache": _can_cache()}


@intrinsic
def _stack(typingctx, size, dtype):
    """A pointer to `size` elements of `dtype` on the calling kernel's stack (an `alloca` in its
    entry block; wrap it with `numba.carray`). Small per-sample arrays there can stay in registers;
    the same arrays from `np.empty` live on the heap: with them `em_statistics` took 1.10 s instead
    of 0.80 s for 5,000 particles at box 64. Call it in the kernel itself, never from a helper that
    returns it (its frame would be gone)."""

    if not isinstance(size, types.IntegerLiteral):
        return None  # numba retries with the literal: the size must be a compile-time constant

    def codegen(context, builder, signature, args):
        count = context.get_constant(types.intp, size.literal_value)
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=count)

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@numba.njit(**JIT)
def _neighbours(r, kxq, kyq, box, index, weights):
    # The 8 trilinear neighbours in the half spectra (`dva.ops.slice.slice_stencil`) of frequency
    # (kxq, kyq) cycles/pixel under pose r (3, 3): flat indices and float32 weights, j = 4 dz +
    # 2 dy + dx; returns the sign (-1: taken at the mirror point, conjugate). Each product and sum
    # rounded on its own, as the array reference and the CUDA kernel round them (no fused
    # multiply-add without fastmath): their result, bit for bit
    half = box // 2
    ux = (kxq * r[0, 0] + kyq * r[1, 0]) * box
    uy = (kxq * r[0, 1] + kyq * r[1, 1]) * box
    uz = (kxq * r[0, 2] + kyq * r[1, 2]) * box
    sign = np.float32(1)
    if ux < 0:
        ux, uy, uz, sign = -ux, -uy, -uz, np.float32(-1)
    vx = min(max(ux, 0.0), (half - 1) - 1e-6)
    vy = min(max(uy + half, 0.0), (box - 1) - 1e-6)
    vz = min(max(uz + half, 0.0), (box - 1) - 1e-6)
    bx, by, bz = np.floor(vx), np.floor(vy), np.floor(vz)
    fx, fy, fz = np.float32(vx - bx), np.float32(vy - by), np.float32(vz - bz)
    first = (np.int64(bz) * box + np.int64(by)) * half + np.int64(bx)
    for dz in range(2):
        wz = fz if dz else np.float32(1) - fz
        for dy in range(2):
            wzy = wz * (fy if dy else np.float32(1) - fy)
            for dx in range(2):
                j = 4 * dz + 2 * dy + dx
                index[j] = first + (dz * box + dy) * half + dx
                weights[j] = wzy * (fx if dx else np.float32(1) - fx)
    return sign


@numba.njit(**JIT)
def _slice_stencil(rotations, kx, ky, box, index, weights, sign):
    at = numba.carray(_stack(8, np.int64), (8,))
    w8 = numba.carray(_stack(8, np.float32), (8,))
    for i in range(rotations.shape[0]):
        r = rotations[i]
        for q in range(kx.shape[0]):
            p = i * kx.shape[0] + q
            sign[p] = _neighbours(r, kx[q], ky[q], box, at, w8)
            for j in range(8):
                index[p, j] = at[j]
                weights[p, j] = w8[j]


@numba.njit(inline="always", **JIT)
def _gather_slices(volumes, index, weights, mate, s, n):
    # The first n columns (re, im pairs) of the 8 neighbours' rows, weighted, conjugated when
    # mate < 0: the CUDA `gather_slices`. n is a constant at each call (inlined and unrolled)
    for ch in range(n):
        s[ch] = 0
    for j in range(8):
        for ch in range(n):
            s[ch] += weights[j] * volumes[index[j], ch]
    for ch in range(1, n, 2):
        s[ch] *= mate


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
def _estep_sums(modes: int):
    width = modes + 1
    columns, square = 2 * width, width * width

    @numba.njit(**JIT)
    def estep_sums(order, rotations, y, ctf, volumes, kx, ky, weight, inner, box, sign, out):
        index = numba.carray(_stack(8, np.int64), (8,))
        w8 = numba.carray(_stack(8, np.float32), (8,))
        s = numba.carray(_stack(columns, np.float32), (columns,))
        d = numba.carray(_stack(columns, np.float64), (columns,))
        g = numba.carray(_stack(square, np.float64), (width, width))
        b = numba.carray(_stack(width, np.float64), (width,))
        for i in order:
            r = rotations[i]
            g[:] = 0.0
            b[:] = 0.0
            yy = 0.0
            for q in range(kx.shape[0]):
                mate = _neighbours(r, kx[q], ky[q], box, index, w8)
                c, wq = np.float64(ctf[i, q]), weight[q]
                yr, yi = sign * np.float64(y[i, q].real), sign * np.float64(y[i, q].imag)
                yy += wq * (yr * yr + yi * yi)
                if inner[q]:
                    _gather_slices(volumes, index, w8, mate, s, columns)
                    for ch in range(columns):
                        d[ch] = c * s[ch]
                    for a in range(width):  # the upper triangle (symmetric)
                        ar, ai = wq * d[2 * a], wq * d[2 * a + 1]
                        b[a] += ar * yr + ai * yi
                        for e in range(a, width):
                            g[a, e] += ar * d[2 * e] + ai * d[2 * e + 1]
                else:
                    _gather_slices(volumes, index, w8, mate, s, 2)
                    ar, ai = wq * (c * s[0]), wq * (c * s[1])
                    b[0] += ar * yr + ai * yi
                    g[0, 0] += ar * (c * s[0]) + ai * (c * s[1])
            for a in range(width):
                for e in range(a, width):
                    out[i, 0, a * width + e] = out[i, 0, e * width + a] = g[a, e]
                out[i, 0, square + a] = b[a]
            out[i, 0, square + width] = yy

    return estep_sums


@functools.cache
def _estep_insert(modes: int):
    width = modes + 1
    columns = 2 * width
    pairs = modes * (modes + 1) // 2
    channels = pairs + 2 * modes

    @numba.njit(**JIT)
    def estep_insert(
        order, rotations, y, ctf, volumes, kx, ky, weight, inner, shell, multiplicity, box, sign, alpha, z, power, sums
    ):
        index = numba.carray(_stack(8, np.int64), (8,))
        w8 = numba.carray(_stack(8, np.float32), (8,))
        s = numba.carray(_stack(columns, np.float32), (columns,))
        za = numba.carray(_stack(modes, np.float64), (modes,))
        zz = numba.carray(_stack(pairs, np.float64), (pairs,))  # α²z_a z_b, a ≤ b
        v = numba.carray(_stack(channels, np.float64), (channels,))
        # |residual|² per pixel, added into the particle's shells after its pixels: the insert pass ran
        # 13% faster at box 128, K = 3 (6% at K = 10) than adding each into its shell at once
        residual = np.zeros(kx.shape[0])
        for i in order:
            r = rotations[i]
            for a in range(modes):
                za[a] = alpha[i] * z[i, a]
            k = 0
            for a in range(modes):
                for e in range(a, modes):
                    zz[k] = za[a] * za[e]
                    k += 1
            for q in range(kx.shape[0]):
                mate = _neighbours(r, kx[q], ky[q], box, index, w8)
                c = np.float64(ctf[i, q])
                yr, yi = sign * np.float64(y[i, q].real), sign * np.float64(y[i, q].imag)
                if inner[q]:
                    _gather_slices(volumes, index, w8, mate, s, columns)
                    rr, ri = yr - alpha[i] * (c * s[0]), yi - alpha[i] * (c * s[1])
                    er, ei = rr, ri
                    for a in range(modes):
                        er -= za[a] * (c * s[2 * a + 2])
                        ei -= za[a] * (c * s[2 * a + 3])
                    residual[q] = er * er + ei * ei
                    cw = c * (weight[q] / 2)
                    gg, re, im = c * cw, cw * rr, cw * (mate * ri)  # conjugate at the mirror
                    for k in range(pairs):
                        v[k] = gg * zz[k]
                    for a in range(modes):
                        v[pairs + 2 * a] = re * za[a]
                        v[pairs + 2 * a + 1] = im * za[a]
                    for j in range(8):
                        w = np.float64(w8[j])
                        for ch in range(channels):
                            sums[index[j], ch] += w * v[ch]
                else:
                    _gather_slices(volumes, index, w8, mate, s, 2)
                    rr, ri = yr - alpha[i] * (c * s[0]), yi - alpha[i] * (c * s[1])
                    residual[q] = rr * rr + ri * ri
            for q in range(kx.shape[0]):
                power[i, shell[q]] += multiplicity[q] * residual[q]

    return estep_insert


def _check(index, voxels: int) -> None:
    """The kernels do not check their indices: a stencil of another box would write outside `out`."""
    if index.size and (int(index.min()) < 0 or int(index.max()) >= voxels):
        raise ValueError(f"stencil indices outside the {voxels} voxels of the volumes")


def slice_stencil_cpu(rotations, kx, ky, box: int):
    """`dva.ops.slice.slice_stencil` on a CPU: indices `(n·P, 8)` int32, weights float32 and signs
    `(n·P,)` float32 of n poses `(n, 3, 3)` at frequencies `(P,)` (cycles/pixel)."""
    n, pixels = len(rotations), len(kx)
    index, weights = np.empty((n * pixels, 8), np.int32), np.empty((n * pixels, 8), np.float32)
    sign = np.empty(n * pixels, np.float32)
    _slice_stencil(
        np.ascontiguousarray(rotations, dtype=np.float64),
        np.ascontiguousarray(kx, dtype=np.float64),
        np.ascontiguousarray(ky, dtype=np.float64),
        box,
        index,
        weights,
        sign,
    )
    return index, weights, sign


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


def estep_sums_cpu(order, rotations, y, ctf, volumes, *rest):
    """`dva.em.estep.estep_sums` on a CPU (the kernel arguments as there): `(n, 1, W)` float64, one
    row per particle, in one pass with no stencil or slices stored."""
    width = volumes.shape[1] // 2
    out = np.zeros((len(y), 1, width * width + width + 1))
    _estep_sums(width - 1)(order, rotations, y, ctf, volumes, *rest, out)
    return out


def estep_insert_cpu(*arguments) -> None:
    """`dva.em.estep.estep_insert` on a CPU, in place (the kernel arguments as there, in order,
    ending with `z (n, K)`, `power` and `sums`)."""
    _estep_insert(arguments[-3].shape[1])(*arguments)
