"""The zarr particle store that the engine streams (DESIGN.md §3).

Layout: array `images (particle, y, x)` float32, uncompressed, in shards ("chunks" in dva's options:
the unit of writing, and the most particles a CPU worker's task takes) of inner chunks of up to `INNER_CHUNK`
particles (the unit of reading: a task reads only the inner chunks its range touches, several at
once); group `particles` holding the per-particle table as an xarray Dataset; root attributes with
the import parameters and the dva version. Images are stored white on black (multiplied by
`data_sign`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from dva import __version__
from dva.errors import DvaFormatWarning, DvaInputError
from dva.io.atomic import atomic_path
from dva.io.mrc import StackReader
from dva.ops.fourier import fourier_crop

CHUNK_BYTES = 128 * 2**20  # default chunk: about 128 MB of images
GPU_TASK_MB = 512  # images a GPU worker's task takes at most, a multiple of the shards (`task_limits`)
INNER_CHUNK = 1024  # most particles per inner chunk of a shard
READ_BYTES = 16 * 2**20  # images read and cropped at a time (bounds the FFT's temporaries)
TABLE_CHUNK = 2**16  # particles per chunk of each per-particle variable: a task reading 2,048 rows of a
# store of over a million decompresses 65,536 of each (15 ms), not 1,048,576 (186 ms)


def default_chunk_size(box: int) -> int:
    """Particles per chunk so that one chunk holds about `CHUNK_BYTES` of float32 images."""
    return max(1, CHUNK_BYTES // (4 * box * box))


def inner_chunk(shard: int) -> int:
    """Particles per inner chunk of a `shard`-particle shard: its largest divisor up to `INNER_CHUNK`
    (the shard whole where that is under a quarter of `INNER_CHUNK`: 2,062 = 2 × 1,031)."""
    limit = min(shard, INNER_CHUNK)
    best = max(d for d in range(1, limit + 1) if shard % d == 0)
    return best if 4 * best >= limit else shard


def task_limits(images: zarr.Array, backend: str = "numpy") -> tuple[int, bool]:
    """The most particles a task takes, and whether its range must keep within one chunk: a
    sharded store reads any range by its inner chunks, an unsharded one (stores written before
    shards) reads each chunk whole for any part of it.

    A CPU worker's task takes at most one shard; a GPU worker's at most the whole shards that hold
    `GPU_TASK_MB` of images (at least one; `DVA_GPU_TASK_MB` in the environment of the process that
    runs the job sets another size): 8,192 particles of box 128 with the default shards
    (`placement.deal_tasks` then cuts equal tasks up to that: 14 of ~7,143 for 100k on one GPU). A GPU pass costs each task a few milliseconds besides its kernels
    (launches, synchronising, adding its sums): on the H100 the 49 tasks of 2,048 particles of a
    resident pass over 100k at box 128 took 1.29 s, where the kernels' rate on 8,192 particles at once
    made ~0.87 s (tasks of 8,192 unmeasured there: `tests/benchmarks/gpu.sh`, stage smalltasks)."""
    if not images.shards:
        return images.chunks[0], True
    shard = images.shards[0]
    if backend != "cupy":
        return shard, False
    shard_mb = shard * images.dtype.itemsize * int(np.prod(images.shape[1:])) / 2**20
    return shard * max(1, int(gpu_task_mb() // shard_mb)), False


def gpu_task_mb() -> float:
    """Images a GPU worker's task takes at most (MB): `DVA_GPU_TASK_MB`, else `GPU_TASK_MB`."""
    value = os.environ.get("DVA_GPU_TASK_MB")
    if value is None:
        return GPU_TASK_MB
    try:
        mb = float(value)
    except ValueError:
        mb = 0.0
    if not (mb > 0 and math.isfinite(mb)):
        raise DvaInputError(
            f"DVA_GPU_TASK_MB={value!r}: give the megabytes of images a GPU task takes (a positive number)"
        )
    return mb


