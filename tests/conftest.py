"""Shared fixtures: the real-format files beside the checkout (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FORMATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "formats"


@pytest.fixture(scope="session")
def formats() -> Path:
    """`../shared/data/formats`, or skip."""
    if not FORMATS.is_dir():
        pytest.skip("../shared/data/formats is absent")
    return FORMATS


@pytest.fixture(scope="session")
def drgn(formats: Path) -> Path:
    return formats / "cryodrgn"


def load_pickle(path: Path):
    """Trusted fixture pickles (cryoDRGN's parsed output); dva itself never unpickles."""
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: NumPy always, CuPy where a CUDA device is visible."""
    if request.param == "cupy":
        return _cupy_or_skip()
    import numpy

    return numpy


@pytest.fixture(scope="session")
def cpu_kernels(tmp_path_factory):
    """`compile(options)`: the CUDA kernels built for the CPU (`tests.device.cpu_kernels`), or skip."""
    from tests.device import cpu_kernels

    compile = cpu_kernels(tmp_path_factory.mktemp("kernels"))
    if compile is None:
        pytest.skip("no g++ to compile the kernels for the CPU")
    return compile


@pytest.fixture
def numpy_as_cupy(cpu_kernels, monkeypatch):
    """The CuPy stand-in (`tests.device`) as `cupy` and `cupyx` for one test: dva's GPU code path
    runs on the CPU, refusing host arrays where CuPy would."""
    import sys

    from dva.engine import tasks
    from dva.ops import kernels
    from tests.device import cupy_standin

    cupy, cupyx = cupy_standin(cpu_kernels)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    caches = (kernels._kernel, tasks._band)  # no stand-in kernels or bands left for a real CuPy
    for cache in caches:
        cache.cache_clear()
    yield cupy
    for cache in caches:
        cache.cache_clear()


def to_host(a):
    """NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else a


def to_fourier(volume, xp=np):
    """The centred full Fourier layout `fftshift(fftn(ifftshift(vol)))` (the reference for the half
    spectra of `dva.ops.filters.half_spectrum`)."""
    return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(volume)))


def half_of(full, box: int):
    """The `x ≥ D//2` half `(C, half_rows)` of full-grid channels `(C, D³)`: the workers' half spectra."""
    return full.reshape(len(full), box, box, box)[..., box // 2 :].reshape(len(full), -1)


def mirror(volumes, xp=np):
    """`out[..., i] = volumes[..., D − i]` on the last three axes of centred `(..., D, D, D)` grids:
    the voxel at −k."""
    axes = (-3, -2, -1)
    return xp.roll(xp.flip(volumes, axis=axes), 1, axis=axes)


def unfold(half, box: int, sign: float, xp=np):
    """Full-grid channels `(C, D³)` from half-spectrum sums `(C, half_rows)`, written out: the half
    placed at `x ≥ D//2`, then `x + sign·mirror(x)` over all three axes (the reference for
    `complete_plane`, `completed_rows` and the half-spectrum solves)."""
    full = xp.zeros((len(half), box, box, box), dtype=half.dtype)
    full[..., box // 2 :] = half.reshape(len(half), box, box, box // 2)
    return (full + sign * mirror(full, xp)).reshape(len(half), -1)
