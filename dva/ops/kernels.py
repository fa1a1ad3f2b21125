"""CUDA kernels of the GPU workers' hot path (CuPy `RawKernel`): the two E-step passes, the slice
stencil, and the trilinear gather and insert.

All volumes and sums are the workers' half spectra (`dva.ops.slice`): a sample whose point lies
in the other half is taken at its mirror and conjugated.

- `estep_sums` and `estep_insert`, the E-step's two passes (`dva.em.estep`), fused: each thread
  takes a share of one particle's pixels, computes each pixel's trilinear neighbours from the pose,
  gathers the K+1 slices there and uses them at once: the first pass sums `Re(SᴴWS)`, `Re(SᴴWy)`
  and `yᴴWy`; the second, after the per-particle solves, adds the residual power per shell and
  makes and inserts the M-step channels with `atomicAdd`. Nothing per sample is stored: no
  stencil, no slice stack, no residual, no channels (at box 128, K = 3: each thread's 21 sums,
  21 KB per particle with its 128 threads, against ~0.7 MB of per-sample arrays per particle
  before). Compiled once per mode count (`-DMODES=K`), so each thread's small arrays are registers.
- `slice_stencil`, one thread per sample: the `(m, 8)` int32 indices into the flattened volumes'
  rows and float32 weights of its trilinear neighbours, from its pose and frequency, rounded step
  by step as NumPy rounds them (both backends interpolate with the same stencil). The mean's
  reconstruction (`dva.em.mean`) inserts through it.
- `gather_*` and `insert_float64`, one thread per (sample, channel): a gather reads the 8
  neighbours and writes one value; an insert adds its value times each weight into the accumulator
  with `atomicAdd`. Neither makes the `(m·8, C)` products that `cupyx.scatter_add` needs (610 MB
  per 128 particles of box 128 with 12 channels).

`SOURCE` is plain CUDA C++ with no shared memory or synchronisation, so the test suite also
compiles it for the CPU (a loop over the grid) and checks it against the NumPy path on machines
without a GPU, and compiles it with NVRTC for the H100 (sm_90). ptxas there (NVRTC 12.9 and 13.5
alike; the H100's image has 13.2): the E-step passes take 96/56 registers per thread at K = 1
(sums/insert), 128/80 at K = 3 and 255/255 at K = 10, with no spills. On the H100 (2026-11-27) the
GPU variants of the tests passed, and the two passes took 0.069 s per 8,192 particles of box 128 at
K = 3 (78-81 G scatter-adds/s in the insert pass: `tests/benchmarks/kernels.py`), 0.58 s per 2,048
of box 256 at K = 10.
"""

from __future__ import annotations

import functools
import os

from dva.errors import DvaInputError

