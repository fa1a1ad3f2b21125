"""The few kernels that differ between NumPy and CuPy."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def scatter_add(values, index, size: int, xp: ModuleType = np):
    """`out[index[j]] += values[j]` into a new float64 array of length `size` (real `values`)."""
    if xp is np:
        return np.bincount(index, weights=values, minlength=size)
    import cupyx

    out = xp.zeros(size, dtype=xp.float64)
    cupyx.scatter_add(out, index, values.astype(xp.float64))
    return out
