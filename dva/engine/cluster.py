"""Which dask cluster a job runs on: a running scheduler, or an embedded local one."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask
from dask.system import cpu_count
from distributed import Client, LocalCluster
from distributed.security import Security

from dva.errors import DvaInputError

MMAP_THRESHOLD = 2**30  # bytes
TRIM_UNDER_LIMIT = 2**16  # bytes: dask's own
# dva keeps what fits resident and re-reads the rest from the store (dva.engine.placement): dask's
# own spilling of those chunks to local disk would only be a slower copy of the store. Nor may a
# worker pause: memory that the heap keeps after a task (see MMAP_THRESHOLD) does not go down while
# it waits, and with every worker paused a run waits forever (seen under --memory-limit 800MB).
# Workers are still restarted at 95% of the limit. Nor does the scheduler steal tasks: every worker
# gets the same share of particles (`deal_tasks`), and a stolen task drags its resident chunk to
# another worker (dva bench 20k box 64 K=3, 2 workers: 16.0 s per iteration without, 17.7 with).
EMBEDDED = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.scheduler.work-stealing": False,
}
# Local workers log only what stops them: at ERROR they printed tracebacks of comms that the
# driver's exit cut ("failed during get data ... Connection reset by peer") into a stopped run's
# output; a failed task reaches the driver as its exception, said there in one line.
WORKER_LOG_LEVEL = logging.CRITICAL


@dataclass
class Cluster:
    """A connected client, the array backend its workers use, what to close at the end, and the
    GPU (an index among those this process sees) where the driver works when the workers use CuPy
    and this process sees a GPU: the first of an embedded cluster's `--gpus` (None: the driver
    works on NumPy, not on a GPU it cannot tell is one of those)."""

    client: Client
    backend: str  # "numpy" or "cupy"
    local: LocalCluster | None
    driver_gpu: int | None = 0

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()


def first_gpu(gpus: str | None) -> int | None:
    """The first GPU of `--gpus` ("2,3" → 2: the machine's numbers, as the workers take them) as this
    process numbers them: its place in this process's `CUDA_VISIBLE_DEVICES` when that is set. 0
    for all GPUs; None for a GPU named otherwise (a UUID) or one this process does not see."""
    if not gpus:
        return 0
    first = gpus.split(",")[0].strip()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        return visible.index(first) if first in visible else None
    return int(first) if first.isdigit() else None


def gpu_count() -> int:
    """CUDA devices visible to CuPy (0 when CuPy or a driver is missing)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (Python keeps an inherited SIG_IGN): Ctrl-C in a
    terminal reaches the whole process group, and only the driver should stop (and say so once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_heap(memory_limit: str | None, gpu: bool) -> dict[str, str]:
    """glibc's malloc settings for embedded workers (`memory_limit`: the user's, per worker).

    dask sets MALLOC_TRIM_THRESHOLD_ (64 kB) in workers, which also pins glibc's mmap threshold:
    every large temporary is then mmapped and unmapped, and the E/M pass ran 2x slower. Keep them
    on the heap, and the heap's top too (with a 64 kB trim every batch's temporaries went back to
    the kernel and came back as fresh zeroed pages: twice the page faults, 1.7x the system time),
    except under a memory limit: there the heap's top is trimmed at 64 kB as dask has it (a heap
    keeping what was freed grew past 800 MB and its workers were restarted), but temporaries stay
    off mmap all the same (20k particles of box 64 under 800 MB: 3.8 s per iteration, not 7.3 s).

    GPU workers' large host allocations are the store reads through zarr (of stores that
    `dva.io.shards` cannot read straight into their buffers: compressed or remote; zarr reads a
    whole shard, 134 MB at box 128), made in read-ahead threads, whose own malloc arenas cannot hold
    more than 64 MB at once: each read was mmapped afresh whatever the thresholds (0.9 GB/s in a
    thread here, 1.3 with the thresholds alone). One arena for all threads keeps them on the heap
    too: 3.2 GB/s. CPU workers keep their arenas: their streamed passes ran 15% faster with one, but
    whole iterations were no faster (the driver's M-step beside them took twice the system time).
    """
    return {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_UNDER_LIMIT if memory_limit else MMAP_THRESHOLD),
        # 0: glibc's own number of arenas, said all the same: a nanny that restarts its worker
        # leaves its settings in this process's environment, for the next cluster's workers.
        "MALLOC_ARENA_MAX": "1" if gpu else "0",
    }


def _respawn(environ: dict[str, str]) -> dict[str, str]:
    """dask settings that give a nanny's restarted worker `environ` too."""
    return {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment while workers are started, as they spawn with it.
    dask's `pre-spawn-environ` setting alone is not enough: the nanny writes it into this process's
    environment, where it overrides the setting for every later cluster (a second cluster kept the
    first's). The setting is still needed for the nanny's restarts of its worker."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tls_security(ca_file: Path | None, cert: Path | None, key: Path | None) -> Security | None:
    """Client-side TLS (CA, certificate and key files, as dask's own CLI names them); None when none given."""
    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    for option, path in given.items():
        if path is None:
            raise DvaInputError(f"{option}: TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
        if not Path(path).is_file():
            raise DvaInputError(f"{path}: {option} file not found")
    return Security(
        tls_ca_file=str(ca_file), tls_client_cert=str(cert), tls_client_key=str(key), require_encryption=True
    )


def connect(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    gpus: str | None = None,
    memory_limit: str | None = None,
    security: Security | None = None,
    dashboard: str = ":0",
) -> Cluster:
    """Join `scheduler` (or `DASK_SCHEDULER_ADDRESS`), else start a LocalCUDACluster when GPUs are
    visible (all, or the comma-separated `gpus`; `gpus="none"` forces CPU), else a LocalCluster of
    `workers` single-threaded processes (default: one per core this process may run on, its
    affinity and cgroup quota: `dask.system.cpu_count`). `memory_limit` ("8GB") is per worker of
    an embedded cluster; `security` is TLS to a running scheduler.

    On a running cluster the workers use CuPy when every one of them sees a GPU (and `gpus` is not
    "none"); this waits for the first worker to join."""
    scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if security is not None and not scheduler:
        raise DvaInputError(
            "--tls-ca-file/--tls-cert/--tls-key: TLS is for a running scheduler; give --scheduler tls://HOST:PORT"
        )
    if scheduler:
        try:  # a probe first: a Client that fails to start can stay dask's default scheduler
            Client(scheduler, security=security, timeout="30s", set_as_default=False).close()
        except Exception as exc:  # refused, timed out, TLS mismatch: all mean the same to a user
            raise DvaInputError(f"--scheduler {scheduler}: cannot connect ({exc})".replace("\n", " ")) from None
        client = Client(scheduler, security=security, timeout="30s")
        client.wait_for_workers(1)
        found = client.run(gpu_count).values() if gpus != "none" else [0]
        return Cluster(client=client, backend="cupy" if min(found) > 0 else "numpy", local=None)
    if gpus != "none" and gpu_count() > 0:
        from dask_cuda import LocalCUDACluster

        heap = _worker_heap(memory_limit, gpu=True)
        with dask.config.set({**EMBEDDED, **_respawn(heap)}), _environ(heap), _workers_ignore_ctrl_c():
            local = LocalCUDACluster(
                CUDA_VISIBLE_DEVICES=gpus,
                threads_per_worker=1,
                memory_limit=memory_limit or "auto",
                dashboard_address=dashboard,
                silence_logs=WORKER_LOG_LEVEL,
            )
        return Cluster(client=Client(local), backend="cupy", local=local, driver_gpu=first_gpu(gpus))
    heap = _worker_heap(memory_limit, gpu=False)
    with dask.config.set({**EMBEDDED, **_respawn(heap)}), _environ(heap), _workers_ignore_ctrl_c():
        local = LocalCluster(
            n_workers=workers or cpu_count(),
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit or "auto",
            dashboard_address=dashboard,
            silence_logs=WORKER_LOG_LEVEL,
        )
    return Cluster(client=Client(local), backend="numpy", local=local)
