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

Attributes: `stacks` (resolved stack paths), `source` (the input file), `source_format`
(`star` or `cs`), `has_poses`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import xarray as xr

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
            "source_format": source_format,
            "has_poses": bool(has_poses),
        },
    )


def select(table: xr.Dataset, index: np.ndarray | slice) -> xr.Dataset:
    """Rows `index` of the table, attributes kept."""
    return table.isel(particle=index)


def uids_from_rows(source: str, n: int) -> np.ndarray:
    """Deterministic 64-bit uids for inputs that carry none (RELION): a hash of path and row."""
    seed = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    rows = np.arange(n, dtype=np.uint64)
    # SplitMix64 of seed + row: distinct rows give distinct uids.
    z = (np.uint64(seed) + rows * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
