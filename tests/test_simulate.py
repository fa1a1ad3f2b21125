from __future__ import annotations

from dataclasses import replace

import numpy as np

from dva.io.mrc import StackReader
from dva.io.star import read_star
from dva.ops.ctf import ctf_2d, frequency_grid_2d
from dva.sim.phantom import blob_state, make_phantom, project_blobs
from dva.sim.simulate import PRESETS, SUBUNIT_CONTRAST, clean_images, draw, simulate_dataset


def test_noise_level_and_signal_match_the_record(tmp_path):
    sim = simulate_dataset(tmp_path, "tiny", particles=400, seed=5)
    truth = np.load(sim / "truth" / "truth.npz")
    images = StackReader(sim / "particles.mrcs").read(np.arange(400))
    # Rebuild the noiseless images from the written metadata alone (poses, shifts, CTF of the star).
    table = read_star(sim / "particles.star")
    p = PRESETS["tiny"]
    phantom = make_phantom(p.box, p.pixel_size_A, np.random.default_rng(5))
    phantom = replace(phantom, amplitude=np.where(phantom.optional, SUBUNIT_CONTRAST, 1.0) * phantom.amplitude)
    centres, amplitude = blob_state(phantom, truth["latent"], truth["present"])
    proj = project_blobs(
        centres, phantom.sigma_A, amplitude, table["rotation"].values, table["shift_px"].values, p.box, p.pixel_size_A
    )
    ky, kx = frequency_grid_2d(p.box, p.pixel_size_A)
    ctf = ctf_2d(
        ky,
        kx,
        defocus_u_A=table["defocus_u_A"].values[:, None, None],
        defocus_v_A=table["defocus_v_A"].values[:, None, None],
        defocus_angle_rad=table["defocus_angle_rad"].values[:, None, None],
        voltage_kV=table["voltage_kV"].values[:, None, None],
        cs_mm=table["cs_mm"].values[:, None, None],
        amp_contrast=table["amp_contrast"].values[:, None, None],
    )
    clean = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(proj, axes=(-2, -1))) * ctf).real, axes=(-2, -1))
    noise = images - clean
    assert abs(noise.std() / truth["noise_sigma"] - 1) < 0.02
    assert abs(clean.var(axis=(1, 2)).mean() / noise.var() / float(truth["snr"]) - 1) < 0.15
    # White noise: uncorrelated with the signal.
    assert abs(np.corrcoef(noise.ravel(), clean.ravel())[0, 1]) < 0.02


def test_draws_cover_the_states():
    d = draw(4000, 64, np.random.default_rng(0))
    assert d.latent.min() < -0.95 and d.latent.max() > 0.95
    assert 0.45 < d.present.mean() < 0.55
    assert (d.defocus_u_A >= d.defocus_v_A).all()
    assert np.abs(d.shift_px).max() <= 0.08 * 64


def test_clean_images_have_the_relion_sign():
    # At DC the CTF is +w: a positive density projects to a positive mean (white on black).
    p = PRESETS["tiny"]
    rng = np.random.default_rng(1)
    phantom = make_phantom(p.box, p.pixel_size_A, rng)
    d = draw(16, p.box, rng)
    assert (clean_images(phantom, d, slice(0, 16)).mean(axis=(1, 2)) > 0).all()
