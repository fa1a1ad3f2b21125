from __future__ import annotations

import numpy as np
import pytest

from dva.em.chunk import make_band
from dva.ops.rotation import random_rotations
from dva.ops.slice import (
    complete_plane,
    gather,
    gridding_correction,
    half_rows,
    insert,
    slice_stencil,
    view_order,
)
from tests.conftest import half_of, to_fourier, to_host
from tests.stencil import slice_coordinates, trilinear_stencil
from tests.test_mrc import _corr, real_space_projection


def _band(box: int):
    k = np.fft.fftfreq(box)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    inside = np.hypot(kx, ky) <= (box // 2 - 1) / box
    return kx[inside], ky[inside], inside


def test_gather_and_insert_are_adjoint(xp):
    rng = np.random.default_rng(0)
    box = 16
    kx, ky, _ = _band(box)
    coords = slice_coordinates(xp.asarray(random_rotations(5, rng)), xp.asarray(kx), xp.asarray(ky), box, xp)
    index, weights = trilinear_stencil(coords, box, xp)
    vol = xp.asarray(rng.normal(size=(box**3, 2)))
    vals = xp.asarray(rng.normal(size=(len(index), 2)))
    lhs = float((gather(vol, index, weights, xp) * vals).sum())
    rhs = float((vol * insert(vals, index, weights, xp.zeros((box**3, 2)), xp)).sum())
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_gather_and_insert_match_direct_sums(xp):
    """Complex64 volumes and float32 values (as the passes use them) against per-neighbour sums
    in float64 (`np.add.at`)."""
    rng = np.random.default_rng(1)
    box = 16
    kx, ky, _ = _band(box)
    coords = slice_coordinates(xp.asarray(random_rotations(7, rng)), xp.asarray(kx), xp.asarray(ky), box, xp)
    index, weights = trilinear_stencil(coords, box, xp)
    vol = (rng.normal(size=(box**3, 3)) + 1j * rng.normal(size=(box**3, 3))).astype(np.complex64)
    vals = rng.normal(size=(len(index), 4)).astype(np.float32)
    idx, w = to_host(index), to_host(weights).astype(np.float64)
    expected = sum(w[:, j, None] * vol.astype(np.complex128)[idx[:, j]] for j in range(8))
    got = to_host(gather(xp.asarray(vol), index, weights, xp))
    assert got.dtype == np.complex64
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    start = rng.normal(size=(box**3, 4))  # the insertion adds to what the accumulator holds
    expected = start.copy()
    for j in range(8):
        for c in range(4):
            np.add.at(expected[:, c], idx[:, j], w[:, j] * vals[:, c])
    got = to_host(insert(xp.asarray(vals), index, weights, xp.asarray(start), xp))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_kernels_refuse_an_accumulator_or_stencil_they_cannot_use():
    """A strided or float32 accumulator would be copied and the sums lost, a stencil of another box
    would read or write outside the volumes: errors instead."""
    index, weights = np.zeros((3, 8), np.int32), np.ones((3, 8), np.float32)
    for bad in (np.zeros((4, 8))[:, ::2], np.zeros((4, 2), np.float32)):
        with pytest.raises(ValueError, match="C-contiguous float64"):
            insert(np.ones((3, 2)), index, weights, bad)
    # A stencil of a larger box than the volumes: an error, not writes outside them
    with pytest.raises(ValueError, match="outside the 4 voxels"):
        insert(np.ones((3, 2)), index + 4, weights, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="outside the 4 voxels"):
        gather(np.ones((4, 2)), index + 4, weights)


def test_half_plane_insertion_with_mates_equals_full_plane(xp):
    """Half-plane samples inserted once into the half spectra (each at its point or, conjugated, at
    its mirror: `slice_stencil`), then `complete_plane`d, equal the full plane inserted on the full
    grid, on that half."""
    rng = np.random.default_rng(3)
    box = 16
    image = rng.normal(size=(box, box))
    rot = xp.asarray(random_rotations(1, rng))
    full = np.fft.fft2(image)
    kx, ky, inside = _band(box)
    idx, w = trilinear_stencil(slice_coordinates(rot, xp.asarray(kx), xp.asarray(ky), box, xp), box, xp)
    values = xp.asarray(np.stack([full[inside].real, full[inside].imag], -1))
    reference = insert(values, idx, w, xp.zeros((box**3, 2)), xp).T
    band = make_band(box, xp)
    half = xp.asarray(np.fft.rfft2(image).ravel())[band.flat] * (band.multiplicity / 2)
    idx, w, mate = slice_stencil(rot, band.kx, band.ky, box, xp)
    assert 0 < float((mate < 0).mean()) < 1  # some samples at their point, some at their mirror
    parts = insert(xp.stack([half.real, half.imag * mate], -1), idx, w, xp.zeros((half_rows(box), 2)), xp).T
    every = xp.arange(half_rows(box))  # the sums are held at every row of the half spectra
    np.testing.assert_allclose(
        to_host(complete_plane(parts[:1], every, box, 1.0, xp)),
        to_host(half_of(reference[:1], box)),
        rtol=1e-5,
        atol=1e-5,
    )  # float32 weights
    np.testing.assert_allclose(
        to_host(complete_plane(parts[1:], every, box, -1.0, xp)),
        to_host(half_of(reference[1:], box)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_fourier_slice_matches_real_space_projection():
    box = 32
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    # A smooth, compact, asymmetric volume: three Gaussian blobs.
    vol = sum(
        a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s**2))
        for a, cx, cy, cz, s in [(1.0, 3, -2, 1, 2.5), (0.7, -4, 3, 0, 2.0), (0.5, 0, 0, -5, 3.0)]
    )
    rot = random_rotations(4, np.random.default_rng(1))
    spectrum = to_fourier(vol).reshape(-1, 1)
    kx, ky, inside = _band(box)
    index, weights = trilinear_stencil(slice_coordinates(rot, kx, ky, box), box)
    samples = gather(spectrum, index, weights)[:, 0].reshape(len(rot), -1)
    reference = real_space_projection(vol, rot)
    for img, ref in zip(samples, reference, strict=True):
        plane = np.zeros((box, box), complex)
        plane[inside] = img
        ours = np.fft.fftshift(np.fft.ifft2(plane).real)
        assert _corr(ours, ref) > 0.995
        # Trilinear interpolation without oversampling weighs the volume by sinc² in real space:
        # the projection comes out 7% weak (measured slope 0.93, relative error 0.10).
        assert np.abs(ours - ref).max() < 0.08 * np.abs(ref).max()
        assert 0.9 < (ours * ref).sum() / (ref * ref).sum() < 0.95
    # Dividing by the gridding correction first restores the amplitude (measured slope 1.02–1.03,
    # relative error 0.066–0.077; what remains is the aliasing of the tent kernel).
    corrected = gather(to_fourier(vol / gridding_correction(box)).reshape(-1, 1), index, weights)
    for img, ref in zip(corrected[:, 0].reshape(len(rot), -1), reference, strict=True):
        plane = np.zeros((box, box), complex)
        plane[inside] = img
        ours = np.fft.fftshift(np.fft.ifft2(plane).real)
        assert abs((ours * ref).sum() / (ref * ref).sum() - 1) < 0.04
        assert np.linalg.norm(ours - ref) < 0.085 * np.linalg.norm(ref)
    transposed = gather(spectrum, *trilinear_stencil(slice_coordinates(rot.transpose(0, 2, 1), kx, ky, box), box))
    plane = np.zeros((box, box), complex)
    plane[inside] = transposed[: inside.sum(), 0]
    assert _corr(np.fft.fftshift(np.fft.ifft2(plane).real), reference[0]) < 0.95


def test_view_order_batches_nearby_slice_planes(xp):
    """A permutation whose runs of `batch` poses have nearly parallel slice planes: the largest
    angle between two planes of a batch (normals up to sign), median over batches, against the
    stored (random) order."""
    rotations = random_rotations(5000, np.random.default_rng(4))
    order = to_host(view_order(xp.asarray(rotations), 128, xp))
    assert np.array_equal(np.sort(order), np.arange(5000))

    def spread(poses):
        angles = []
        for lo in range(0, len(poses), 128):
            normals = poses[lo : lo + 128, 2]
            angles.append(np.degrees(np.arccos(np.clip(np.abs(normals @ normals.T), 0, 1))).max())
        return np.median(angles)

    assert spread(rotations) > 85 and spread(rotations[order]) < 35


def test_compact_rows_moves_the_rows_in_place(xp, monkeypatch):
    """`compact_rows` equals `sums[rows]` (rows across many of its blocks, the first rows kept, a
    skipped run longer than a block), as the first rows of `sums` itself."""
    from dva.ops import slice as slice_module

    monkeypatch.setattr(slice_module, "COPY_ROWS", 256)  # many blocks
    rng = np.random.default_rng(3)
    sums = rng.normal(size=(5000, 3))
    rows = np.flatnonzero(rng.random(5000) < 0.6)
    rows = np.concatenate([np.arange(10), rows[rows > 2000]])  # a gap of ~2,000 rows
    held = xp.asarray(sums)
    got = slice_module.compact_rows(held, xp.asarray(rows))
    np.testing.assert_array_equal(to_host(got), sums[rows])
    np.testing.assert_array_equal(to_host(held[: len(rows)]), sums[rows])  # in place
