"""Readers and writers: RELION .star, CryoSPARC .cs, MRC/MRCS, the zarr particle store."""

from __future__ import annotations

from dva.io.cs import read_cs, write_cs
from dva.io.mask import load_mask
from dva.io.mrc import StackReader, read_volume, write_volume
from dva.io.particles import read_particles
from dva.io.star import read_star, write_star
from dva.io.store import import_particles, open_store

__all__ = [
    "StackReader",
    "import_particles",
    "load_mask",
    "open_store",
    "read_cs",
    "read_particles",
    "read_star",
    "read_volume",
    "write_cs",
    "write_star",
    "write_volume",
]
