"""Masks for 3DVA: read, check against the particles' box and pixel size, Fourier-crop to match."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dva.errors import DvaInputError
from dva.io.mrc import read_volume
from dva.ops.fourier import fourier_crop

RELATIVE_TOLERANCE = 1e-3  # pixel sizes and physical box extents agree to 0.1%


def load_mask(path: str | Path, box: int, pixel_size_A: float) -> np.ndarray:
    """The mask at `path` as float32 `(box, box, box)` in [0, 1], matched to the particles.

    The mask's voxel size comes from its header (a volume's only record); a header voxel size of
    0 is taken to mean the particles' pixel size. A mask of the same box and pixel size is used
    as is; one covering the same physical extent at a finer sampling (a larger box) is
    Fourier-cropped to `box`. Anything else is an error naming the file.
    """
    path = Path(path)
    mask, voxel = read_volume(path)
    size = mask.shape[0]
    voxel = voxel if voxel > 0 else pixel_size_A * box / size
    same_extent = abs(size * voxel - box * pixel_size_A) <= RELATIVE_TOLERANCE * box * pixel_size_A
    if not same_extent or size < box:
        raise DvaInputError(
            f"{path}: mask box {size} at {voxel:.4g} Å cannot be matched to the particles' box {box} "
            f"at {pixel_size_A:.4g} Å (it must cover the same extent, {box * pixel_size_A:.4g} Å)"
        )
    if size > box:
        mask = fourier_crop(mask, box, ndim=3)
    return np.clip(mask, 0.0, 1.0).astype(np.float32)
