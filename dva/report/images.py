"""Greyscale pictures of volumes as arrays: central slices, projections and movie frames.

Volumes are `vol[z, y, x]`; a picture is `img[row, column]` in [0, 1] with zero density at
mid-grey (0.5) for signed maps (components) so that + and − read alike.
"""

from __future__ import annotations

import numpy as np


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal central slices: z (an x–y plane), y (x–z) and x (y–z)."""
    c = volume.shape[0] // 2
    return [volume[c], volume[:, c], volume[:, :, c]]


def projections(volume: np.ndarray) -> list[np.ndarray]:
    """Sums along z, y and x."""
    return [volume.sum(axis=a) for a in range(3)]


def signed_grey(images: list[np.ndarray]) -> list[np.ndarray]:
    """Map values to [0, 1] with 0 at 0.5, scaled by the largest |value| over all images."""
    peak = max(float(np.abs(im).max()) for im in images) or 1.0
    return [0.5 + 0.5 * im / peak for im in images]


def movie_frames(mean: np.ndarray, component: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
    """uint8 frames: the three projections of `mean + t·component` side by side, for t in
    `positions` then back again (oscillating; the ends are not repeated)."""
    strips = [np.concatenate(projections(mean + t * component), axis=1) for t in positions]
    lo = min(float(s.min()) for s in strips)
    hi = max(float(s.max()) for s in strips)
    scaled = [np.round(255 * (s - lo) / ((hi - lo) or 1.0)).astype(np.uint8) for s in strips]
    return scaled + scaled[-2:0:-1]
