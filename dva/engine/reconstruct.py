"""Reconstructions of weighted particle subsets as one map-reduce pass (the display job's volumes).

Each subset g is a direct Fourier reconstruction (`dva.em.mean`) in which particle i counts with
weight `w_ig`: the mean's pass with G groups at once, on the same chunks and workers as a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dva.em.chunk import sums_bytes
from dva.engine.cluster import Cluster
from dva.engine.loop import driver_module, mean_volume, release_driver
from dva.engine.placement import place_chunks
from dva.engine.tasks import mean_partial
from dva.io.store import open_store, store_location, task_limits

MAX_GROUPS = 32  # subsets per pass at most (each task holds 3·G volumes of float64)
# Of the memory a worker has to spare, what its subsets' sums may take (the rest: its tasks' own arrays).
SUMS_SHARE = 0.75


def subsets_per_pass(spare: int | None, subset_bytes: int) -> int:
    """Subsets reconstructed in one pass: as many, up to `MAX_GROUPS`, as `SUMS_SHARE` of the
    workers' `spare` memory (bytes; None: unknown) holds the sums of (`subset_bytes` each:
    `sums_bytes` of 3 channels, 0.31 GB at box 256), and at least one."""
    if spare is None:
        return MAX_GROUPS
    return max(1, min(MAX_GROUPS, int(SUMS_SHARE * spare) // subset_bytes))


def reconstruct_subsets(
    store: str | Path, weights: np.ndarray, box: int, scale: str, data_sign: float, cluster: Cluster
) -> np.ndarray:
    """Volumes `(G, D, D, D)` float32 in map units of the subsets `weights (N, G)` of the store's first N
    particles, Fourier-cropped to `box`; `data_sign` as the run applied it."""
    store = store_location(store)
    images, _, _ = open_store(store)
    client, backend = cluster.client, cluster.backend
    driver = driver_module(cluster)  # its GPU solves the volumes where it has one
    chunk, aligned = task_limits(images, backend)
    one = (sums_bytes(box, 3), "the sums of a particle subset", "a run at a smaller --box")
    placement = place_chunks(client, store, len(weights), chunk, box, backend, aligned=aligned, sums=one)
    per_pass = subsets_per_pass(placement.spare, one[0])
    volumes = []
    try:
        for lo in range(0, weights.shape[1], per_pass):
            part = np.ascontiguousarray(weights[:, lo : lo + per_pass], dtype=np.float64)
            per_task = [part[a:b] for a, b in placement.ranges]
            stats = placement.map(client, mean_partial, box, scale, backend, per_task=per_task)
            volumes += [mean_volume(stats, g, box, driver) * data_sign for g in range(part.shape[1])]
    finally:
        placement.release(client)
        release_driver(driver)
    return np.stack(volumes).astype(np.float32)
