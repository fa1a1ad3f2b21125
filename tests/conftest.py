"""Shared fixtures: the real-format files beside the checkout (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

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


def to_host(a):
    """NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else a
