"""The per-particle table every reader produces: an xarray Dataset over `particle`.

Variables (RELION conventions, DESIGN.md §1):

- `rotation (particle, i, j)`: matrices A; NaN when the input has no poses.
- `shift_px (particle, xy)`: the shift t that centres the stored image, pixels of the stored image.
- `defocus_u_A`, `defocus_v_A` (Å, positive underfocus), `defocus_angle_rad`, `voltage_kV`,
  `cs_mm`, `amp_contrast`, `phase_shift_rad`, `bfactor_A2`, `ctf_scale`, `ctf_premultiplied`.
- `pixel_size_A`, `image_size` (pixels, 0 when unknown), `data_sign` (+1 white on black),
  `halfset` (0, 1, or −1 when unassigned), `uid`, `optics_group` (1-based).
- `stack` (index into `attrs["stacks"]`), `stack_index` (0-based image in that stack),
  `source_row` (row of the input file).

Attributes: `stacks` (resolved stack paths), `source` (the input file), `source_sha256` (its
fingerprint: writers carry its columns through only while it is unchanged), `source_format`
(`star` or `cs`), `has_poses`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import xarray as xr

from dva.errors import DvaInputError

CTF_FIELDS = (
    "defocus_u_A",
    "defocus_v_A",
    "defocus_angle_rad",
    "voltage_kV",
    "cs_mm",
    "amp_contrast",
    "phase_shift_rad",
    "bfactor_A2",
    "ctf_scale",
)
SCALAR_FIELDS = (
    *CTF_FIELDS,
    "ctf_premultiplied",
    "pixel_size_A",
    "image_size",
    "data_sign",
    "halfset",
    "uid",
    "optics_group",
    "stack",
    "stack_index",
    "source_row",
)
_DTYPES = {
    "ctf_premultiplied": np.bool_,
    "image_size": np.int64,
    "data_sign": np.float32,
    "halfset": np.int8,
    "uid": np.uint64,
    "optics_group": np.int32,
    "stack": np.int32,
    "stack_index": np.int64,
    "source_row": np.int64,
}


def make_table(
    *,
    rotation: np.ndarray,
    shift_px: np.ndarray,
    stacks: list[str],
    source: str,
    source_sha256: str,
    source_format: str,
    has_poses: bool,
    **fields: np.ndarray,
) -> xr.Dataset:
    """Build the table from `(n, 3, 3)` rotations, `(n, 2)` shifts and every field in `SCALAR_FIELDS`."""
    missing = set(SCALAR_FIELDS) - set(fields)
    extra = set(fields) - set(SCALAR_FIELDS)
    if missing or extra:
        raise TypeError(f"make_table: missing {sorted(missing)}, unexpected {sorted(extra)}")
    n = len(rotation)
    data = {
        "rotation": (("particle", "i", "j"), np.asarray(rotation, dtype=np.float64)),
        "shift_px": (("particle", "xy"), np.asarray(shift_px, dtype=np.float64)),
    }
    for name in SCALAR_FIELDS:
        arr = np.broadcast_to(np.asarray(fields[name], dtype=_DTYPES.get(name, np.float64)), (n,))
        data[name] = (("particle",), arr.copy())
    return xr.Dataset(
        data,
        attrs={
            "stacks": list(stacks),
            "source": str(source),
            "source_sha256": source_sha256,
            "source_format": source_format,
            "has_poses": bool(has_poses),
        },
    )


def uids_from_rows(source: str, n: int) -> np.ndarray:
    """Deterministic 64-bit uids for inputs that carry none (RELION): a hash of path and row."""
    seed = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    rows = np.arange(n, dtype=np.uint64)
    # SplitMix64 of seed + row: distinct rows give distinct uids.
    z = (np.uint64(seed) + rows * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_pixel_sizes(source: str, pixel: np.ndarray) -> None:
    """Refuse pixel sizes that are not positive and finite."""
    bad = ~(np.isfinite(pixel) & (pixel > 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise DvaInputError(f"{source}: pixel size {pixel[row]:g} Å in row {row + 1} is not positive")


def check_source(table: xr.Dataset) -> Path:
    """The table's source file, refused when it is gone or changed (its rows would not match)."""
    path = Path(table.attrs["source"])
    if not path.is_file():
        raise DvaInputError(f"{path}: the input file is gone; its columns cannot be carried through")
    if file_sha256(path) != table.attrs.get("source_sha256"):
        raise DvaInputError(f"{path}: the input file changed since it was read; its columns cannot be carried through")
    return path
