"""Functions that run on the workers: read a chunk from zarr, and the per-chunk passes."""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import xarray as xr
import zarr

from dva.em.chunk import Band, Chunk, make_band, prepare_chunk
from dva.em.estep import em_statistics
from dva.em.mean import mean_statistics
from dva.em.model import Model
from dva.io.table import CTF_FIELDS

ROW_FIELDS = ("rotation", "shift_px", "pixel_size_A", *CTF_FIELDS)


def array_module(backend: str) -> ModuleType:
    if backend == "cupy":
        import cupy

        return cupy
    return np


def load_chunk(store: str, start: int, stop: int, box: int, backend: str) -> Chunk:
    """Read particles `start:stop` of the store on this worker and prepare them (stays resident)."""
    xp = array_module(backend)
    root = zarr.open_group(store, mode="r")
    images = root["images"][start:stop]
    table = xr.open_zarr(store, group="particles", consolidated=False).isel(particle=slice(start, stop))
    rows = {name: table[name].to_numpy() for name in ROW_FIELDS}
    return prepare_chunk(images, rows, _band(box, backend), int(root.attrs["original_box"]), xp)


@functools.lru_cache(maxsize=4)
def _band(box: int, backend: str) -> Band:
    """The band, built once per worker process (every task of every iteration reuses it)."""
    return make_band(box, array_module(backend))


def _host(d: dict) -> dict:
    """Arrays back to NumPy (partials travel between workers and to the driver)."""
    return {k: (v.get() if hasattr(v, "get") and not isinstance(v, float) else v) for k, v in d.items()}


def mean_partial(chunk: Chunk, box: int, scale: str, backend: str, weights: np.ndarray | None = None) -> dict:
    """Reconstruction sums of one chunk: the mean, or with `weights (n, G)` G particle subsets."""
    return _host(mean_statistics(chunk, _band(box, backend), scale, array_module(backend), weights))


def _on_device(model: Model, backend: str) -> Model:
    xp = array_module(backend)
    return Model(
        volumes=xp.asarray(model.volumes),
        noise_inverse=xp.asarray(model.noise_inverse),
        eps=model.eps,
        scale=model.scale,
        data_sign=model.data_sign,
        scale_prior=model.scale_prior,
    )


def em_partial(chunk: Chunk, model: Model, box: int, backend: str, keep: np.ndarray | None = None) -> dict:
    """Summable statistics of one chunk (of its `keep` particles when given) for the M-step."""
    out = em_statistics(chunk, _on_device(model, backend), _band(box, backend), keep=keep, xp=array_module(backend))
    for unused in ("z", "alpha", "zcov"):
        out.pop(unused)
    return _host(out)


def em_coordinates(chunk: Chunk, model: Model, box: int, backend: str, keep: np.ndarray | None = None) -> dict:
    """Coordinates `z (n, K)`, scales `alpha (n,)` and summed noise covariance `zcov` of one chunk
    (of its `keep` particles when given)."""
    out = em_statistics(
        chunk, _on_device(model, backend), _band(box, backend), statistics=False, keep=keep, xp=array_module(backend)
    )
    return _host({"z": out["z"], "alpha": out["alpha"], "zcov": out["zcov"]})
