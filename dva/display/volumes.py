"""Output volumes of the display job: filter, Fourier downsample, real-space crop, hand flip.

All steps are linear, so they may be applied to V_0 and V_k before frames are formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dva.em.mstep import band_filter
from dva.ops.filters import filter_real
from dva.ops.fourier import fourier_crop


@dataclass(frozen=True)
class VolumeOptions:
    """What `dva display` does to every output volume, in this order."""

    filter_res_A: float | None = None  # Butterworth low-pass (Å), off when None
    filter_order: float = 1.5
    highpass_res_A: float | None = None  # Butterworth high-pass (Å), off when None
    highpass_order: float = 8.0
    downsample: int | None = None  # Fourier crop to this box (pixel size grows by D/D′)
    crop: int | None = None  # then keep the central crop³ voxels (pixel size unchanged)
    flip_hand: bool = False  # mirror z about the centre voxel


def check_options(options: VolumeOptions, box: int, pixel_size_A: float) -> None:
    """Raise ValueError with a one-line reason when the options do not fit a `box` volume."""
    down = options.downsample or box
    if down > box or down % 2 or down < 8:
        raise ValueError(f"--downsample {down}: must be even, at least 8 and at most the run's box {box}")
    if options.crop is not None and (options.crop > down or options.crop % 2 or options.crop < 8):
        raise ValueError(f"--crop {options.crop}: must be even, at least 8 and at most the box {down}")
    nyquist = 2 * pixel_size_A * box / down
    for name, res in (("--filter-res", options.filter_res_A), ("--highpass-res", options.highpass_res_A)):
        if res is not None and res < nyquist:
            raise ValueError(f"{name} {res} Å: finer than Nyquist ({nyquist:.3g} Å)")


def output_pixel_size(options: VolumeOptions, box: int, pixel_size_A: float) -> float:
    """Pixel size (Å) of the output volumes."""
    return pixel_size_A * box / (options.downsample or box)


def prepare_volume(volume, pixel_size_A: float, options: VolumeOptions, xp: ModuleType = np):
    """Apply `options` to a `(D, D, D)` volume; returns the output volume (float32)."""
    box = volume.shape[-1]
    out = volume.astype(xp.float64)
    if options.filter_res_A is not None or options.highpass_res_A is not None:
        filt = band_filter(
            box,
            pixel_size_A,
            options.filter_res_A,
            options.filter_order,
            options.highpass_res_A,
            options.highpass_order,
            xp,
        )
        out = filter_real(out, filt, xp)
    if options.downsample and options.downsample != box:
        out = fourier_crop(out, options.downsample, ndim=3, xp=xp)
    if options.crop:
        n = out.shape[-1]
        lo = n // 2 - options.crop // 2
        out = out[lo : lo + options.crop, lo : lo + options.crop, lo : lo + options.crop]
    if options.flip_hand:
        out = xp.roll(out[::-1], 1, axis=0)  # z → −z about the centre voxel D//2
    return out.astype(xp.float32)
