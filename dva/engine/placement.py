"""Which worker handles which particles, and which chunks stay in its memory between passes.

The store's chunks are split into tasks and dealt round-robin to the workers. Each worker keeps
its chunks prepared and resident (host memory on CPU workers, device memory on GPU workers) while
they fit in `RESIDENT_FRACTION` of the memory it has left; the rest are streamed: read from the store and
prepared again inside every task that needs them, then dropped. Tasks are pinned to their worker
but may move when it is gone (dask then recomputes what was lost).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from distributed import Client, Future

from dva.em.chunk import chunk_bytes_per_particle, make_band
from dva.engine.tasks import ChunkSource, load_chunk, store_error
from dva.errors import DvaInputError

MIN_TASK = 64  # fewest particles per task
RESIDENT_FRACTION = 0.4  # of the memory a worker has left under its limit (host), or of its GPU's free memory


@dataclass
class Placement:
    """Per task: its particle range, its chunk (a resident future, or a `ChunkSource` streamed
    every pass) and the worker it runs on."""

    ranges: list[tuple[int, int]]
    sources: list[Future | ChunkSource]
    workers: list[str]

    @property
    def resident(self) -> int:
        """Particles kept in worker memory between passes."""
        return sum(b - a for (a, b), s in zip(self.ranges, self.sources, strict=True) if isinstance(s, Future))

    def submit(self, client: Client, function: Callable, *args, per_task: list | None = None) -> list[Future]:
        """`function(chunk, *args[, per_task[i]])` for every task, on its worker (movable when it is gone)."""
        return [
            client.submit(
                function,
                source,
                *args,
                *(() if per_task is None else (per_task[i],)),
                pure=False,
                workers=[worker],
                allow_other_workers=True,
            )
            for i, (source, worker) in enumerate(zip(self.sources, self.workers, strict=True))
        ]

    def locate(self, client: Client) -> None:
        """Pin each resident chunk's tasks to the worker that holds it now."""
        resident = [s for s in self.sources if isinstance(s, Future)]
        holders = dict(zip([f.key for f in resident], client.who_has(resident).values(), strict=True))
        for i, source in enumerate(self.sources):
            if isinstance(source, Future) and holders.get(source.key):
                self.workers[i] = next(iter(holders[source.key]))

    def release(self, client: Client) -> None:
        client.cancel([s for s in self.sources if isinstance(s, Future)])


def task_ranges(n: int, chunk: int, workers: int) -> list[tuple[int, int]]:
    """Particle ranges of the tasks: each store chunk split into equal pieces, so that every worker
    gets at least two tasks and no task spans two zarr chunks."""
    target = max(MIN_TASK, -(-n // (2 * workers)))
    ranges = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        pieces = -(-(hi - lo) // target)
        edges = [lo + (hi - lo) * i // pieces for i in range(pieces + 1)]
        ranges += list(itertools.pairwise(edges))
    return ranges


def _memory_budget(backend: str, dask_worker=None) -> int | None:
    """Bytes of prepared chunks this worker may keep: a fraction of the memory it has left (of its
    GPU's memory on GPU workers; None: no limit known)."""
    if backend == "cupy":
        import cupy

        return int(RESIDENT_FRACTION * cupy.cuda.runtime.memGetInfo()[0])
    limit = dask_worker.memory_manager.memory_limit
    if not limit:
        return None
    used = psutil.Process().memory_info().rss  # the worker's own start-up (libraries, buffers)
    return max(0, int(RESIDENT_FRACTION * (limit - used)))


def place_chunks(
    client: Client, store: str, n: int, chunk: int, box: int, backend: str, resident_bytes: int | None = None
) -> Placement:
    """Deal the first `n` particles of `store` to the workers and start reading the resident chunks.

    `resident_bytes` caps the prepared chunks kept per worker (default: from each worker's memory).
    First checks that every worker can open the store, and names it when one cannot."""
    client.wait_for_workers(1)
    failures = {w: e for w, e in client.run(store_error, store).items() if e is not None}
    if failures:
        worker, error = next(iter(failures.items()))
        raise DvaInputError(
            f"{store}: worker {worker} cannot open the store ({error}); every worker must see it at this "
            f"path (a shared filesystem or an object-store URL)"
        )
    addresses = sorted(client.ncores())  # asks the scheduler now (scheduler_info() may be stale)
    budgets = (
        client.run(_memory_budget, backend) if resident_bytes is None else dict.fromkeys(addresses, resident_bytes)
    )
    per_particle = chunk_bytes_per_particle(make_band(box))
    ranges = task_ranges(n, chunk, len(addresses))
    used = dict.fromkeys(addresses, 0)
    sources: list[Future | ChunkSource] = []
    workers = []
    for i, (a, b) in enumerate(ranges):
        worker = addresses[i % len(addresses)]
        source = ChunkSource(store, a, b, box, backend)
        budget = budgets.get(worker)
        if budget is None or used[worker] + (b - a) * per_particle <= budget:
            used[worker] += (b - a) * per_particle
            source = client.submit(load_chunk, source, pure=False, workers=[worker], allow_other_workers=True)
        sources.append(source)
        workers.append(worker)
    return Placement(ranges, sources, workers)