SOURCE = r"""
__device__ float neighbours(const double* r, const double kx, const double ky, const int box, int* index,
                            float* weights)
{
    // The 8 trilinear neighbours j = 4 dz + 2 dy + dx in the half spectra (dva.ops.slice.slice_stencil)
    // of frequency (kx, ky) cycles/pixel under pose r (3x3, row-major): u = (kx r[0,a] + ky r[1,a]) box
    // on axes a = x, y, z, taken at -u when u_x < 0 (returns -1 then: conjugate), at half-grid
    // coordinates (u_x, u_y + box/2, u_z + box/2) clipped inside the (box, box, box/2) grid. The _rn
    // intrinsics keep each product and sum rounded on its own, as NumPy and the CPU kernels round
    // them (no fused multiply-add).
    const int half = box / 2;
    double u[3];
    for (int a = 0; a < 3; ++a) u[a] = __dmul_rn(__dadd_rn(__dmul_rn(kx, r[a]), __dmul_rn(ky, r[3 + a])), (double)box);
    const float sign = u[0] < 0.0 ? -1.0f : 1.0f;
    int corner[3];
    float f[3];
    for (int a = 0; a < 3; ++a) {
        double v = sign < 0.0f ? -u[a] : u[a];
        if (a > 0) v = __dadd_rn(v, (double)half);
        v = fmin(fmax(v, 0.0), (double)((a > 0 ? box : half) - 1) - 1e-6);
        const double base = floor(v);
        corner[a] = (int)base;
        f[a] = (float)(v - base);
    }
    const int first = (corner[2] * box + corner[1]) * half + corner[0];
    for (int dz = 0; dz < 2; ++dz) {
        const float wz = dz ? f[2] : 1.0f - f[2];
        for (int dy = 0; dy < 2; ++dy) {
            const float wzy = wz * (dy ? f[1] : 1.0f - f[1]);
            for (int dx = 0; dx < 2; ++dx) {
                const int j = 4 * dz + 2 * dy + dx;
                index[j] = first + (dz * box + dy) * half + dx;
                weights[j] = wzy * (dx ? f[0] : 1.0f - f[0]);
            }
        }
    }
    return sign;
}

extern "C" __global__ void slice_stencil(const double* rotations, const double* kx, const double* ky,
                                         int* index, float* weights, float* sign, const long long points,
                                         const int pixels, const int box)
{
    // dva.ops.slice.slice_stencil for sample p (particle i = p / pixels, pixel q)
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= points) return;
    const long long i = p / pixels;
    const long long q = p - i * pixels;
    sign[p] = neighbours(rotations + 9 * i, kx[q], ky[q], box, index + 8 * p, weights + 8 * p);
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

#ifdef MODES
// The two E-step passes (dva.em.estep), compiled once per mode count K = MODES so that the
// per-thread arrays below are registers. Thread t works for particle order[t / segments] on its
// pixels q = t % segments, + segments, ... (a warp reads neighbouring pixels), gathering each
// pixel's slices from the volumes (V, 2(K+1)) float32 (re, im of V_0..V_K side by side) itself:
// the components on their pixels (inner), the mean alone elsewhere. No stencil or slice stack is stored.
#define WIDTH (MODES + 1)
#define COLUMNS (2 * WIDTH)
#define PAIRS (MODES * (MODES + 1) / 2)
#define CHANNELS (PAIRS + 2 * MODES)
#define TRIANGLE (WIDTH * (WIDTH + 1) / 2)
#define UPPER(a, e) ((a) * WIDTH - (a) * ((a) - 1) / 2 + (e) - (a))  // (a, e), a <= e, in the triangle

template <int N>
__device__ void gather_slices(const float* volumes, const int* index, const float* weights, const float mate,
                              float* s)
{
    // the first N columns (re, im pairs) of the 8 neighbours' rows, weighted, conjugated when
    // mate < 0 (N a constant: s stays in registers)
#pragma unroll
    for (int ch = 0; ch < N; ++ch) s[ch] = 0.0f;
    for (int j = 0; j < 8; ++j) {
        const float* row = volumes + (long long)index[j] * COLUMNS;
#pragma unroll
        for (int ch = 0; ch < N; ++ch) s[ch] += weights[j] * row[ch];
    }
#pragma unroll
    for (int ch = 1; ch < N; ch += 2) s[ch] *= mate;
}

extern "C" __global__ void estep_sums(const long long* order, const double* rotations, const float* y,
                                      const float* ctf, const float* volumes, const double* kx,
                                      const double* ky, const double* weight, const unsigned char* inner,
                                      const int box, const double sign, double* out, const long long particles,
                                      const int pixels, const int segments)
{
    // out[i, segment] = (Re(S^H W S) (K+1)^2 row-major, Re(S^H W y) (K+1), y^H W y) over the
    // thread's pixels, slices s_k = c S V_k
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= particles * segments) return;
    const long long i = order[t / segments];
    const int segment = (int)(t % segments);
    const double* r = rotations + 9 * i;
    double g[TRIANGLE], b[WIDTH], yy = 0.0;  // g: the upper triangle of the symmetric sums, row by row
    for (int a = 0; a < TRIANGLE; ++a) g[a] = 0.0;
    for (int a = 0; a < WIDTH; ++a) b[a] = 0.0;
    int index[8];
    float w8[8], s[COLUMNS];
    for (int q = segment; q < pixels; q += segments) {
        const float mate = neighbours(r, kx[q], ky[q], box, index, w8);
        const long long p = i * pixels + q;
        const double c = (double)ctf[p], wq = weight[q];
        const double yr = sign * (double)y[2 * p], yi = sign * (double)y[2 * p + 1];
        yy += wq * (yr * yr + yi * yi);
        if (inner[q]) {
            gather_slices<COLUMNS>(volumes, index, w8, mate, s);
#pragma unroll
            for (int a = 0; a < WIDTH; ++a) {
                const double ar = wq * (c * (double)s[2 * a]), ai = wq * (c * (double)s[2 * a + 1]);
                b[a] += ar * yr + ai * yi;
#pragma unroll
                for (int e = a; e < WIDTH; ++e) {
                    g[UPPER(a, e)] += ar * (c * (double)s[2 * e]) + ai * (c * (double)s[2 * e + 1]);
                }
            }
        } else {
            gather_slices<2>(volumes, index, w8, mate, s);
            const double ar = wq * (c * (double)s[0]), ai = wq * (c * (double)s[1]);
            b[0] += ar * yr + ai * yi;
            g[0] += ar * (c * (double)s[0]) + ai * (c * (double)s[1]);
        }
    }
    double* o = out + (i * segments + segment) * (WIDTH * WIDTH + WIDTH + 1);
#pragma unroll
    for (int a = 0; a < WIDTH; ++a) {
#pragma unroll
        for (int e = a; e < WIDTH; ++e) o[a * WIDTH + e] = o[e * WIDTH + a] = g[UPPER(a, e)];
    }
    for (int a = 0; a < WIDTH; ++a) o[WIDTH * WIDTH + a] = b[a];
    o[WIDTH * WIDTH + WIDTH] = yy;
}

extern "C" __global__ void estep_insert(const long long* order, const double* rotations, const float* y,
                                        const float* ctf, const float* volumes, const double* kx,
                                        const double* ky, const double* weight, const unsigned char* inner,
                                        const int* shell, const double* multiplicity, const int box,
                                        const double sign, const double* alpha, const double* z, double* power,
                                        double* sums, const long long particles,
                                        const int pixels, const int shells, const int segments)
{
    // power[i, shell] += multiplicity |y - alpha (s_0 + sum_k z_k s_k)|^2 and each component pixel's
    // M-step channels inserted into sums (V, CHANNELS): PAIRS of
    // c^2 W/2 (alpha z_a)(alpha z_b) (a <= b), then c W/2 Re(r) alpha z_a and c W/2 Im(r) alpha z_a
    // per mode, r = y - alpha s_0
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= particles * segments) return;
    const long long i = order[t / segments];
    const int segment = (int)(t % segments);
    const double* r = rotations + 9 * i;
    const double scale = alpha[i];
    double za[MODES], zz[PAIRS], v[CHANNELS];
    for (int a = 0; a < MODES; ++a) za[a] = scale * z[i * MODES + a];
    for (int a = 0, k = 0; a < MODES; ++a) {
        for (int e = a; e < MODES; ++e) zz[k++] = za[a] * za[e];
    }
    int index[8];
    float w8[8], s[COLUMNS];
    for (int q = segment; q < pixels; q += segments) {
        const float mate = neighbours(r, kx[q], ky[q], box, index, w8);
        const long long p = i * pixels + q;
        const double c = (double)ctf[p];
        const double yr = sign * (double)y[2 * p], yi = sign * (double)y[2 * p + 1];
        const bool component = inner[q];
        if (component) {
            gather_slices<COLUMNS>(volumes, index, w8, mate, s);
        } else {
            gather_slices<2>(volumes, index, w8, mate, s);
        }
        const double rr = yr - scale * (c * (double)s[0]), ri = yi - scale * (c * (double)s[1]);
        double er = rr, ei = ri;
        if (component) {
            for (int a = 0; a < MODES; ++a) {
                er -= za[a] * (c * (double)s[2 * a + 2]);
                ei -= za[a] * (c * (double)s[2 * a + 3]);
            }
        }
        atomicAdd(&power[i * shells + shell[q]], multiplicity[q] * (er * er + ei * ei));
        if (!component) continue;
        const double cw = c * (weight[q] / 2), gg = c * cw, re = cw * rr, im = cw * (mate * ri);  // conjugate at the mirror
        for (int k = 0; k < PAIRS; ++k) v[k] = gg * zz[k];
        for (int a = 0; a < MODES; ++a) {
            v[PAIRS + 2 * a] = re * za[a];
            v[PAIRS + 2 * a + 1] = im * za[a];
        }
        for (int j = 0; j < 8; ++j) {
            double* row = sums + (long long)index[j] * CHANNELS;
            const double w = (double)w8[j];
            for (int k = 0; k < CHANNELS; ++k) atomicAdd(&row[k], w * v[k]);
        }
    }
}
#endif
"""


