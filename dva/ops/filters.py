"""Frequency grids, shells and Butterworth filters for volumes in the centred Fourier layout."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.ops.fourier import fft, volume_threads


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


def half_spectrum(volume, xp: ModuleType = np):
    """Real `vol[z, y, x]` (centre at D//2) to its half spectrum `(D, D, D//2)`: the `x ≥ D//2` half
    of the centred layout `fftshift(fftn(ifftshift(vol)))` (`[z, y, x − D//2]`, kx = 0 … D/2 − 1;
    the rest is its conjugate mirror), by `rfftn` (half the work of `fftn`)."""
    transforms = fft(xp)
    half = transforms.rfftn(transforms.ifftshift(volume), **volume_threads(xp))[..., : volume.shape[-1] // 2]
    return transforms.fftshift(half, axes=(0, 1))


def to_real(half, xp: ModuleType = np):
    """Inverse of `half_spectrum` for a half spectrum `(D, D, D//2)` whose kx = 0 plane is
    conjugate-symmetric (as every spectrum dva inverts is); the kx = D/2 plane, outside every band,
    is taken as zero. By `irfftn`."""
    box, transforms = half.shape[0], fft(xp)
    spectrum = xp.zeros((box, box, box // 2 + 1), dtype=xp.result_type(half.dtype, xp.complex64))
    spectrum[..., : box // 2] = transforms.ifftshift(half, axes=(0, 1))
    return transforms.fftshift(transforms.irfftn(spectrum, s=(box, box, box), axes=(0, 1, 2), **volume_threads(xp)))


def filter_real(volume, filt, xp: ModuleType = np):
    """A real volume times a real filter `(D, D, D)` in the centred Fourier layout that is even
    (`filt(−k) = filt(k)`, as radial filters are), through `rfftn`/`irfftn` (half the work). A
    filter is a circular convolution, which commutes with circular shifts: the volume needs no
    `ifftshift` before and `fftshift` after (each a copy of it; at box 256 a third of the time)."""
    transforms = fft(xp)
    half = transforms.ifftshift(filt)[..., : volume.shape[-1] // 2 + 1]
    threads = volume_threads(xp)
    return transforms.irfftn(transforms.rfftn(volume, **threads) * half, s=volume.shape, axes=(0, 1, 2), **threads)
