"""A store's images read straight from its shard files into the caller's buffer.

zarr reads a whole shard into fresh memory and copies each inner chunk out of it: every byte is
copied twice, and on the H100's host (whose kernel copies a cached file at 4.5 GB/s) a worker read
~1 GB/s that way. The images of a store that dva wrote on a local filesystem are laid out as the
zarr v3 sharding codec ("sharding_indexed") lays out uncompressed chunks: each shard file holds
its inner chunks' raw little-endian float32 bytes, then an index of one (offset, length) uint64
pair per inner chunk and that index's CRC-32C. Such shards are read with one `preadv` per inner
chunk, straight into the destination; any other store (compressed, remote, another layout) is
read by zarr.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype

from dva.errors import DvaInputError

_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
EMPTY = 2**64 - 1  # an index entry's offset and length for an inner chunk never written


@dataclass(frozen=True)
class ShardFiles:
    """Where the particles' images lie in a local store's shard files."""

    folder: Path  # the images array's folder
    particles: int
    shard: int  # particles per shard
    inner: int  # particles per inner chunk
    image_bytes: int  # bytes per image
    fill: float  # the images' value where zarr wrote nothing

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Particles `start:stop` into `out` (C-contiguous float32 `(stop − start, D, D)`)."""
        target = memoryview(out.reshape(-1).view(np.uint8))
        for first in range(start - start % self.shard, stop, self.shard):
            path = self.folder / "c" / str(first // self.shard) / "0" / "0"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # zarr writes no shard that holds only its fill value
                out[max(start, first) - start : min(stop, first + self.shard) - start] = self.fill
                continue
            except OSError as exc:
                raise DvaInputError(f"{path}: cannot read this shard of the store ({exc.strerror})") from None
            try:
                index = self._index(fd, path)
                for j, (offset, length) in enumerate(index):
                    lo = max(start, first + j * self.inner)
                    hi = min(stop, first + (j + 1) * self.inner, self.particles)
                    if lo >= hi:
                        continue
                    part = target[(lo - start) * self.image_bytes : (hi - start) * self.image_bytes]
                    if offset == EMPTY:  # nor an inner chunk of its fill value alone
                        out[lo - start : hi - start] = self.fill
                        continue
                    if length != self.inner * self.image_bytes:
                        raise DvaInputError(
                            f"{path}: inner chunk {j} holds {length} bytes, not {self.inner * self.image_bytes}"
                        )
                    _read_fully(fd, part, offset + (lo - first - j * self.inner) * self.image_bytes, path)
            finally:
                os.close(fd)

    def _index(self, fd: int, path: Path) -> list[list[int]]:
        """The shard's `(inner chunks, 2)` offsets and lengths (bytes), its checksum checked."""
        chunks = self.shard // self.inner
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 16 * chunks + 4, size - 16 * chunks - 4) if size >= 16 * chunks + 4 else b""
        if len(raw) != 16 * chunks + 4 or np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
            raise DvaInputError(f"{path}: the shard's index is damaged (checksum or size); import the particles again")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(chunks, 2).tolist()  # Python ints: exact offsets


def _read_fully(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """`len(buffer)` bytes of `fd` from `offset` (a read returns at most ~2 GB)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise DvaInputError(f"{path}: the shard ends early (truncated); import the particles again")
        done += got


def shard_files(images: zarr.Array, store: str) -> ShardFiles | None:
    """The layout of `images` (the `images` array of `store`, a path or URL) when its shards can be
    read directly: a local path, float32 images sharded along the particles, uncompressed inner
    chunks of whole images, the index at the end; else None."""
    if "://" in store or not images.shards or images.ndim != 3:
        return None
    meta = json.loads(json.dumps(images.metadata.to_dict()))  # tuples as lists
    shard, box = images.shards[0], images.shape[1:]
    inner = images.chunks[0]
    expected = [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [inner, *box],
                "codecs": [_BYTES],
                "index_codecs": [_BYTES, {"name": "crc32c"}],
                "index_location": "end",
            },
        }
    ]
    layout = (
        meta.get("codecs") == expected
        and meta.get("data_type") == "float32"
        and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
        and list(images.shards[1:]) == list(box)
        and shard % inner == 0
    )
    if not layout:
        return None
    fill = float(images.fill_value)
    return ShardFiles(Path(store) / images.path, images.shape[0], shard, inner, 4 * int(np.prod(box)), fill)


def read_images(images: zarr.Array, store: str, start: int, stop: int, out: np.ndarray) -> None:
    """Particles `start:stop` of `images` (the `images` array of `store`) into `out`, C-contiguous
    `(stop − start, D, D)` of the images' dtype: from the shard files directly where `shard_files` allows, else
    through zarr."""
    if out.dtype != images.dtype or not out.flags.c_contiguous or out.shape != (stop - start, *images.shape[1:]):
        raise ValueError(f"read_images: out must be C-contiguous {images.dtype} {(stop - start, *images.shape[1:])}")
    files = shard_files(images, store)
    if files is not None:
        files.read(start, stop, out)
    else:
        images.get_basic_selection(slice(start, stop), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
