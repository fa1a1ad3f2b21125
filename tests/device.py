"""A CuPy stand-in on the CPU that refuses what CuPy refuses, so dva's GPU code path (its
`xp is not np` branches, the kernels' launches, the workers' CuPy backend) runs here and fails
where it would fail on a GPU.

Its arrays (`DeviceArray`) hold NumPy arrays but, as CuPy's do, refuse to mix with NumPy arrays:
a NumPy array given to a stand-in function, ufunc, method or kernel raises TypeError (only
`asarray`/`array` copy host arrays in, and `*_like` read their shape), and `np.asarray` of a device
array raises TypeError
("implicit conversion"); `.get()` copies one back. NumPy functions called on device arrays run as
CuPy's (`__array_function__`), reductions give 0-d device arrays. It is stricter than CuPy 14
where CuPy duck-types (`cupy.sum` of a NumPy array quietly runs NumPy's own `sum`): dva should not
rely on that. `RawKernel` runs the kernels of
`dva.ops.kernels.SOURCE` compiled for the CPU with g++: a loop over the grid, `atomicAdd` a plain
add (`cpu_kernels`). The device memory its arrays hold is counted (`live_device_bytes`,
`peak_device_bytes`): what a run leaves behind on the "device" shows there.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import threading
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.fft
from numpy.lib.mixins import NDArrayOperatorsMixin

from dva.ops.kernels import SOURCE

CUDA_ON_CPU = r"""
#include <cmath>
using std::floor; using std::fmax; using std::fmin;
#define __dadd_rn(a, b) ((a) + (b))
#define __dmul_rn(a, b) ((a) * (b))
struct Dim { unsigned x; };
static thread_local Dim blockIdx, threadIdx, blockDim;  // (in-process workers run kernels side by side)
#define __global__
#define __device__
static double atomicAdd(double* a, double v) { double old = *a; *a += v; return old; }
"""
LAUNCHERS = r"""
#define GRID(call) blockDim.x = threads; \
    for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) \
        for (threadIdx.x = 0; threadIdx.x < threads; ++threadIdx.x) call;
#define LAUNCH unsigned blocks, unsigned threads
#define RUN(name, T, S) extern "C" void run_##name(LAUNCH, const S* s, const int* i, const float* w, T* o, \
    long long points, int channels) { GRID(name(s, i, w, o, points, channels)) }
RUN(gather_float32, float, float)
RUN(gather_float64, double, double)
RUN(insert_float64, double, double)
extern "C" void run_slice_stencil(LAUNCH, const double* r, const double* kx, const double* ky, int* i, float* w,
    float* s, long long points, int pixels, int box) { GRID(slice_stencil(r, kx, ky, i, w, s, points, pixels, box)) }
#ifdef MODES
extern "C" void run_estep_sums(LAUNCH, const long long* o, const double* r, const float* y, const float* c,
    const float* v, const double* kx, const double* ky, const double* w, const unsigned char* in, int box,
    double sign, double* out, long long particles, int pixels, int segments) {
    GRID(estep_sums(o, r, y, c, v, kx, ky, w, in, box, sign, out, particles, pixels, segments)) }
extern "C" void run_estep_insert(LAUNCH, const long long* o, const double* r, const float* y, const float* c,
    const float* v, const double* kx, const double* ky, const double* w, const unsigned char* in, const int* shell,
    const double* m, int box, double sign, const double* alpha, const double* z, double* power, double* sums,
    long long particles, int pixels, int shells, int segments) {
    GRID(estep_insert(o, r, y, c, v, kx, ky, w, in, shell, m, box, sign, alpha, z, power, sums, particles, pixels,
                      shells, segments)) }
#endif
"""
IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
)
HOST_TO_DEVICE = ("asarray", "array")  # the stand-in functions that copy NumPy arrays to the device
NOT_IN_CUPY = ("ctypes", "tofile")  # NumPy array attributes CuPy arrays lack


def cpu_kernels(folder: Path) -> Callable[[tuple], ctypes.CDLL] | None:
    """`compile(options)`: `SOURCE` built for the CPU in `folder` with those `-D` options (each
    build once); None without g++."""
    if shutil.which("g++") is None:
        return None
    (folder / "k.cpp").write_text(CUDA_ON_CPU + SOURCE + LAUNCHERS)
    built = {}
    lock = threading.Lock()  # in-process workers ask for the same build at once

    def compile(options: tuple = ()) -> ctypes.CDLL:
        with lock:
            if options not in built:
                library = folder / f"k{len(built)}.so"
                command = ["g++", "-O1", "-shared", "-fPIC", *options]
                subprocess.run([*command, "-o", str(library), str(folder / "k.cpp")], check=True)
                built[options] = ctypes.CDLL(str(library))
            return built[options]

    return compile


def _unwrap(value, where: str):
    """`value` with its device arrays as the NumPy arrays they hold (in lists, tuples and dicts
    too); a NumPy array raises TypeError, as CuPy does."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray):
        raise TypeError(f"{where}: a NumPy array {value.shape} {value.dtype} where CuPy takes only device arrays")
    if isinstance(value, list | tuple):
        return type(value)(_unwrap(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, where) for k, v in value.items()}
    return value


