"""Fourier shell correlation of two volumes and the resolution where it crosses a threshold."""

from __future__ import annotations

import numpy as np

from dva.ops.filters import radius_3d
from dva.ops.fourier import fft

FSC_THRESHOLD = 0.143


def fsc(a: np.ndarray, b: np.ndarray, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (Å⁻¹) of shells 1 … D/2 − 1 and the FSC of `(D, D, D)` volumes `a` and `b` there.

    Shell s holds the voxels with round(|k|·D) = s (k in cycles/pixel).
    """
    box = a.shape[0]
    transforms = fft()
    fa, fb = (transforms.fftshift(transforms.fftn(transforms.ifftshift(v))) for v in (a, b))
    shell = np.rint(radius_3d(box) * box).astype(np.int64).ravel()
    inside = shell < box // 2
    s = shell[inside]
    cross = np.bincount(s, (fa.ravel() * np.conj(fb.ravel())).real[inside], minlength=box // 2)
    pa = np.bincount(s, (np.abs(fa.ravel()) ** 2)[inside], minlength=box // 2)
    pb = np.bincount(s, (np.abs(fb.ravel()) ** 2)[inside], minlength=box // 2)
    curve = cross / np.sqrt(np.maximum(pa * pb, 1e-300))
    freq = np.arange(box // 2) / (box * pixel_size_A)
    return freq[1:], curve[1:]


def resolution_A(freq: np.ndarray, curve: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """Resolution (Å) where the FSC first drops below `threshold`, linearly interpolated between
    shells; the last shell's resolution when it never does, infinity when the first shell is below."""
    below = np.flatnonzero(curve < threshold)
    if len(below) == 0:
        return float(1.0 / freq[-1])
    i = int(below[0])
    if i == 0:
        return float("inf")
    f = freq[i - 1] + (freq[i] - freq[i - 1]) * (curve[i - 1] - threshold) / (curve[i - 1] - curve[i])
    return float(1.0 / f)
