"""`dva display`: volume series, subset reconstructions and particle subsets (DESIGN.md §4).

Outputs in DIR, named by the run's component numbers (`--components 2` writes `component_2`):
- simple and intermediates: `component_<k>/frame_<fff>.mrc`, `<prefix>_component_<kkk>.zip` (the
  same frames) and `<prefix>_series.cxc` (ChimeraX: `open` it);
- intermediates with exported particles: `component_<k>/frame_<fff>_particles.star` and `.cs`;
- cluster: `<prefix>_cluster_<iii>.mrc`, `<prefix>_cluster_<iii>_particles.star` and `.cs`, and
  `<prefix>_clusters.cxc`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from dva.display.chimerax import series_script, volumes_script
from dva.display.volumes import VolumeOptions, prepare_volume
from dva.engine.cluster import Cluster
from dva.engine.reconstruct import reconstruct_subsets
from dva.io.atomic import atomic_path
from dva.io.mrc import write_volume
from dva.io.results import RunOutputs, write_particles

LEVEL_PERCENTILE = 99.0  # the contour is half the (prepared) mean map's value at this percentile


def contour_level(mean: np.ndarray) -> float:
    """A ChimeraX contour level for maps like `mean`."""
    return 0.5 * float(np.percentile(mean, LEVEL_PERCENTILE))


def write_series(
    out: Path,
    prefix: str,
    series: dict[int, np.ndarray],
    pixel_size_A: float,
    level: float,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write each component's frames `(F, D, D, D)`, its zip and one ChimeraX script; returns the
    frame paths relative to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    every, per_component = [], []
    for k, volumes in series.items():
        (out / f"component_{k}").mkdir(exist_ok=True)
        names = []
        for f, vol in enumerate(volumes):
            names.append(f"component_{k}/frame_{f:03d}.mrc")
            write_volume(out / names[-1], vol, pixel_size_A)
            if progress is not None:
                progress(1)
        with atomic_path(out / f"{prefix}_component_{k:03d}.zip") as tmp, zipfile.ZipFile(tmp, "w") as zf:
            for name in names:
                zf.write(out / name, arcname=name, compress_type=zipfile.ZIP_DEFLATED)
        per_component.append(names)
        every += names
    with atomic_path(out / f"{prefix}_series.cxc") as tmp:
        tmp.write_text(series_script(per_component, level))
    return every


def linear_series(mean: np.ndarray, component: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Frames `V_0 + t·V_k` (simple mode) of a mean and a component already through the volume
    options (all linear, so the order does not matter)."""
    t = np.asarray(positions, dtype=np.float32)[:, None, None, None]
    return mean[None] + t * component[None]


@dataclass(frozen=True)
class Subsets:
    """The particle subsets of intermediates or cluster mode and what to do with them."""

    mode: str  # "intermediates" (groups keyed by component) or "cluster" (one group, "clusters")
    groups: dict  # name -> weights (N, G) of the first N particles
    options: VolumeOptions
    pixel_size_A: float  # of the output volumes
    level: float  # ChimeraX contour
    export: int | str | None  # the group whose subsets are written as .star/.cs (None: none)


def write_subsets(
    run: RunOutputs,
    out: Path,
    store: Path,
    table: xr.Dataset,
    subsets: Subsets,
    cluster: Cluster | None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Export the chosen subsets' particles and, when `cluster` is given, reconstruct every subset
    from the store's particles; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    z = run.z[: len(table["uid"])]
    written: list[Path] = []
    if subsets.export is not None:
        weights = subsets.groups[subsets.export]
        for g in range(weights.shape[1]):
            if subsets.mode == "cluster":
                stem = out / f"{run.prefix}_cluster_{g:03d}_particles"
            else:
                stem = out / f"component_{subsets.export}" / f"frame_{g:03d}_particles"
            stem.parent.mkdir(parents=True, exist_ok=True)
            chosen = np.flatnonzero(weights[:, g] > 0)
            written += write_particles(stem, table.isel(particle=chosen), z[chosen])
    if cluster is None:
        return written
    # Every group's subsets in one call: the particles are read and prepared once.
    scale = run.job.get("parameters", {}).get("scale", "none")
    weights = np.concatenate(list(subsets.groups.values()), axis=1)
    raw = reconstruct_subsets(store, weights, run.job["box"], scale, run.job.get("data_sign_applied", 1.0), cluster)
    volumes, start = {}, 0
    for name, group in subsets.groups.items():
        part = raw[start : start + group.shape[1]]
        start += group.shape[1]
        volumes[name] = np.stack([prepare_volume(v, run.pixel_size_A, subsets.options) for v in part])
        if progress is not None:
            progress(1)
    if subsets.mode == "intermediates":
        frames = write_series(out, run.prefix, volumes, subsets.pixel_size_A, subsets.level)
        return written + [out / f for f in frames]
    names = []
    for g, vol in enumerate(volumes["clusters"]):
        names.append(f"{run.prefix}_cluster_{g:03d}.mrc")
        write_volume(out / names[-1], vol, subsets.pixel_size_A)
    with atomic_path(out / f"{run.prefix}_clusters.cxc") as tmp:
        tmp.write_text(volumes_script(names, subsets.level))
    return written + [out / name for name in names]