def open_stacks(table: xr.Dataset) -> list[StackReader]:
    """A reader per stack, checked: found, square, one box size, every index inside its stack."""
    readers = [StackReader(p) for p in table.attrs["stacks"]]
    boxes = {r.box for r in readers}
    if len(boxes) > 1:
        a, b = readers[0], next(r for r in readers if r.box != readers[0].box)
        raise DvaInputError(f"{b.path}: images are {b.box} px but {a.path} has {a.box} px; stacks differ in box size")
    stack = table["stack"].to_numpy()
    index = table["stack_index"].to_numpy()
    for i, r in enumerate(readers):
        sel = index[stack == i]
        if len(sel) and sel.max() >= r.count:
            raise DvaInputError(
                f"{r.path}: image index {int(sel.max()) + 1} (1-based) is past the end of the stack ({r.count} images)"
            )
    return readers


def import_particles(
    table: xr.Dataset,
    out: str | Path,
    *,
    box: int | None = None,
    chunk_size: int | None = None,
    data_sign: str = "auto",
    max_particles: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Stream the images of `table` into a new zarr store at `out`, atomically.

    Memory is bounded by one chunk (images are read and cropped in sub-batches). `box`
    Fourier-crops to that size; the table keeps the input's units (pixel size, shifts and box of
    the source images) and the store's `box`/`original_box` attributes record the crop.
    `data_sign` is `auto` (from the metadata: CryoSPARC `blob/sign`, RELION +1), `1` or `-1`;
    `max_particles` keeps the first N rows. `progress(n)` is called after each chunk.
    """
    out = Path(out)
    if max_particles is not None:
        if max_particles < 1:
            raise DvaInputError(f"--max-particles {max_particles}: must be at least 1")
        table = table.isel(particle=slice(0, max_particles))
    if chunk_size is not None and chunk_size < 1:
        raise DvaInputError(f"--chunk-size {chunk_size}: must be at least 1")
    n = table.sizes["particle"]
    if n == 0:
        raise DvaInputError(f"{table.attrs['source']}: no particles")
    readers = open_stacks(table)
    full = readers[0].box
    declared = np.unique(table["image_size"].to_numpy())
    if declared.size and (declared[(declared > 0)] != full).any():
        warnings.warn(
            f"{table.attrs['source']}: metadata says box {int(declared[declared > 0][0])} but the stacks hold {full} px images; using {full}",
            DvaFormatWarning,
            stacklevel=2,
        )
    new_box = full if box is None else int(box)
    if box is not None and (new_box > full or new_box < 8 or new_box % 2):
        raise DvaInputError(f"--box {new_box}: must be even, at least 8 and at most the image box {full}")
    if data_sign not in ("auto", "1", "-1", "+1"):
        raise DvaInputError(f"--data-sign {data_sign}: use auto, 1 or -1")
    sign = table["data_sign"].to_numpy() if data_sign == "auto" else np.full(n, float(data_sign))
    table = table.assign(
        image_size=("particle", np.full(n, full, dtype=np.int64)),
        data_sign=("particle", sign.astype(np.float32)),
    )
    chunk = min(chunk_size or default_chunk_size(new_box), n)
    sub = max(1, min(chunk, READ_BYTES // (4 * full * full)))
    stack = table["stack"].to_numpy()
    index = table["stack_index"].to_numpy()

    with atomic_path(out) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        images = root.create_array(
            "images",
            shape=(n, new_box, new_box),
            chunks=(inner_chunk(chunk), new_box, new_box),
            shards=(chunk, new_box, new_box),
            dtype="float32",
            compressors=None,
            dimension_names=("particle", "y", "x"),
        )
        table.chunk({"particle": TABLE_CHUNK}).to_zarr(
            tmp, group="particles", mode="w", consolidated=False, zarr_format=3
        )
        starts = list(range(0, n, chunk))

        def read(start: int) -> np.ndarray:
            """Chunk `start` at the new box, read and cropped `sub` images at a time."""
            stop = min(start + chunk, n)
            block = np.empty((stop - start, new_box, new_box), dtype=np.float32)
            for lo in range(start, stop, sub):
                hi = min(lo + sub, stop)
                part = np.empty((hi - lo, full, full), dtype=np.float32)
                for s in np.unique(stack[lo:hi]):
                    rows = np.flatnonzero(stack[lo:hi] == s)
                    part[rows] = readers[s].read(index[lo:hi][rows])
                bad = ~np.isfinite(part).all(axis=(1, 2))
                if bad.any():
                    row = lo + int(np.argmax(bad))
                    raise DvaInputError(
                        f"{readers[stack[row]].path}: image {index[row] + 1} (1-based) has NaN or Inf pixels"
                    )
                block[lo - start : hi - start] = fourier_crop(part, new_box) * sign[lo:hi, None, None].astype(
                    np.float32
                )
            return block

        # The next chunk is read while this one is checked, cropped and written.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, starts[0])
            for i, start in enumerate(starts):
                block = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(read, starts[i + 1])
                stop = start + len(block)
                images[start:stop] = block
                if progress is not None:
                    progress(stop - start)
        root.attrs.update(
            {
                "dva_version": __version__,
                "format": "dva-particles-1",
                "source": table.attrs["source"],
                "box": new_box,
                "original_box": full,
                "pixel_size_A": float(np.median(table["pixel_size_A"].to_numpy())) * full / new_box,
                "chunk_size": chunk,
                "data_sign": data_sign,
                "max_particles": max_particles,
                "images": "white on black: stored = input × data_sign",
            }
        )
    return out


def store_location(path: str | Path) -> str:
    """How workers name a store: an fsspec URL (`s3://…`, `gs://…`, `file://…`) as it is, else the
    absolute path."""
    return str(path) if "://" in str(path) else str(Path(path).absolute())


def open_store(path: str | Path) -> tuple[zarr.Array, xr.Dataset, dict]:
    """The images array, the per-particle table and the attributes of a dva store (path or fsspec URL)."""
    path = store_location(path)
    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
        if attrs.get("format") != "dva-particles-1":
            raise DvaInputError(f"{path}: not a dva particle store (no format attribute)")
        table = xr.open_zarr(path, group="particles", consolidated=False).load()
        return root["images"], table, attrs
    except DvaInputError:
        raise
    except Exception as exc:
        raise DvaInputError(f"{path}: not a readable dva store ({exc})") from None


def summary(path: str | Path) -> str:
    """A few lines describing a store, for `dva info`."""
    images, table, attrs = open_store(path)
    n, box, _ = images.shape
    pixel = table["pixel_size_A"].to_numpy() * attrs["original_box"] / box
    half = table["halfset"].to_numpy()
    groups = np.unique(table["optics_group"].to_numpy())
    size_gb = n * box * box * 4 / 1e9
    lines = [
        f"store        {Path(path).absolute()}",
        f"source       {attrs['source']}",
        f"particles    {n:,} images of {box}x{box} px ({size_gb:.2f} GB float32), chunks of {task_limits(images)[0]:,}",
        f"pixel size   {pixel.min():.4g}–{pixel.max():.4g} Å"
        + (f" (Fourier-cropped from box {attrs['original_box']})" if attrs["original_box"] != box else ""),
        f"Nyquist      {2 * pixel.max():.3g} Å",
        f"poses        {'yes' if table.attrs['has_poses'] else 'no (dva run needs poses)'}",
        f"defocus      {table['defocus_u_A'].min().item():.0f}–{table['defocus_u_A'].max().item():.0f} Å (U)",
        f"optics       {len(groups)} group(s), {table['voltage_kV'][0].item():g} kV, Cs {table['cs_mm'][0].item():g} mm",
        f"half-sets    {int((half == 0).sum()):,} / {int((half == 1).sum()):,} / {int((half < 0).sum()):,} unassigned",
        f"data sign    {', '.join(f'{s:+g}' for s in np.unique(table['data_sign'].to_numpy()))} (images stored white on black)",
        f"dva version  {attrs['dva_version']}",
    ]
    return "\n".join(lines)
