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


def stencil_gather(volumes, index, weights, xp: ModuleType = np):
    """`Σ_j weights[:, j] · volumes[index[:, j]]`: samples `(m, C)` of volumes `(D³, C)` at a stencil
    `(m, 8)` (real or complex volumes; the result has their dtype)."""
    if xp is not np:
        out = volumes.take(index[:, 0], axis=0) * weights[:, 0, None]
        for j in range(1, 8):
            out += volumes.take(index[:, j], axis=0) * weights[:, j, None]
        return out
    # One pass over the stencil for every channel: a sparse (m, D³) matrix times the volumes,
    # complex ones as their real and imaginary parts side by side.
    real = np.ascontiguousarray(volumes).view(volumes.real.dtype)
    return np.ascontiguousarray(_stencil_matrix(index, weights, len(volumes), real.dtype) @ real).view(volumes.dtype)


def stencil_insert(values, index, weights, out, xp: ModuleType = np) -> None:
    """Adjoint of `stencil_gather` for real values `(m, C)`: adds them into `out (C, D³)` (float64)
    in place."""
    if xp is not np:
        flat = index.reshape(-1)
        for c in range(values.shape[1]):
            out[c] += scatter_add((weights * values[:, c, None]).reshape(-1), flat, out.shape[1], xp)
        return
    out += (_stencil_matrix(index, weights, out.shape[1], values.dtype).T @ values).T


def _stencil_matrix(index, weights, size: int, dtype):
    """The CSR matrix `(m, size)` whose row i holds `weights[i]` at columns `index[i]` (SciPy)."""
    import scipy.sparse

    m, width = index.shape
    indptr = np.arange(0, m * width + 1, width, dtype=index.dtype)
    return scipy.sparse.csr_matrix((weights.astype(dtype).ravel(), index.ravel(), indptr), shape=(m, size))
