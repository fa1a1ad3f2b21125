"""Read any particle file (.star or .cs) into the per-particle table."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from dva.errors import DvaInputError
from dva.io.cs import read_cs
from dva.io.star import read_star


def read_particles(
    path: str | Path,
    *,
    datadir: str | Path | None = None,
    passthrough: str | Path | None = None,
    pixel_size_A: float | None = None,
) -> xr.Dataset:
    """The per-particle table of a RELION `.star` or CryoSPARC `.cs` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        if passthrough is not None:
            raise DvaInputError(f"{path}: --passthrough applies to .cs files only")
        return read_star(path, datadir=datadir, pixel_size_A=pixel_size_A)
    if suffix == ".cs":
        if pixel_size_A is not None:
            raise DvaInputError(f"{path}: --pixel-size applies to .star files without one (.cs has blob/psize_A)")
        return read_cs(path, passthrough=passthrough, datadir=datadir)
    raise DvaInputError(f"{path}: unknown particle file type (expected .star or .cs)")
