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
    value = ctf_2d(xp.asarray(ky), xp.asarray(kx), **RELION31_P1, xp=xp)
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


def test_ctf_equals_the_textbook_formula_at_random_frequencies_and_parameters():
    """Against the formula written out with the pixel's angle (arctan2) and two trigonometric terms,
    float64: astigmatism at every angle, phase plate, B-factor, the origin, batches."""
    rng = np.random.default_rng(5)
    n = 7
    ky, kx = rng.uniform(-0.5, 0.5, (2, 1, 300))
    kx[0, :3], ky[0, :3] = 0.0, (0.0, 0.2, -0.3)  # the origin and the ky axis
    p = {
        "defocus_u_A": rng.uniform(5e3, 3e4, (n, 1)),
        "defocus_v_A": rng.uniform(5e3, 3e4, (n, 1)),
        "defocus_angle_rad": rng.uniform(-np.pi, np.pi, (n, 1)),
        "voltage_kV": rng.choice([200.0, 300.0], (n, 1)),
        "cs_mm": rng.uniform(0, 3, (n, 1)),
        "amp_contrast": rng.uniform(0, 0.2, (n, 1)),
        "phase_shift_rad": rng.uniform(0, np.pi / 2, (n, 1)),
        "bfactor_A2": rng.uniform(0, 100, (n, 1)),
    }
    lam = electron_wavelength_A(p["voltage_kV"])
    s2 = kx**2 + ky**2
    defocus = 0.5 * (p["defocus_u_A"] + p["defocus_v_A"]) + 0.5 * (p["defocus_u_A"] - p["defocus_v_A"]) * np.cos(
        2 * (np.arctan2(ky, kx) - p["defocus_angle_rad"])
    )
    chi = np.pi * lam * defocus * s2 - np.pi / 2 * p["cs_mm"] * 1e7 * lam**3 * s2**2 + p["phase_shift_rad"]
    w = p["amp_contrast"]
    expected = np.exp(-p["bfactor_A2"] * s2 / 4) * (np.sqrt(1 - w**2) * np.sin(chi) + w * np.cos(chi))
    np.testing.assert_allclose(ctf_2d(ky, kx, **p), expected, rtol=0, atol=1e-12)
    no_b = {**p, "bfactor_A2": np.zeros((n, 1))}
    np.testing.assert_allclose(ctf_2d(ky, kx, **no_b), expected / np.exp(-p["bfactor_A2"] * s2 / 4), atol=1e-12)
