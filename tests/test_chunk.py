"""Preparing a chunk: centred Fourier samples in the band, and their CTFs."""

from __future__ import annotations

import numpy as np
import pytest

from dva.em import chunk as chunk_module
from dva.em.chunk import CTF_ARGUMENTS, make_band, prepare_chunk
from dva.ops.ctf import ctf_2d
from dva.ops.rotation import random_rotations


@pytest.mark.parametrize("per_batch", [None, 4])  # all at once; 4 particles at a time (the last 1)
def test_prepared_samples_and_ctfs_equal_each_particle_done_alone_in_float64(per_batch, monkeypatch):
    """Two optics groups (pixel sizes) interleaved, random shifts and CTFs: against one particle at
    a time, a float64 transform, a complex exponential for the shift and `ctf_2d` on its own."""
    rng = np.random.default_rng(2)
    n, box = 9, 16
    if per_batch is not None:
        monkeypatch.setattr(chunk_module, "PREPARE_BYTES", per_batch * 4 * box * box)
    band = make_band(box)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    rows = {
        "shift_px": rng.uniform(-5, 5, (n, 2)),
        "pixel_size_A": np.where(np.arange(n) % 3 == 0, 1.1, 0.9),
        "defocus_u_A": rng.uniform(1e4, 2e4, n),
        "defocus_v_A": rng.uniform(1e4, 2e4, n),
        "defocus_angle_rad": rng.uniform(-np.pi, np.pi, n),
        "voltage_kV": np.full(n, 300.0),
        "cs_mm": rng.uniform(1, 3, n),
        "amp_contrast": np.full(n, 0.07),
        "phase_shift_rad": rng.uniform(0, 1, n),
        "bfactor_A2": rng.uniform(0, 50, n),
        "rotation": random_rotations(n, rng),
        "ctf_scale": np.ones(n),
    }
    chunk = prepare_chunk(images, rows, band, box)
    for i in range(n):
        f = np.fft.rfft2(np.fft.ifftshift(images[i].astype(np.float64))).ravel()[band.flat]
        sx, sy = rows["shift_px"][i]
        expected = f * np.exp(-2j * np.pi * (sx * band.kx + sy * band.ky))
        np.testing.assert_allclose(chunk.y[i], expected, rtol=0, atol=2e-5 * abs(expected).max())
        pixel = rows["pixel_size_A"][i]
        ctf = ctf_2d(band.ky / pixel, band.kx / pixel, **{name: rows[name][i] for name in CTF_ARGUMENTS})
        np.testing.assert_allclose(chunk.ctf[i], ctf, rtol=0, atol=1e-6)
