"""The CUDA kernels' source, compiled for the CPU (a loop over the grid, `atomicAdd` as a plain add),
against direct sums: their index arithmetic is checked without a GPU. On a GPU, `test_slice` runs
them through CuPy."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from dva.ops.kernels import SOURCE, THREADS
from dva.ops.rotation import random_rotations
from dva.ops.slice import slice_coordinates, trilinear_stencil

CUDA_ON_CPU = r"""
struct Dim { unsigned x; };
static Dim blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
static double atomicAdd(double* a, double v) { double old = *a; *a += v; return old; }
"""
LAUNCHERS = r"""
#define GRID(total, call) blockDim.x = THREADS; \
    for (blockIdx.x = 0; blockIdx.x < ((total) + THREADS - 1) / THREADS; ++blockIdx.x) \
        for (threadIdx.x = 0; threadIdx.x < THREADS; ++threadIdx.x) call;
#define RUN(name, T, S) extern "C" void run_##name(const S* s, const int* i, const float* w, T* o, \
    long long points, int channels) { GRID(points * channels, name(s, i, w, o, points, channels)) }
RUN(gather_float32, float, float)
RUN(gather_float64, double, double)
RUN(insert_float64, double, double)
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the kernels for the CPU")
    folder = tmp_path_factory.mktemp("kernels")
    (folder / "k.cpp").write_text(CUDA_ON_CPU + SOURCE + LAUNCHERS)
    subprocess.run(
        ["g++", "-O1", "-shared", "-fPIC", f"-DTHREADS={THREADS}", "-o", str(folder / "k.so"), str(folder / "k.cpp")],
        check=True,
    )
    return ctypes.CDLL(str(folder / "k.so"))


def _call(kernels, name: str, source, index, weights, out) -> None:
    """Kernel `name` over the grid, on C-contiguous arrays (as `dva.ops.kernels` passes them)."""
    arrays = [np.ascontiguousarray(a) for a in (source, index, weights)]
    assert out.flags.c_contiguous
    getattr(kernels, f"run_{name}")(
        *(a.ctypes.data_as(ctypes.c_void_p) for a in (*arrays, out)),
        ctypes.c_longlong(len(index)),
        ctypes.c_int(source.shape[1] if name.startswith("insert") else out.shape[1]),
    )


def _stencil(box: int, rng):
    kx, ky = np.meshgrid(np.fft.fftfreq(box), np.fft.fftfreq(box))
    keep = np.hypot(kx, ky) * box <= box // 2 - 1
    coords = slice_coordinates(random_rotations(6, rng), kx[keep], ky[keep], box)
    return trilinear_stencil(coords, box)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gather_kernel_equals_direct_sums(kernels, dtype):
    rng = np.random.default_rng(4)
    box = 12
    index, weights = _stencil(box, rng)
    volumes = rng.normal(size=(box**3, 5)).astype(dtype)
    out = np.full((len(index), 5), np.nan, dtype)
    _call(kernels, f"gather_{np.dtype(dtype).name}", volumes, index, weights, out)
    expected = sum(weights[:, j, None].astype(np.float64) * volumes[index[:, j]] for j in range(8))
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_insert_kernel_equals_direct_sums(kernels):
    rng = np.random.default_rng(5)
    box = 12
    index, weights = _stencil(box, rng)
    values = rng.normal(size=(len(index), 3))
    out = rng.normal(size=(box**3, 3))
    expected = out.copy()
    for j in range(8):
        for c in range(3):
            np.add.at(expected[:, c], index[:, j], weights[:, j].astype(np.float64) * values[:, c])
    _call(kernels, "insert_float64", values, index, weights, out)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
