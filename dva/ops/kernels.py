"""CUDA kernels of the GPU workers' hot path (CuPy `RawKernel`): the slice stencil, the trilinear
gather and insert, and the M-step channels.

- `slice_stencil`, one thread per sample: the `(m, 8)` int32 indices into the flattened volumes'
  rows and float32 weights of its trilinear neighbours, from its pose and frequency, rounded step
  by step as NumPy rounds them (both backends interpolate with the same stencil).
- `gather_*` and `insert_float64`, one thread per (sample, channel): a gather reads the 8
  neighbours and writes one value; an insert adds its value times each weight into the accumulator
  with `atomicAdd`. Neither makes the `(m·8, C)` products that `cupyx.scatter_add` needs (610 MB
  per 128 particles of box 128 with the 12 statistic channels).
- `insert_statistics`, one thread per sample: makes its M-step channels from the CTF, residual and
  α·z and inserts them, so the `(m, C)` array of channels is not made either.

`SOURCE` is plain CUDA C++ with no shared memory or synchronisation, so the test suite also
compiles it for the CPU (a loop over the grid) and checks it against the NumPy path on machines
without a GPU.
"""

from __future__ import annotations

import functools

SOURCE = r"""
extern "C" __global__ void slice_stencil(const double* rotations, const double* kx, const double* ky,
                                         int* index, float* weights, const long long points,
                                         const int pixels, const int box)
{
    // dva.ops.slice.slice_stencil for sample p (particle i = p / pixels, pixel q): voxel coordinates
    // (kx R[i,0,a] + ky R[i,1,a]) box + box/2 on axes a = x, y, z, clipped inside the grid; its 8
    // neighbours j = 4 dz + 2 dy + dx and their weights. The _rn intrinsics keep each product and
    // sum rounded on its own, as NumPy and the CPU kernel round them (no fused multiply-add).
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= points) return;
    const long long i = p / pixels;
    const long long q = p - i * pixels;
    const double* r = rotations + 9 * i;
    int corner[3];
    float f[3];
    for (int a = 0; a < 3; ++a) {
        double v = __dadd_rn(__dmul_rn(kx[q], r[a]), __dmul_rn(ky[q], r[3 + a]));
        v = __dadd_rn(__dmul_rn(v, (double)box), (double)(box / 2));
        v = fmin(fmax(v, 0.0), (double)(box - 1) - 1e-6);
        const double base = floor(v);
        corner[a] = (int)base;
        f[a] = (float)(v - base);
    }
    const int first = (corner[2] * box + corner[1]) * box + corner[0];
    for (int dz = 0; dz < 2; ++dz) {
        const float wz = dz ? f[2] : 1.0f - f[2];
        for (int dy = 0; dy < 2; ++dy) {
            const float wzy = wz * (dy ? f[1] : 1.0f - f[1]);
            for (int dx = 0; dx < 2; ++dx) {
                const int j = 4 * dz + 2 * dy + dx;
                index[p * 8 + j] = first + (dz * box + dy) * box + dx;
                weights[p * 8 + j] = wzy * (dx ? f[0] : 1.0f - f[0]);
            }
        }
    }
}

template <typename T>
__device__ void gather(const T* volumes, const int* index, const float* weights, T* out,
                       const long long points, const int channels)
{
    // out[p, c] = sum_j weights[p, j] * volumes[index[p, j], c]; volumes (V, channels) row-major
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= points * channels) return;
    const long long p = t / channels;
    const int c = (int)(t - p * channels);
    T total = 0;
    for (int j = 0; j < 8; ++j) {
        total += (T)weights[p * 8 + j] * volumes[(long long)index[p * 8 + j] * channels + c];
    }
    out[t] = total;
}

extern "C" __global__ void gather_float32(const float* volumes, const int* index, const float* weights,
                                          float* out, const long long points, const int channels)
{
    gather<float>(volumes, index, weights, out, points, channels);
}

extern "C" __global__ void gather_float64(const double* volumes, const int* index, const float* weights,
                                          double* out, const long long points, const int channels)
{
    gather<double>(volumes, index, weights, out, points, channels);
}

extern "C" __global__ void insert_float64(const double* values, const int* index, const float* weights,
                                          double* out, const long long points, const int channels)
{
    // out[index[p, j], c] += weights[p, j] * values[p, c]; out (V, channels) row-major
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= points * channels) return;
    const long long p = t / channels;
    const int c = (int)(t - p * channels);
    const double value = values[t];
    for (int j = 0; j < 8; ++j) {
        atomicAdd(&out[(long long)index[p * 8 + j] * channels + c], (double)weights[p * 8 + j] * value);
    }
}

extern "C" __global__ void insert_statistics(const int* index, const float* weights, const float* ctf,
                                             const double* half_weight, const double* residual,
                                             const double* za, double* out, const long long points,
                                             const int pixels, const int modes)
{
    // The M-step channels of sample p (particle i = p / pixels, pixel q = p % pixels), made here and
    // inserted: K(K+1)/2 of c^2 W z_a z_b (a <= b), then c W Re(r) z_a and c W Im(r) z_a per mode a,
    // with W = half_weight[q], z = za[i] (alpha z), r = residual[p] (re, im).
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= points) return;
    const long long i = p / pixels;
    const double c = (double)ctf[p];
    const double cw = c * half_weight[p - i * pixels];
    const double g = c * cw;
    const double re = cw * residual[2 * p], im = cw * residual[2 * p + 1];
    const double* z = za + i * modes;
    const int channels = modes * (modes + 1) / 2 + 2 * modes;
    for (int j = 0; j < 8; ++j) {
        double* row = out + (long long)index[p * 8 + j] * channels;
        const double w = (double)weights[p * 8 + j];
        int k = 0;
        for (int a = 0; a < modes; ++a) {
            for (int b = a; b < modes; ++b) atomicAdd(&row[k++], w * (g * (z[a] * z[b])));
        }
        for (int a = 0; a < modes; ++a) {
            atomicAdd(&row[k++], w * (re * z[a]));
            atomicAdd(&row[k++], w * (im * z[a]));
        }
    }
}
"""
THREADS = 256  # per block


