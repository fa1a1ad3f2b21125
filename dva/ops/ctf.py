"""Contrast transfer function in RELION's sign convention (DESIGN.md §1).

Particles are white on black and `CTF(0) = +w` (the amplitude contrast). Defocus in Å,
positive is underfocus; angles in radians; frequencies in Å⁻¹.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kV * 1e3
    return 12.2643247 / (v * (1 + 0.978466e-6 * v)) ** 0.5


def frequency_grid_2d(box: int, pixel_size_A: float, *, rfft: bool = False, xp: ModuleType = np) -> tuple:
    """`(ky, kx)` in Å⁻¹ for a `box`² image in unshifted FFT order (`fftfreq` layout).

    With `rfft=True` the grid is the half-plane `(box, box//2 + 1)` of `rfftn`.
    """
    ky = xp.fft.fftfreq(box) / pixel_size_A
    kx = (xp.fft.rfftfreq(box) if rfft else xp.fft.fftfreq(box)) / pixel_size_A
    return ky[:, None], kx[None, :]


def ctf_2d(
    ky,
    kx,
    *,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_rad,
    voltage_kV,
    cs_mm,
    amp_contrast,
    phase_shift_rad=0.0,
    bfactor_A2=0.0,
    scale=1.0,
    xp: ModuleType = np,
):
    """CTF at frequencies `(ky, kx)` (Å⁻¹), RELION sign; every argument broadcasts elementwise.

    For per-particle parameters `(n,)` on an `(H, W)` grid pass them as `(n, 1, 1)`.
    """

    def per(p):
        return xp.asarray(p, dtype=xp.float64)

    s2 = kx * kx + ky * ky
    # cos 2(α − θ) of the pixel's direction α without α itself (no arctan2, no cos per pixel and
    # particle): cos 2α = (kx² − ky²)/s², sin 2α = 2·kx·ky/s², and α = 0 at the origin.
    nonzero = s2 > 0
    safe = xp.where(nonzero, s2, 1.0)
    cos2a = xp.where(nonzero, (kx * kx - ky * ky) / safe, 1.0)
    sin2a = 2 * kx * ky / safe
    lam = electron_wavelength_A(per(voltage_kV))
    du, dv, ang = per(defocus_u_A), per(defocus_v_A), per(defocus_angle_rad)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * (cos2a * xp.cos(2 * ang) + sin2a * xp.sin(2 * ang))
    cs_A = per(cs_mm) * 1e7
    chi = np.pi * lam * defocus * s2 - 0.5 * np.pi * cs_A * lam**3 * s2 * s2 + per(phase_shift_rad)
    # √(1 − w²)·sin χ + w·cos χ, as one sine
    ctf = xp.sin(chi + xp.arcsin(per(amp_contrast)))
    bfactor = per(bfactor_A2)
    envelope = xp.exp(-bfactor * s2 / 4) if bool(xp.any(bfactor)) else 1.0
    return per(scale) * envelope * ctf
