"""Band-limited work: only the Fourier pixels where the filters leave weight above a tolerance.

References: brute-force trilinear stencils at random poses (which voxels a sample reads), and the
same E/M pass over all pixels in float64 terms."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dva.em.chunk import Chunk, filter_pixels, make_band
from dva.em.estep import em_statistics
from dva.em.mean import mean_statistics
from dva.em.model import Model, fourier_stack
from dva.em.mstep import band_filter, random_components, regularize, solve_components
from dva.engine.tasks import to_numpy
from dva.ops.rotation import random_rotations
from dva.ops.slice import gather, gridding_correction
from tests.conftest import to_fourier
from tests.stencil import slice_coordinates, trilinear_stencil


def test_band_is_the_disc_in_the_rfft2_layouts_order():
    box = 32
    band = make_band(box)
    assert np.all(np.diff(band.flat) > 0)  # rows of ky, kx along each: neighbouring voxels in turn
    ky, kx = np.meshgrid(np.fft.fftfreq(box), np.fft.rfftfreq(box), indexing="ij")
    np.testing.assert_array_equal(band.flat, np.flatnonzero(np.hypot(kx, ky).ravel() * box <= box // 2 - 1))


@pytest.mark.parametrize(("lowpass", "highpass"), [(20.0, None), (20.0, 60.0)])
def test_dropped_pixels_read_only_voxels_below_the_tolerance(lowpass, highpass):
    box, pixel, tol = 64, 2.0, 0.05
    filt = band_filter(box, pixel, lowpass, 1.5, highpass, 8.0)
    band = make_band(box)
    kept = filter_pixels(band, filt, tol)
    assert (band.radius[kept].min() > 0) == (highpass is not None) and not kept.all()  # DC dropped by a high-pass
    poses = random_rotations(50, np.random.default_rng(1))
    index, _ = trilinear_stencil(slice_coordinates(poses, band.kx, band.ky, box), box)
    reach = filt.ravel()[index].reshape(50, len(band.flat), 8).max(axis=(0, 2))  # strongest voxel read
    dropped = ~kept
    assert reach[dropped].max() < tol
    # Every pixel whose own voxel (identity pose) the filter keeps at the tolerance is processed.
    x, y, z = np.rint(slice_coordinates(np.eye(3)[None], band.kx, band.ky, box)[:, 0]).astype(int)
    assert np.all(filt[z, y, x][dropped] < tol)


def _pass_inputs(box: int, filt, rng):
    """A chunk made from the model itself (mean + filtered components at known z, plus noise)."""
    n, k = 300, 3
    band = make_band(box)
    radius = np.sqrt(((np.indices((box,) * 3) - box // 2) ** 2).sum(0))
    mask = np.exp(-0.5 * (np.maximum(radius - box / 4, 0) / 3) ** 2)  # a sphere with a 3-pixel soft edge
    comps = random_components(k, mask, filt, rng)
    mean = rng.normal(size=(box,) * 3) * mask
    volumes = fourier_stack(mean, comps)
    # the data from the full spectra on the full grid (the model holds their halves)
    full = np.stack([to_fourier(v / gridding_correction(box)).ravel() for v in (mean, *comps)], -1)
    rotation = random_rotations(n, rng)
    index, weights = trilinear_stencil(slice_coordinates(rotation, band.kx, band.ky, box), box)
    s = gather(full.astype(np.complex64), index, weights).reshape(n, -1, k + 1)
    ctf = np.exp(-band.radius / box)[None, :] * np.ones((n, 1))  # an envelope without zeros
    z = rng.normal(size=(n, k)) * [3.0, 2.0, 1.0]
    clean = s[..., 0] + np.einsum("npk,nk->np", s[..., 1:], z)
    scale = np.abs(s[..., 0]).mean()
    y = ctf * clean + 0.3 * scale * (rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape))
    chunk = Chunk(y.astype(np.complex64), ctf.astype(np.float32), rotation, np.ones(n))
    model = Model(volumes, np.ones(box // 2), 1e-3, "optimal")
    return chunk, model, band, mask


def test_band_limited_pass_matches_the_full_pass_within_the_tolerance():
    box, pixel, tol = 48, 2.0, 0.05
    filt = band_filter(box, pixel, 20.0, 1.5, None, 8.0)
    chunk, model, band, mask = _pass_inputs(box, filt, np.random.default_rng(0))
    pixels = filter_pixels(band, filt, tol)
    assert pixels.sum() < 0.7 * len(band.flat)  # a real saving
    full = em_statistics(chunk, model, band)
    part = em_statistics(chunk, replace(model, pixels=pixels), band)
    for key in ("z", "alpha"):
        error = np.linalg.norm(part[key] - full[key]) / np.linalg.norm(full[key])
        assert error <= tol, (key, error)
    # The M-step's statistics differ outside the band (there the full pass's components are noise
    # that the filter passes at a weight below the tolerance); where the filter keeps at least the
    # tolerance, the masked and filtered components do not change beyond it.
    new = [
        regularize(solve_components(stats, box, model.modes, 0.01), mask, filt, orthonormalize=False)
        for stats in (full, part)
    ]
    kept = filt >= tol
    full_c, part_c = (np.stack([to_fourier(v)[kept] for v in c]) for c in new)
    assert np.linalg.norm(part_c - full_c) / np.linalg.norm(full_c) <= tol / 2  # measured 0.021
    np.testing.assert_allclose(part["power"], full["power"], rtol=tol)
    np.testing.assert_allclose(part["objective"], full["objective"], rtol=tol)


def test_the_mean_pass_sums_every_samples_power_in_its_shell(xp):
    """The data power per shell (the noise estimate's input) against a float64 loop over the samples,
    each counted with its mate off the kx = 0 column."""
    box, n = 24, 40
    rng = np.random.default_rng(7)
    band = make_band(box)
    y = (rng.normal(size=(n, len(band.flat))) + 1j * rng.normal(size=(n, len(band.flat)))).astype(np.complex64)
    chunk = Chunk(y, np.ones(y.shape, np.float32), random_rotations(n, rng), np.ones(n))
    power = mean_statistics(chunk.map(xp.asarray), make_band(box, xp), "input", xp)["power"]
    expected = np.zeros(band.shells)
    for q, shell in enumerate(band.shell):
        expected[shell] += (1.0 if band.kx[q] == 0 else 2.0) * sum(abs(complex(v)) ** 2 for v in y[:, q])
    np.testing.assert_allclose(to_numpy(power), expected, rtol=1e-6)


def test_the_pass_reports_particles_in_the_chunks_order():
    """It works through the particles in `view_order`; permuting the chunk permutes z and α
    (the reference: the same pass on the permuted chunk) and leaves the sums as they were."""
    box = 32
    filt = band_filter(box, 2.0, 12.0, 1.5, None, 8.0)
    chunk, model, band, _ = _pass_inputs(box, filt, np.random.default_rng(5))
    perm = np.random.default_rng(6).permutation(len(chunk.y))
    shuffled = chunk.map(lambda a: a[perm])
    first, second = em_statistics(chunk, model, band), em_statistics(shuffled, model, band)
    np.testing.assert_allclose(second["z"], first["z"][perm], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(second["alpha"], first["alpha"][perm], rtol=1e-6)
    for key in ("G", "b"):
        np.testing.assert_allclose(second[key], first[key], rtol=1e-6, atol=1e-9 * np.abs(first[key]).max())


def test_coordinates_alone_skip_the_second_pass_and_agree():
    """`statistics=False` (the final coordinates pass): the same z, α, noise covariance and
    baseline as the whole pass, bit for bit, and none of the second pass's sums."""
    box = 32
    chunk, model, band, _ = _pass_inputs(box, band_filter(box, 2.0, 12.0, 1.5, None, 8.0), np.random.default_rng(7))
    whole, alone = em_statistics(chunk, model, band), em_statistics(chunk, model, band, statistics=False)
    for key in ("z", "alpha", "zcov", "zsum", "baseline"):
        np.testing.assert_array_equal(alone[key], whole[key])
    assert not {"G", "b", "power", "objective"} & set(alone)