def _wrap(value):
    """NumPy results as device arrays (scalars as 0-d arrays, as CuPy's reductions give)."""
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_wrap(v) for v in value)
    if hasattr(value, "_fields"):  # NumPy's named results (eigh, svd, qr)
        return type(value)(*(_wrap(v) for v in value))
    return value


_LIVE: dict[int, int] = {}  # bytes of the device buffers alive, by id of the NumPy array owning each
_PEAK = [0]  # the most bytes alive at once since `reset_peak`
_LIVE_LOCK = threading.Lock()


def live_device_bytes() -> int:
    """Bytes of "device memory" that device arrays hold now (each buffer once, views not again)."""
    with _LIVE_LOCK:
        return sum(_LIVE.values())


def peak_device_bytes() -> int:
    return _PEAK[0]


def reset_peak() -> None:
    _PEAK[0] = live_device_bytes()


def _track(array: np.ndarray) -> None:
    """Count the buffer under `array` as device memory until the array owning it is gone."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    with _LIVE_LOCK:
        if id(root) in _LIVE:
            return
        _LIVE[id(root)] = root.nbytes
        _PEAK[0] = max(_PEAK[0], sum(_LIVE.values()))
    weakref.finalize(root, _forget, id(root))


def _forget(key: int) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(key, None)


class DeviceArray(NDArrayOperatorsMixin):
    """An array "on the device": a NumPy array that will not mix with NumPy arrays (see module)."""

    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray):
        self._a = array
        _track(array)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"cupy.{ufunc.__name__}"
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_unwrap(inputs, where), **_unwrap(kwargs, where))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        where = f"numpy.{func.__name__} on device arrays"
        return _wrap(func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    def get(self, stream=None, out: np.ndarray | None = None) -> np.ndarray:
        """A NumPy copy, or the values written into `out` (CuPy's checks: dtype, shape, a
        C-contiguous `out`)."""
        if out is None:
            return self._a.copy()
        if not isinstance(out, np.ndarray):
            raise TypeError("`out` must be a numpy.ndarray")
        if out.dtype != self._a.dtype:
            raise TypeError(f"{self._a.dtype} array cannot be set to {out.dtype} array")
        if out.shape != self._a.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self._a.shape}, actual shape: {out.shape}")
        if not out.flags.c_contiguous:
            raise RuntimeError("`out` cannot be specified when copying to non-contiguous ndarray")
        out[...] = self._a
        return out

    def __getattr__(self, name: str):
        if name in NOT_IN_CUPY or name.startswith("__"):  # (NumPy would read __array_interface__)
            raise AttributeError(f"cupy.ndarray has no attribute {name!r}")
        value = getattr(self._a, name)
        if not callable(value):
            return _wrap(value) if isinstance(value, np.ndarray) else value

        def method(*args, **kwargs):
            where = f"cupy.ndarray.{name}"
            return _wrap(value(*_unwrap(args, where), **_unwrap(kwargs, where)))

        return method

    @staticmethod
    def _index(key):
        """`key` with its device arrays unwrapped (CuPy takes NumPy arrays as indices too)."""
        if isinstance(key, tuple):
            return tuple(k._a if isinstance(k, DeviceArray) else k for k in key)
        return key._a if isinstance(key, DeviceArray) else key

    def __getitem__(self, key):
        return _wrap(self._a[self._index(key)])

    def __setitem__(self, key, value):
        # CuPy copies NumPy values over too
        self._a[self._index(key)] = value._a if isinstance(value, DeviceArray) else value

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __float__(self) -> float:
        return float(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __complex__(self) -> complex:
        return complex(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __index__(self) -> int:
        return self._a.__index__()

    def __repr__(self) -> str:
        return f"device {self._a!r}"

    def __reduce__(self):
        return DeviceArray, (self._a,)


def _device_function(name: str, function: Callable) -> Callable:
    """`function` (NumPy's) as the stand-in's: device arrays in and out."""

    def call(*args, **kwargs):
        if name in HOST_TO_DEVICE:
            source = args[0]._a if isinstance(args[0], DeviceArray) else np.array(args[0], copy=True)
            return _wrap(getattr(np, name)(source, *args[1:], **kwargs))
        if name.endswith("_like") and isinstance(args[0], np.ndarray):  # CuPy reads only its shape and dtype
            args = (DeviceArray(np.empty_like(args[0])), *args[1:])
        where = f"cupy.{name}"
        return _wrap(function(*_unwrap(args, where), **_unwrap(kwargs, where)))

    return call


def _device_namespace(numpy_module: types.ModuleType, name: str) -> types.ModuleType:
    """A module whose functions are `numpy_module`'s on device arrays; types and constants as they are."""
    module = types.ModuleType(name)

    def attribute(key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        value = getattr(numpy_module, key)
        if isinstance(value, type | np.dtype) or not callable(value):
            return value
        return _device_function(key, value)

    module.__getattr__ = attribute
    return module


C_TYPES = {"long long": np.int64, "double": np.float64, "float": np.float32, "int": np.int32, "unsigned char": np.uint8}


def kernel_parameters(source: str) -> dict[str, list[tuple[np.dtype, bool]]]:
    """Each `extern "C" __global__` kernel's parameters in `source`: (dtype, is a pointer)."""
    found = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source):
        found[name] = []
        for param in params.split(","):
            kind, star = re.fullmatch(r"\s*(?:const\s+)?([a-z ]+?)\s*(\*?)\s*\w+\s*", param).groups()
            found[name].append((np.dtype(C_TYPES[kind]), bool(star)))
    return found


class _RawKernelOnCpu:
    """`cupy.RawKernel` stand-in: runs the kernel compiled for the CPU on the grid it is launched
    with, checking that each argument is what the kernel declares: a C-contiguous device array of
    its pointer's type, or a NumPy scalar of its type (CuPy passes scalars by their own width: a
    wrong one misplaces every later argument on the GPU)."""

    launched: ClassVar[list[str]] = []  # names, in order
    parameters: ClassVar[dict] = kernel_parameters(SOURCE)

    def __init__(self, compile: Callable, source: str, name: str, options: tuple = ()):
        assert source == SOURCE
        defines = tuple(o for o in options if o.startswith("-D"))
        assert all(o.startswith(("-D", "--maxrregcount=")) for o in options), options  # (the cap means nothing to g++)
        self.name, self.run = name, getattr(compile(defines), f"run_{name}")

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        assert len(block) == 1 and len(grid) == 1 and 0 < block[0] <= 1024 and 0 < grid[0] < 2**31  # CUDA's limits
        self.launched.append(self.name)
        declared = self.parameters[self.name]
        assert len(args) == len(declared), f"kernel {self.name}: {len(args)} arguments, not {len(declared)}"
        scalars = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float64: ctypes.c_double}
        converted = [ctypes.c_uint(grid[0]), ctypes.c_uint(block[0])]
        for i, (a, (dtype, pointer)) in enumerate(zip(_unwrap(args, f"kernel {self.name}"), declared, strict=True)):
            where = f"kernel {self.name} argument {i}"
            if pointer:
                assert isinstance(a, np.ndarray) and a.dtype == dtype, f"{where}: {a!r:.60} for a {dtype} pointer"
                assert a.flags.c_contiguous, f"{where}: a strided array"  # what the kernels index
                converted.append(a.ctypes.data_as(ctypes.c_void_p))
            else:
                assert isinstance(a, np.generic) and a.dtype == dtype, f"{where}: {a!r} for a {dtype} scalar"
                converted.append(scalars[dtype.type](a.item()))
        self.run(*converted)


