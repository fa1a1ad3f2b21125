"""Which dask cluster a job runs on: a running scheduler, or an embedded local one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import dask
from distributed import Client, LocalCluster

MMAP_THRESHOLD = 2**30  # bytes


@dataclass
class Cluster:
    """A connected client, the array backend its workers use, and what to close at the end."""

    client: Client
    backend: str  # "numpy" or "cupy"
    local: LocalCluster | None

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()


def gpu_count() -> int:
    """CUDA devices visible to CuPy (0 when CuPy or a driver is missing)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def connect(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    gpus: str | None = None,
    dashboard: str = ":0",
) -> Cluster:
    """Join `scheduler` (or `DASK_SCHEDULER_ADDRESS`), else start a LocalCUDACluster when GPUs are
    visible (all, or the comma-separated `gpus`; `gpus="none"` forces CPU), else a LocalCluster of
    `workers` single-threaded processes (default: one per core)."""
    scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if scheduler:
        client = Client(scheduler)
        return Cluster(client=client, backend="cupy" if gpus not in (None, "none") else "numpy", local=None)
    if gpus != "none" and gpu_count() > 0:
        from dask_cuda import LocalCUDACluster

        local = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=gpus, threads_per_worker=1, dashboard_address=dashboard, silence_logs=40
        )
        return Cluster(client=Client(local), backend="cupy", local=local)
    # dask sets MALLOC_TRIM_THRESHOLD_ in workers, which also pins glibc's mmap threshold: every
    # large temporary is then mmapped and unmapped, and the E/M pass ran 2x slower. Keep them on the heap.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}):
        local = LocalCluster(
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            silence_logs=40,
        )
    return Cluster(client=Client(local), backend="numpy", local=local)
