"""Soft masks for volumes: threshold, dilate, raised-cosine edge (pixels; any `xp`)."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def distance_px(inside, reach: int, xp: ModuleType = np):
    """Euclidean distance in pixels from each voxel to the nearest `inside` voxel.

    Exact up to `reach` pixels (separable squared-distance transform with offsets limited to
    ±reach); farther voxels get a value above `reach` (possibly inf).
    """
    f = xp.where(inside, 0.0, xp.inf)
    for axis in range(f.ndim):
        g = xp.moveaxis(f, axis, -1)
        out = g.copy()
        for o in range(1, reach + 1):
            xp.minimum(out[..., o:], g[..., :-o] + o * o, out=out[..., o:])
            xp.minimum(out[..., :-o], g[..., o:] + o * o, out=out[..., :-o])
        f = xp.moveaxis(out, -1, axis)
    return xp.sqrt(f)


def soft_mask(volume, threshold: float, *, dilate_px: float = 0.0, soft_px: float = 0.0, xp: ModuleType = np):
    """Mask of `volume > threshold`, widened by `dilate_px`, with a raised-cosine edge `soft_px` wide.

    Returns float32 values in [0, 1]: 1 within `dilate_px` of the thresholded region, falling to 0
    over the next `soft_px` pixels (RELION's `relion_mask_create` convention).
    """
    support = volume > threshold
    dist = distance_px(support, int(np.ceil(dilate_px + soft_px)), xp)
    if soft_px > 0:
        t = xp.clip((dist - dilate_px) / soft_px, 0.0, 1.0)
        mask = 0.5 * (1.0 + xp.cos(np.pi * t))
    else:
        mask = (dist <= dilate_px).astype(xp.float64)
    return mask.astype(xp.float32)