def _launch_setting(name: str, low: int, high: int) -> int | None:
    """The integer in the environment variable `DVA_CUDA_<name>`, from `low` to `high` (None where
    it is unset). For tuning: `tests/benchmarks/gpu.sh` benchmarks the launch shape its sweep found
    fastest; a LocalCUDACluster's workers inherit the environment of the process that starts them."""
    value = os.environ.get(f"DVA_CUDA_{name}")
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise DvaInputError(f"DVA_CUDA_{name}={value!r}: give a whole number from {low} to {high}")
    return number


# The launch shape (`tests/benchmarks/kernels.py` sweeps it on a GPU), unless set:
THREADS: int = _launch_setting("THREADS", 1, 1024) or 256  # per block (128 ran no faster on the H100)
# Threads an E-step pass aims to launch: on the H100 (which keeps ~270k resident) 2^20 ran the two
# passes 3.7% faster than 2^18 (box 128, K = 3, 8,192 particles: 0.0685 against 0.0711 s; 2^16:
# 0.0743) and whole resident iterations 5% faster (1.44 against 1.51 s, 100k particles).
RESIDENT_THREADS: int = _launch_setting("RESIDENT_THREADS", 1, 2**31 - 1) or 2**20
# Registers per thread the kernels may use (NVRTC --maxrregcount; None: the compiler's choice). At
# K = 3 the E-step's sums pass takes 128 (sm_90), so 2 blocks of 256 threads fit an SM (25% of its
# threads); capped at 96 it does not spill (5 blocks of 128 threads), at 80 or 64 it spills 100 or
# 268 bytes (3 or 4 blocks of 256). On the H100 no cap ran faster (96: 0.0705 s, 80: 0.0734, 64: 0.0741).
MAX_REGISTERS: int | None = _launch_setting("MAX_REGISTERS", 16, 255)


