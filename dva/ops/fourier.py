"""Fourier-space resampling with centre-origin FFTs (`fft(ifftshift(a))`, centre at N//2)."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def fourier_crop(a, new_box: int, *, ndim: int = 2, xp: ModuleType = np):
    """Fourier-crop (downsample) the last `ndim` axes of `a` from box D to `new_box` ≤ D.

    Keeps the frequencies |k| < new_box/2 of the original (in cycles per new pixel), so the pixel
    size grows by D/new_box; values are scaled so a constant image keeps its value.
    """
    box = a.shape[-1]
    if new_box == box:
        return a
    if new_box > box:
        raise ValueError(f"fourier_crop: new box {new_box} is larger than {box}")
    axes = tuple(range(-ndim, 0))
    f = xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(a, axes=axes), axes=axes), axes=axes)
    start = box // 2 - new_box // 2
    crop = (Ellipsis, *[slice(start, start + new_box)] * ndim)
    out = xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(f[crop], axes=axes), axes=axes), axes=axes)
    return (out.real * (new_box / box) ** ndim).astype(a.dtype, copy=False)
