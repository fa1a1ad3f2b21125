"""Reading a store's shard files directly (`dva.io.shards`), against zarr's own reads of them."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from dva.errors import DvaInputError
from dva.io.shards import read_images, shard_files
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset


def _images(path, n=1037, shard=300, inner=100, box=8, **options):
    """A sharded float32 array as dva writes one (uncompressed unless `options` say otherwise),
    random images, the last shard and inner chunk partial."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    images = root.create_array(
        "images", shape=(n, box, box), chunks=(inner, box, box), shards=(shard, box, box), dtype="float32", **options
    )
    images[:] = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    return images


def _ranges(n: int) -> list[tuple[int, int]]:
    """Ranges within, across and at the ends of inner chunks and shards, and random ones."""
    fixed = [(0, n), (0, 1), (99, 101), (100, 200), (250, 650), (299, 300), (300, 600), (899, n), (n - 1, n)]
    rng = np.random.default_rng(1)
    return fixed + [tuple(sorted(rng.choice(n + 1, 2, replace=False))) for _ in range(20)]


def _read(images, store, a, b):
    out = np.full((b - a, *images.shape[1:]), np.nan, images.dtype)
    read_images(images, str(store), a, b, out)
    return out


def test_shards_read_directly_hold_what_zarr_reads(tmp_path):
    images = _images(tmp_path / "s.zarr", compressors=None)
    assert shard_files(images, str(tmp_path / "s.zarr")) is not None
    for a, b in _ranges(images.shape[0]):
        np.testing.assert_array_equal(_read(images, tmp_path / "s.zarr", a, b), images[a:b], err_msg=f"{a}:{b}")


def test_dva_stores_are_read_directly(tmp_path):
    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=300, seed=2)
    store = tmp_path / "s.zarr"
    import_particles(read_star(sim / "particles.star"), store, chunk_size=100)
    images = zarr.open_group(store, mode="r")["images"]
    assert shard_files(images, str(store)) is not None
    np.testing.assert_array_equal(_read(images, store, 50, 260), images[50:260])


@pytest.mark.parametrize("kind", ["compressed", "unsharded", "url", "float64", "flat"])
def test_other_stores_are_read_by_zarr(tmp_path, kind):
    path = tmp_path / "s.zarr"
    if kind in ("unsharded", "float64", "flat"):
        shape = (500, 64) if kind == "flat" else (500, 8, 8)
        shards = None if kind == "unsharded" else (300, *shape[1:])
        dtype = "float64" if kind == "float64" else "float32"
        root = zarr.open_group(path, mode="w", zarr_format=3)
        images = root.create_array(
            "images", shape=shape, chunks=(100, *shape[1:]), shards=shards, dtype=dtype, compressors=None
        )
        images[:] = np.random.default_rng(0).normal(size=shape)
    else:
        images = _images(path, compressors="auto" if kind == "compressed" else None)
    store = path.as_uri() if kind == "url" else str(path)
    assert shard_files(images, store) is None
    np.testing.assert_array_equal(_read(images, store, 150, 420), images[150:420])


def test_what_zarr_never_wrote_reads_as_the_fill_value(tmp_path):
    """zarr writes no inner chunk, nor shard, that holds only the fill value."""
    images = _images(tmp_path / "s.zarr", compressors=None)
    images[100:200] = 0.0  # an inner chunk
    images[300:600] = 0.0  # a whole shard
    for a, b in [(0, 700), (150, 350), (310, 320)]:
        np.testing.assert_array_equal(_read(images, tmp_path / "s.zarr", a, b), images[a:b])


@pytest.mark.parametrize("damage", ["index", "truncated"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    images = _images(tmp_path / "s.zarr", compressors=None)
    shard = tmp_path / "s.zarr" / "images" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if damage == "index":
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:  # the images cut short, the index kept
        index = data[-(16 * 3 + 4) :]
        shard.write_bytes(bytes(data[: len(data) // 3]) + bytes(index))
    match = "index is damaged" if damage == "index" else "ends early"
    with pytest.raises(DvaInputError, match=f"{shard}: .*{match}"):
        _read(images, tmp_path / "s.zarr", 250, 450)


def test_reads_go_only_into_a_buffer_of_the_range_exact_shape(tmp_path):
    """A strided or mistyped destination would take a copy of the bytes, and the read would be lost."""
    images = _images(tmp_path / "s.zarr", compressors=None)
    for out in (np.empty((20, 8, 16), np.float32)[..., ::2], np.empty((20, 8, 8)), np.empty((21, 8, 8), np.float32)):
        with pytest.raises(ValueError, match="C-contiguous float32 \\(20, 8, 8\\)"):
            read_images(images, str(tmp_path / "s.zarr"), 100, 120, out)


def test_gpu_tasks_take_up_to_the_whole_shards_that_hold_their_megabytes(tmp_path, monkeypatch):
    """A CPU task takes at most one shard; a GPU task at most the whole shards that hold
    `DVA_GPU_TASK_MB` of images (at least one); a store without shards keeps its tasks inside its
    chunks on either."""
    from dva.io.store import task_limits

    images = _images(tmp_path / "s.zarr", n=5000, shard=300, box=32)  # 300 × 4 KiB = 1.17 MiB a shard
    monkeypatch.delenv("DVA_GPU_TASK_MB", raising=False)
    assert task_limits(images) == (300, False)
    assert task_limits(images, "cupy") == (300 * int(512 // (300 * 4096 / 2**20)), False)
    for mb, shards in (("3.6", 3), ("2.34", 1), ("0.1", 1)):
        monkeypatch.setenv("DVA_GPU_TASK_MB", mb)
        assert task_limits(images, "cupy") == (300 * shards, False)
        assert task_limits(images, "numpy") == (300, False)
    for bad in ("many", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("DVA_GPU_TASK_MB", bad)
        with pytest.raises(DvaInputError, match=f"DVA_GPU_TASK_MB='{bad}'"):
            task_limits(images, "cupy")
    root = zarr.open_group(tmp_path / "unsharded.zarr", mode="w", zarr_format=3)
    plain = root.create_array("images", shape=(1000, 8, 8), chunks=(150, 8, 8), dtype="float32")
    assert task_limits(plain, "cupy") == task_limits(plain) == (150, True)