class _Stream:
    def synchronize(self) -> None:
        pass


DEVICES = 4  # GPUs the stand-in's "machine" has


class _Device:
    """`cupy.cuda.Device`: `use()` records the index made current."""

    used: ClassVar[list[int]] = []

    def __init__(self, index: int = 0):
        if not 0 <= index < DEVICES:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {index}")
        self.index = index

    def use(self) -> None:
        _Device.used.append(self.index)


class _MemoryPool:
    """CuPy's device and pinned memory pools (the stand-in's arrays are freed when they go):
    `free_all_blocks` records the device bytes still alive when it is called."""

    live_at_free: ClassVar[list[int]] = []

    def free_all_blocks(self) -> None:
        _MemoryPool.live_at_free.append(live_device_bytes())


def cupy_standin(compile: Callable, free_bytes: int = 8 << 30) -> tuple[types.ModuleType, types.ModuleType]:
    """The `cupy` and `cupyx` stand-in modules, with `free_bytes` of "device memory" free."""
    cupy = _device_namespace(np, "cupy")
    base = cupy.__getattr__
    # FFTs as the NumPy path computes them (`dva.ops.fourier.fft`): the two paths' results compare exactly
    submodules = {
        "fft": _device_namespace(scipy.fft, "cupy.fft"),
        "linalg": _device_namespace(np.linalg, "cupy.linalg"),
    }
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(memGetInfo=lambda: (free_bytes, 2 * free_bytes), getDeviceCount=lambda: DEVICES),
        get_current_stream=_Stream,
        Device=_Device,
    )
    extra = {
        "ndarray": DeviceArray,
        "RawKernel": lambda source, name, options=(): _RawKernelOnCpu(compile, source, name, options),
        "cuda": cuda,
        "get_default_memory_pool": _MemoryPool,
        "get_default_pinned_memory_pool": _MemoryPool,
        **submodules,
    }
    cupy.__getattr__ = lambda key: extra[key] if key in extra else base(key)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype=np.float64: np.empty(shape, dtype)  # host memory, as CuPy's
    return cupy, cupyx