@functools.cache
def _kernel(name: str):
    import cupy

    return cupy.RawKernel(SOURCE, name)


def _run(name: str, threads: int, *args) -> None:
    """Kernel `name` on `threads` threads in blocks of `THREADS` (nothing when there are none)."""
    if threads:
        _kernel(name)(((threads + THREADS - 1) // THREADS,), (THREADS,), args)


def _launch(name: str, source, index, weights, out, channels: int) -> None:
    """Gather or insert kernel `name`, one thread per (point, channel)."""
    import cupy

    points = index.shape[0]
    _run(
        name,
        points * channels,
        source,
        cupy.ascontiguousarray(index, dtype=cupy.int32),
        cupy.ascontiguousarray(weights, dtype=cupy.float32),
        out,
        cupy.int64(points),
        cupy.int32(channels),
    )


def gather_cuda(volumes, index, weights):
    """Samples `(m, C)` of real volumes `(V, C)` (float32 or float64; the result has their dtype) at
    a stencil."""
    import cupy

    volumes = cupy.ascontiguousarray(volumes)
    out = cupy.empty((index.shape[0], volumes.shape[1]), volumes.dtype)
    _launch(f"gather_{volumes.dtype.name}", volumes, index, weights, out, volumes.shape[1])
    return out


def insert_cuda(values, index, weights, out) -> None:
    """Add values `(m, C)` into a C-contiguous float64 accumulator `out (V, C)`, in place."""
    import cupy

    values = cupy.ascontiguousarray(values, dtype=cupy.float64)
    _launch("insert_float64", values, index, weights, out, values.shape[1])


def insert_statistics_cuda(index, weights, ctf, half_weight, residual, za, out) -> None:
    """`dva.em.estep.add_statistics` on the GPU: each sample's M-step channels made and inserted in
    one kernel, with no `(m, C)` array of them. `ctf (n, P)` float32, `half_weight (P,)`,
    `residual (n, P)` complex128, `za (n, K)`, stencil `(n·P, 8)`, `out (V, C)` float64."""
    import cupy

    n, pixels = ctf.shape
    _run(
        "insert_statistics",
        n * pixels,
        cupy.ascontiguousarray(index, dtype=cupy.int32),
        cupy.ascontiguousarray(weights, dtype=cupy.float32),
        cupy.ascontiguousarray(ctf, dtype=cupy.float32),
        cupy.ascontiguousarray(half_weight, dtype=cupy.float64),
        cupy.ascontiguousarray(residual, dtype=cupy.complex128).view(cupy.float64),
        cupy.ascontiguousarray(za, dtype=cupy.float64),
        out,
        cupy.int64(n * pixels),
        cupy.int32(pixels),
        cupy.int32(za.shape[1]),
    )


def slice_stencil_cuda(rotations, kx, ky, box: int) -> tuple:
    """`(n·P, 8)` int32 indices and float32 weights of the trilinear neighbours of n poses'
    `(n, 3, 3)` central slices at frequencies `(P,)` (cycles/pixel), in one kernel."""
    import cupy

    points = rotations.shape[0] * kx.shape[0]
    index = cupy.empty((points, 8), cupy.int32)
    weights = cupy.empty((points, 8), cupy.float32)
    _run(
        "slice_stencil",
        points,
        cupy.ascontiguousarray(rotations, dtype=cupy.float64),
        cupy.ascontiguousarray(kx, dtype=cupy.float64),
        cupy.ascontiguousarray(ky, dtype=cupy.float64),
        index,
        weights,
        cupy.int64(points),
        cupy.int32(kx.shape[0]),
        cupy.int32(box),
    )
    return index, weights
