"""Frequency grids, shells and Butterworth filters for volumes in the centred Fourier layout."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def radius_3d(box: int, xp: ModuleType = np):
    """|k| in cycles/pixel on the centred `(box, box, box)` grid (DC at index box//2)."""
    k = (xp.arange(box) - box // 2) / box
    return xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)


def butterworth_lowpass(k, cutoff: float, order: float):
    """`1 / (1 + (k/cutoff)^(2·order))`; k and cutoff in the same units (cycles/pixel or Å⁻¹)."""
    return 1.0 / (1.0 + (k / cutoff) ** (2 * order))


def butterworth_highpass(k, cutoff: float, order: float):
    """`1 − lowpass`: removes frequencies below `cutoff`."""
    return 1.0 - butterworth_lowpass(k, cutoff, order)


def to_fourier(volume, xp: ModuleType = np):
    """Real `vol[z, y, x]` (centre at N//2) to the centred Fourier layout `fftshift(fftn(ifftshift(vol)))`."""
    return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(volume)))


def to_real(spectrum, xp: ModuleType = np):
    """Inverse of `to_fourier` for the spectrum of a real volume (Hermitian, `X(−k) = X(k)*`, as every
    spectrum dva inverts is): `irfftn` of its half, half the work of `ifftn`."""
    half = xp.fft.ifftshift(spectrum)[..., : spectrum.shape[-1] // 2 + 1]
    return xp.fft.fftshift(xp.fft.irfftn(half, s=spectrum.shape, axes=(0, 1, 2)))


def filter_real(volume, filt, xp: ModuleType = np):
    """`to_real(to_fourier(volume) · filt)` for a real volume and a real filter `(D, D, D)` that is
    even (`filt(−k) = filt(k)`, as radial filters are), through `rfftn`/`irfftn` (half the work)."""
    half = xp.fft.ifftshift(filt)[..., : volume.shape[-1] // 2 + 1]
    spectrum = xp.fft.rfftn(xp.fft.ifftshift(volume)) * half
    return xp.fft.fftshift(xp.fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2)))
