from __future__ import annotations

import numpy as np
import pytest

from dva.ops.ctf import ctf_2d, electron_wavelength_A, frequency_grid_2d

RELION31_P1 = {
    "defocus_u_A": 13108.082418,
    "defocus_v_A": 12845.582418,
    "defocus_angle_rad": np.deg2rad(-160.39),
    "voltage_kV": 300.0,
    "cs_mm": 0.01,
    "amp_contrast": 0.1,
}


@pytest.mark.parametrize(("k", "expected"), [((0.05, 0.0), 0.851664), ((0.03, 0.04), 0.855729), ((0.0, 0.1), 0.978154)])
def test_design_check_values(k, expected, xp):
    kx, ky = k
    value = ctf_2d(xp.asarray(ky), xp.asarray(kx), **RELION31_P1)
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_wavelength_300kV():
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, abs=1e-6)


def test_dc_is_amplitude_contrast_and_batches_broadcast():
    ky, kx = frequency_grid_2d(32, 1.5)
    params = {k: np.full((3, 1, 1), v) for k, v in RELION31_P1.items()}
    c = ctf_2d(ky, kx, **params)
    assert c.shape == (3, 32, 32)
    np.testing.assert_allclose(c[:, 0, 0], 0.1)
    single = ctf_2d(ky, kx, **RELION31_P1)
    np.testing.assert_allclose(c[1], single)


def test_rfft_grid_is_the_half_plane():
    ky, kx = frequency_grid_2d(16, 2.0, rfft=True)
    full_y, full_x = frequency_grid_2d(16, 2.0)
    assert kx.shape == (1, 9)
    np.testing.assert_allclose(ky, full_y)
    np.testing.assert_allclose(kx[0, :8], full_x[0, :8])
    assert kx[0, 8] == pytest.approx(0.25)
