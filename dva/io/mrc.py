"""MRC volumes and MRCS image stacks through mrcfile.

Stack or volume is decided by context (a particle file names a stack), never by the header's
space group. Pixel sizes come from particle metadata; headers are written correctly but only
trusted for volumes, where they are the sole record.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import mrcfile
import numpy as np

from dva.errors import DvaInputError
from dva.io.atomic import atomic_path


class StackReader:
    """Reads images of one MRC/MRCS stack by 0-based index, with `pread` (no mmap).

    Reading with `pread` keeps the process's resident memory bounded by what it holds, unlike a
    memory map of a stack of many GB. float16 (mode 12) and the other real modes are accepted.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DvaInputError(f"{self.path}: image stack not found")
        try:
            with warnings.catch_warnings():  # permissive mode warns on old but valid headers
                warnings.simplefilter("ignore", RuntimeWarning)
                m = mrcfile.open(self.path, mode="r", header_only=True, permissive=True)
            with m:
                header = m.header
                nx, ny, nz, mode = int(header.nx), int(header.ny), int(header.nz), int(header.mode)
                self.dtype = mrcfile.utils.data_dtype_from_header(header)
                self.offset = header.nbytes + int(header.nsymbt)
        except (ValueError, OSError) as exc:
            raise DvaInputError(f"{self.path}: not a readable MRC stack ({exc})") from None
        if self.dtype.kind not in "iuf":
            raise DvaInputError(f"{self.path}: MRC mode {mode} holds no real-valued images")
        if nx != ny:
            raise DvaInputError(f"{self.path}: images are {nx}x{ny} pixels, not square")
        self.box, self.count = nx, nz
        self.image_bytes = nx * ny * self.dtype.itemsize
        if self.offset + self.count * self.image_bytes > self.path.stat().st_size:
            raise DvaInputError(f"{self.path}: file is shorter than its header says ({nz} images)")

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images `indices` (0-based, any order) as float32 `(n, box, box)` `[y, x]`."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.count):
            bad = int(indices[(indices < 0) | (indices >= self.count)][0])
            raise DvaInputError(
                f"{self.path}: image index {bad + 1} (1-based) is past the end of the stack ({self.count} images)"
            )
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        # Runs of consecutive indices are read with one call each.
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for run in np.split(np.arange(len(sorted_idx)), breaks):
                if not len(run):
                    continue
                first = int(sorted_idx[run[0]])
                nbytes = len(run) * self.image_bytes
                buf = os.pread(fd, nbytes, self.offset + first * self.image_bytes)
                imgs = np.frombuffer(buf, dtype=self.dtype).reshape(len(run), self.box, self.box)
                out[order[run]] = imgs
        finally:
            os.close(fd)
        return out


def read_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """A volume `vol[z, y, x]` as float32 and its voxel size in Å (0 when the header has none)."""
    path = Path(path)
    if not path.is_file():
        raise DvaInputError(f"{path}: volume not found")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as m:
            data = np.asarray(m.data, dtype=np.float32)
            voxel = float(m.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise DvaInputError(f"{path}: not a readable MRC volume ({exc})") from None
    if data is None or data.ndim != 3 or len(set(data.shape)) != 1:
        raise DvaInputError(f"{path}: not a cubic volume (shape {getattr(data, 'shape', None)})")
    return data, voxel


def write_volume(path: str | Path, volume: np.ndarray, voxel_size_A: float) -> None:
    """Write `vol[z, y, x]` as float32 MRC with voxel size set and origin 0, atomically."""
    with atomic_path(path) as tmp, mrcfile.new(tmp) as m:
        m.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        m.voxel_size = voxel_size_A
        m.header.origin = (0.0, 0.0, 0.0)


def write_stack(
    path: str | Path, shape: tuple[int, int, int], batches: Iterable[np.ndarray], pixel_size_A: float
) -> None:
    """Write a float32 MRCS stack of `shape` `(n, D, D)` from consecutive image batches, atomically.

    Memory stays bounded by one batch whatever n.
    """
    with atomic_path(path) as tmp, mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2) as m:
        m.set_image_stack()
        start = 0
        for batch in batches:
            m.data[start : start + len(batch)] = batch
            start += len(batch)
        if start != shape[0]:
            raise ValueError(f"write_stack: got {start} images, expected {shape[0]}")
        m.voxel_size = pixel_size_A