def launch_shape() -> dict:
    """The launch shape in use (as `tests/benchmarks/kernels.py` and `dva bench` report it)."""
    return {"threads_per_block": THREADS, "threads_aimed": RESIDENT_THREADS, "max_registers": MAX_REGISTERS}


@functools.cache
def _kernel(name: str, modes: int | None = None):
    """Kernel `name` of `SOURCE`, compiled with `MODES` defined for the E-step passes (and the
    register cap `MAX_REGISTERS` when set: clear this cache after changing it)."""
    import cupy

    options = () if modes is None else (f"-DMODES={modes}",)
    if MAX_REGISTERS is not None:
        options += (f"--maxrregcount={MAX_REGISTERS}",)
    return cupy.RawKernel(SOURCE, name, options=options)


def _run(name: str, threads: int, *args, modes: int | None = None) -> None:
    """Kernel `name` on `threads` threads in blocks of `THREADS` (nothing when there are none)."""
    if threads:
        _kernel(name, modes)(((threads + THREADS - 1) // THREADS,), (THREADS,), args)


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


# The most bytes of the sums pass's per-thread partial sums (float64): at K = 3 its 2^20 threads
# write 176 MB, at K = 10 they would write 1.1 GB (and 3.9 GB at K = 20), outside the memory
# budget of the chunks a worker keeps.
SUMS_BYTES = 512 * 2**20


def segments(particles: int, pixels: int) -> int:
    """Threads per particle in an E-step pass: enough for `RESIDENT_THREADS` in all, each with at
    least 16 of the particle's pixels."""
    return max(1, min(pixels // 16, -(-RESIDENT_THREADS // max(particles, 1))))


def _device_scalars(arguments: tuple) -> list:
    """The E-step kernel arguments as the CUDA kernels take them: complex data as float32 pairs,
    Python ints as int32, the data sign as float64."""
    import cupy

    converted = []
    for a in arguments:
        if isinstance(a, float):
            converted.append(cupy.float64(a))
        elif isinstance(a, int):
            converted.append(cupy.int32(a))
        else:
            converted.append(a.view(cupy.float32) if a.dtype == cupy.complex64 else a)
    return converted


def estep_sums_cuda(order, *arguments):
    """`dva.em.estep.estep_sums` on the GPU (the kernel arguments as there): `(n, segments, W)`
    float64, each thread's sums over its share of a particle's pixels (no stencil or slices stored)."""
    import cupy

    n, pixels = arguments[1].shape
    width = arguments[3].shape[1] // 2
    columns = width * width + width + 1
    # fewer threads per particle where their sums would pass SUMS_BYTES (K = 10: 133 columns)
    parts = min(segments(len(order), pixels), max(1, SUMS_BYTES // (8 * columns * max(n, 1))))
    out = cupy.zeros((n, parts, columns))
    tail = (out, cupy.int64(len(order)), cupy.int32(pixels), cupy.int32(parts))
    _run("estep_sums", len(order) * parts, order, *_device_scalars(arguments), *tail, modes=width - 1)
    return out


def estep_insert_cuda(order, *arguments) -> None:
    """`dva.em.estep.estep_insert` on the GPU, in place with `atomicAdd` (the kernel arguments as
    there, in order, ending with `z (n, K)`, `power (n, shells)` and `sums`)."""
    import cupy

    z, power = arguments[-3:-1]
    pixels = arguments[1].shape[1]
    parts = segments(len(order), pixels)
    tail = (cupy.int64(len(order)), cupy.int32(pixels), cupy.int32(power.shape[1]))
    _run(
        "estep_insert",
        len(order) * parts,
        order,
        *_device_scalars(arguments),
        *tail,
        cupy.int32(parts),
        modes=z.shape[1],
    )


def slice_stencil_cuda(rotations, kx, ky, box: int) -> tuple:
    """`(n·P, 8)` int32 indices and float32 weights of the trilinear neighbours in the half spectra,
    and `(n·P,)` float32 signs, of n poses' `(n, 3, 3)` central slices at frequencies `(P,)`
    (cycles/pixel), in one kernel."""
    import cupy

    points = rotations.shape[0] * kx.shape[0]
    index = cupy.empty((points, 8), cupy.int32)
    weights = cupy.empty((points, 8), cupy.float32)
    sign = cupy.empty(points, cupy.float32)
    _run(
        "slice_stencil",
        points,
        cupy.ascontiguousarray(rotations, dtype=cupy.float64),
        cupy.ascontiguousarray(kx, dtype=cupy.float64),
        cupy.ascontiguousarray(ky, dtype=cupy.float64),
        index,
        weights,
        sign,
        cupy.int64(points),
        cupy.int32(kx.shape[0]),
        cupy.int32(box),
    )
    return index, weights, sign
