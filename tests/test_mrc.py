from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from dva.errors import DvaInputError
from dva.io.mask import load_mask
from dva.io.mrc import StackReader, read_volume, write_stack, write_volume
from dva.ops.fourier import fourier_crop
from tests.conftest import load_pickle


def real_space_projection(vol: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Reference projector: img(x, y) = Σ_z vol(Aᵀ(x, y, z)), centre N//2, trilinear sampling."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float64)
    out = []
    for a in rotations:
        p = pts @ a  # rows p·A = (Aᵀ p)ᵀ
        coords = (p[:, ::-1] + n // 2).T  # (z, y, x) indices
        out.append(map_coordinates(vol, coords, order=1, cval=0.0).reshape(n, n, n).sum(axis=0))
    return np.stack(out)


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_toy_projections_follow_the_convention(drgn):
    vol, _ = read_volume(drgn / "toymodel_small_nocenter.mrc")
    angles = load_pickle(drgn / "toy_angles.pkl")[:24].astype(np.float64)
    images = StackReader(drgn / "toy_projections.mrcs").read(np.arange(24))
    ours = real_space_projection(vol, angles)
    transposed = real_space_projection(vol, angles.transpose(0, 2, 1))
    assert min(_corr(a, b) for a, b in zip(ours, images, strict=True)) > 0.99
    # Aᵀ in place of A gives mush (a few views match by chance, not on average).
    assert np.mean([_corr(a, b) for a, b in zip(transposed, images, strict=True)]) < 0.8


def test_stack_reader_any_order_and_float16(tmp_path):
    data = np.random.default_rng(0).normal(size=(20, 16, 16)).astype(np.float16)
    mrcfile.write(tmp_path / "h.mrcs", data)
    r = StackReader(tmp_path / "h.mrcs")
    idx = np.array([5, 0, 19, 6, 7, 5])
    np.testing.assert_array_equal(r.read(idx), data[idx].astype(np.float32))
    with pytest.raises(DvaInputError, match="h.mrcs: image index 21 .* past the end"):
        r.read(np.array([20]))


def test_stack_reader_refuses_non_square(tmp_path):
    mrcfile.write(tmp_path / "r.mrcs", np.zeros((3, 16, 18), np.float32))
    with pytest.raises(DvaInputError, match="r.mrcs: images are 18x16 pixels, not square"):
        StackReader(tmp_path / "r.mrcs")


def test_write_stack_and_volume_round_trip(tmp_path):
    data = np.random.default_rng(1).normal(size=(10, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", data.shape, [data[:4], data[4:]], 2.5)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        np.testing.assert_array_equal(m.data, data)
        assert m.voxel_size.x == pytest.approx(2.5)
        assert m.is_image_stack()
    write_volume(tmp_path / "v.mrc", data[:8], 1.25)
    vol, voxel = read_volume(tmp_path / "v.mrc")
    np.testing.assert_array_equal(vol, data[:8])
    assert voxel == pytest.approx(1.25)
    assert not list(tmp_path.glob(".*tmp*"))


def test_fourier_crop_keeps_low_frequencies():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(3, 32, 32))
    small = fourier_crop(img, 16)
    # Independent reference: the centred DFT's central 16x16 block, evaluated directly.
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1))), axes=(-2, -1))
    g = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(small, axes=(-2, -1))), axes=(-2, -1))
    np.testing.assert_allclose(g[:, 1:, 1:] * 4, f[:, 9:24, 9:24], atol=1e-9)
    np.testing.assert_allclose(fourier_crop(np.ones((32, 32)), 16), 1.0, atol=1e-12)


def test_mask_matching(tmp_path):
    c = np.arange(32) - 16
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    m = np.exp(-r2 / (2 * 5.0**2)).astype(np.float32)  # smooth: Fourier cropping is exact enough
    write_volume(tmp_path / "m.mrc", m, 2.0)
    np.testing.assert_array_equal(load_mask(tmp_path / "m.mrc", 32, 2.0), m)
    small = load_mask(tmp_path / "m.mrc", 16, 4.0)  # same extent, coarser: Fourier-cropped
    # Coarse voxel j sits where fine voxel 2j does.
    np.testing.assert_allclose(small, m[::2, ::2, ::2], atol=2e-3)
    with pytest.raises(DvaInputError, match="m.mrc: mask box 32 at 2 Å cannot be matched"):
        load_mask(tmp_path / "m.mrc", 32, 3.0)
