"""The outputs of `dva run` (DESIGN.md §4), every file written atomically.

`<prefix>_map.mrc`, `<prefix>_component_<k>.mrc`, `<prefix>_particles.cs` (uid plus
`components_mode_<k>/component` and `components_mode_<k>/value`), `<prefix>_particles.star`
(the input rows in RELION 3.1 form plus `dvaComponent<k>` columns), `<prefix>_coordinates.zarr`
(xarray: `z (particle, mode)`, `alpha (particle)`, `uid (particle)`) and `job.json`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import xarray as xr

from dva import __version__
from dva.errors import DvaInputError
from dva.io.atomic import atomic_path
from dva.io.cs import write_cs
from dva.io.mrc import read_volume, write_volume
from dva.io.star import write_star

VERSIONED = ("numpy", "dask", "distributed", "zarr", "xarray", "mrcfile", "starfile")


def star_column(k: int) -> str:
    """The .star column holding reaction coordinate k (0-based)."""
    return f"dvaComponent{k}"


def write_particles(stem: Path, table: xr.Dataset, z: np.ndarray) -> list[Path]:
    """`<stem>.cs` and `<stem>.star`: the particles of `table` (every input column carried through)
    plus their coordinates `z (n, K)` as `components_mode_<k>/component|value` and `dvaComponent<k>`."""
    fields: dict[str, np.ndarray] = {}
    for k in range(z.shape[1]):
        fields[f"components_mode_{k}/component"] = np.full(len(z), k, dtype=np.uint32)
        fields[f"components_mode_{k}/value"] = z[:, k].astype(np.float32)
    cs, star = stem.with_name(stem.name + ".cs"), stem.with_name(stem.name + ".star")
    write_cs(cs, table, extra_fields=fields)
    write_star(star, table, extra_columns={star_column(k): z[:, k] for k in range(z.shape[1])})
    return [cs, star]


def write_results(out_dir: Path, prefix: str, result, table: xr.Dataset, job: dict) -> list[Path]:
    """Write every output of a run into `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{prefix}_map.mrc"]
    write_volume(written[0], result.mean, result.pixel_size_A)
    for k, comp in enumerate(result.components):
        path = out_dir / f"{prefix}_component_{k}.mrc"
        write_volume(path, comp, result.pixel_size_A)
        written.append(path)
    halves = result.halves
    if halves is not None:  # split-half validation: each half's components, aligned to the full ones
        for h, comps in zip("AB", halves["components"], strict=True):
            for k, comp in enumerate(comps):
                path = out_dir / f"{prefix}_component_{k}_half_{h}.mrc"
                write_volume(path, comp, result.pixel_size_A)
                written.append(path)
    z = result.z
    written += write_particles(out_dir / f"{prefix}_particles", table, z)
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
        "resident_particles": result.resident_particles,
        "host_particles": result.host_particles,
        "resumed_at_iteration": result.resumed_at_iteration,
        "iterations": result.metrics,
        "halfsets": None if halves is None else {k: v for k, v in halves.items() if k != "components"},
        "outputs": [p.name for p in written],
    }
    written.append(out_dir / "job.json")
    with atomic_path(written[-1]) as tmp:
        tmp.write_text(json.dumps(document, indent=2))
    return written


@dataclass(frozen=True)
class RunOutputs:
    """A finished run read back from its folder (what the display job starts from)."""

    folder: Path
    prefix: str
    mean: np.ndarray  # (D, D, D)
    components: np.ndarray  # (K, D, D, D)
    z: np.ndarray  # (N, K)
    uid: np.ndarray  # (N,)
    pixel_size_A: float
    job: dict


def read_results(run_dir: str | Path) -> RunOutputs:
    """Read the outputs of `dva run` in `run_dir`; DvaInputError names a missing or foreign piece."""
    run_dir = Path(run_dir)
    job_path = run_dir / "job.json"
    if not job_path.is_file():
        raise DvaInputError(f"{run_dir}: no job.json (not the output folder of dva run)")
    try:
        job = json.loads(job_path.read_text())
    except json.JSONDecodeError as e:
        raise DvaInputError(f"{job_path}: not valid JSON ({e.msg})") from None
    if job.get("type") != "var_3D":
        raise DvaInputError(f"{job_path}: field 'type' is {job.get('type')!r}, not 'var_3D'")
    maps = [name for name in job.get("outputs", []) if name.endswith("_map.mrc")]
    if not maps:
        raise DvaInputError(f"{job_path}: field 'outputs' names no <prefix>_map.mrc")
    prefix = maps[0][: -len("_map.mrc")]
    for name in [maps[0], f"{prefix}_coordinates.zarr"]:
        if not (run_dir / name).exists():
            raise DvaInputError(f"{run_dir / name}: missing (job.json lists it)")
    mean, pixel = read_volume(run_dir / maps[0])
    coords = xr.open_zarr(run_dir / f"{prefix}_coordinates.zarr", consolidated=False)
    z = coords["z"].to_numpy()
    components = []
    for k in range(z.shape[1]):
        path = run_dir / f"{prefix}_component_{k}.mrc"
        if not path.is_file():
            raise DvaInputError(f"{path}: missing (the coordinates have {z.shape[1]} modes)")
        components.append(read_volume(path)[0])
    return RunOutputs(
        folder=run_dir,
        prefix=prefix,
        mean=mean,
        components=np.stack(components),
        z=z,
        uid=coords["uid"].to_numpy(),
        pixel_size_A=float(job.get("pixel_size_A", pixel)),
        job=job,
    )
