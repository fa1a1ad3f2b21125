"""dva: 3D Variability Analysis for cryo-EM on dask."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from dva.errors import DvaInputError

try:
    __version__ = version("dva")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["DvaInputError", "__version__"]
