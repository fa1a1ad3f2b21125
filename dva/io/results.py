"""The outputs of `dva run` (DESIGN.md §4), every file written atomically.

`<prefix>_map.mrc`, `<prefix>_component_<k>.mrc`, `<prefix>_particles.cs` (uid plus
`components_mode_<k>/component` and `components_mode_<k>/value`), `<prefix>_particles.star`
(the input rows in RELION 3.1 form plus `dvaComponent<k>` columns), `<prefix>_coordinates.zarr`
(xarray: `z (particle, mode)`, `alpha (particle)`, `uid (particle)`) and `job.json`.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import xarray as xr

from dva import __version__
from dva.io.atomic import atomic_path
from dva.io.cs import write_cs
from dva.io.mrc import write_volume
from dva.io.star import write_star

VERSIONED = ("numpy", "dask", "distributed", "zarr", "xarray", "mrcfile", "starfile")


def star_column(k: int) -> str:
    """The .star column holding reaction coordinate k (0-based)."""
    return f"dvaComponent{k}"


def write_results(out_dir: Path, prefix: str, result, table: xr.Dataset, job: dict) -> list[Path]:
    """Write every output of a run into `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{prefix}_map.mrc"]
    write_volume(written[0], result.mean, result.pixel_size_A)
    for k, comp in enumerate(result.components):
        path = out_dir / f"{prefix}_component_{k}.mrc"
        write_volume(path, comp, result.pixel_size_A)
        written.append(path)
    z = result.z
    modes = z.shape[1]
    fields: dict[str, np.ndarray] = {}
    for k in range(modes):
        fields[f"components_mode_{k}/component"] = np.full(len(z), k, dtype=np.uint32)
        fields[f"components_mode_{k}/value"] = z[:, k].astype(np.float32)
    written.append(out_dir / f"{prefix}_particles.cs")
    write_cs(written[-1], table, extra_fields=fields)
    written.append(out_dir / f"{prefix}_particles.star")
    write_star(written[-1], table, extra_columns={star_column(k): z[:, k] for k in range(modes)})
    coords = xr.Dataset(
        {
            "z": (("particle", "mode"), z),
            "alpha": (("particle",), result.alpha),
            "uid": (("particle",), table["uid"].to_numpy()),
            "variance": (("mode",), np.asarray(result.variances, dtype=np.float64)),
        },
        attrs={"pixel_size_A": result.pixel_size_A, "box": result.box},
    )
    written.append(out_dir / f"{prefix}_coordinates.zarr")
    with atomic_path(written[-1]) as tmp:
        coords.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
    document = {
        "type": "var_3D",
        "dva_version": __version__,
        "versions": {"python": platform.python_version(), **{p: version(p) for p in VERSIONED}},
        **job,
        "particles": result.particles,
        "box": result.box,
        "pixel_size_A": result.pixel_size_A,
        "data_sign_applied": result.data_sign,
        "parameters": result.params,
        "variances": [float(v) for v in result.variances],
        "timings_s": result.timings,
        "iterations": result.metrics,
        "outputs": [p.name for p in written],
    }
    written.append(out_dir / "job.json")
    with atomic_path(written[-1]) as tmp:
        tmp.write_text(json.dumps(document, indent=2))
    return written
