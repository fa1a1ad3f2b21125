"""Which worker handles which particles, and which chunks stay in its memory between passes.

The particles are split into tasks, the same number of particles for every worker. Each worker keeps
its chunks prepared and resident (host memory on CPU workers, device memory on GPU workers) while
they fit in `RESIDENT_FRACTION` of the memory it has left; a GPU worker then keeps more in
`RESIDENT_FRACTION` of its host memory (`tasks.HostChunk`, copied to the device by each task); the
rest are streamed: read from the store and prepared again inside every task that needs them, then
dropped (each worker reads its next streamed chunk in the background while a task works on the
one before). Tasks are pinned to their worker but may move when it is gone (dask then recomputes
what was lost). When every worker a pass's tasks were pinned to has gone, dask keeps those tasks
for the lost addresses even where other workers may run them (dask/distributed#7346): `settle`
notices, and `repin` deals them out again.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, replace

import psutil
from distributed import Client, Future, wait
from distributed.comm.core import CommClosedError

from dva.em.chunk import chunk_bytes_per_particle, make_band
from dva.engine.reduce import add_partials, tree_sum
from dva.engine.tasks import (
    READ_AHEAD,
    ChunkSource,
    collect_held,
    end_run,
    forget_run,
    free_buffers,
    held,
    load_chunk,
    load_host_chunk,
    store_error,
)
from dva.errors import DvaClusterError, DvaInputError

MIN_TASK = 64  # fewest particles per task
STALL_CHECK_S = 5.0  # seconds between checks that a pass is still running
ATTEMPTS = 5  # starts of a pass whose workers were lost
RESIDENT_FRACTION = 0.4  # of the memory a worker has left under its limit (host), or of its GPU's free memory


@dataclass
class Placement:
    """Per task: its particle range, where its chunk is read from, its chunk as the tasks take it
    (a future of the chunk kept on its worker, or the `ChunkSource` itself when streamed every
    pass), its worker, and whether a kept chunk is kept in the host memory of a GPU worker; and
    what memory the workers have to spare for a pass's sums."""

    ranges: list[tuple[int, int]]
    chunks: list[ChunkSource]
    sources: list[Future | ChunkSource]
    workers: list[str]
    on_host: list[bool]
    spare: int | None = None  # least memory a worker has where its tasks run, beside its kept chunks

    @property
    def resident(self) -> int:
        """Particles kept in worker memory between passes (device or host memory on GPU workers)."""
        return sum(b - a for (a, b), s in zip(self.ranges, self.sources, strict=True) if isinstance(s, Future))

    @property
    def host(self) -> int:
        """Of those, the particles GPU workers keep in host memory."""
        return sum(b - a for (a, b), h in zip(self.ranges, self.on_host, strict=True) if h)

    def map(
        self,
        client: Client,
        function: Callable,
        *args,
        shared: object = None,
        per_task: list | None = None,
        total: bool = True,
    ):
        """`function(chunk, [shared,] *args[, per_task[i]])` over every task: the sum of the results
        (`add_partials` in task order; the volume-sized sums added up on each worker as its tasks
        finish, see `tasks.held`, then over the workers in a tree), with `collect_s` (seconds from
        the last task's result to the summed volume-sized sums here), when `total`; else their list.
        `shared` (the model) goes to every worker once.

        A pass that cannot finish (see `settle`), or whose workers' sums do not hold every task
        exactly once, starts again with its tasks on the workers that are left, up to `ATTEMPTS`
        times."""
        for _ in range(ATTEMPTS):
            scattered, outs = [], []
            key = f"{getattr(function, '__name__', 'pass')}-{uuid.uuid4().hex}"
            try:
                client.wait_for_workers(1)
                if shared is not None:
                    scattered.append(_scatter(client, shared))
                outs = self.submit(
                    client, function, *scattered, *args, per_task=per_task, held_key=key if total else None
                )
                if self.settle(client, outs):
                    found = client.gather(outs)
                    if not total:
                        return found
                    t_collect = time.perf_counter()
                    sums = _collect(client, key, len(outs))
                    if sums is not None:
                        return {**add_partials(*found), **sums, "collect_s": time.perf_counter() - t_collect}
                client.cancel(outs)
            except (CancelledError, CommClosedError):
                pass  # workers were lost with what the pass needed (the scattered model with its holders)
            except BaseException:
                # The run stops here (a task's error, an interrupt): the pass's other tasks go, and
                # the sums its finished ones added up on their workers.
                with contextlib.suppress(Exception):
                    client.cancel(outs)
                if total:
                    _free_on_workers(client, collect_held, key)
                raise
            finally:
                # Kept until the results are in: recomputing partials lost with a worker needs it.
                for future in scattered:
                    future.release()
            if total:
                _free_on_workers(client, collect_held, key)  # what a failed pass left on the workers
            self.repin(client)
        raise DvaClusterError(
            f"a pass over the particles lost its workers {ATTEMPTS} times (see the workers' logs: memory "
            "limit, pre-emption?); run the same command with --resume to continue from the last iteration"
        )

    def submit(
        self, client: Client, function: Callable, *args, per_task: list | None = None, held_key: str | None = None
    ) -> list[Future]:
        """`function(chunk, *args[, per_task[i]])` for every task, on its worker (movable when it is
        gone); through `tasks.held` as task i of pass `held_key` when given."""
        return [
            client.submit(
                *((function,) if held_key is None else (held, function, held_key, i)),
                source,
                *args,
                *(() if per_task is None else (per_task[i],)),
                key=None if held_key is None else f"{held_key}-{i}",  # named for `function` on the dashboard
                pure=False,
                workers=[worker],
                allow_other_workers=True,
                priority=-i,  # see `_load`
            )
            for i, (source, worker) in enumerate(zip(self.sources, self.workers, strict=True))
        ]

    def locate(self, client: Client) -> None:
        """Pin each resident chunk's tasks to a worker that holds it now (the one they are pinned
        to while it still does). `who_has` answers by key, in its own order."""
        holders = client.who_has([s for s in self.sources if isinstance(s, Future)])
        for i, source in enumerate(self.sources):
            holding = sorted(holders.get(source.key, ())) if isinstance(source, Future) else []
            if holding and self.workers[i] not in holding:
                self.workers[i] = holding[0]

    def trim(self, client: Client) -> None:
        """Free the read buffers of the workers that stream nothing (their chunks are all resident
        and loaded: call after a pass)."""
        streaming = {w for s, w in zip(self.sources, self.workers, strict=True) if not isinstance(s, Future)}
        idle = sorted(set(self.workers) - streaming)
        if idle:
            _free_on_workers(client, free_buffers, workers=idle)

    def settle(self, client: Client, futures: list[Future]) -> bool:
        """Wait for `futures`. False when they cannot finish: one was cancelled (its scattered
        inputs were lost with every worker holding them), or workers its tasks were pinned to have
        left and the live workers have had nothing to run for two checks."""
        stalled = 0
        while True:
            with contextlib.suppress(TimeoutError):  # still running after STALL_CHECK_S: check on it
                wait(futures, timeout=STALL_CHECK_S)
            if any(f.cancelled() for f in futures):
                return False
            if all(f.done() for f in futures):
                return True
            live = set(client.ncores())
            stuck = bool(live) and not set(self.workers) <= live and not any(client.processing().values())
            stalled = stalled + 1 if stuck else 0
            if stalled >= 2:
                return False

    def repin(self, client: Client) -> None:
        """Deal the tasks of workers that have left to the live ones, re-reading their resident
        chunks there."""
        client.wait_for_workers(1)
        live = sorted(client.ncores())
        gone = [i for i, w in enumerate(self.workers) if w not in live]
        stale = [self.sources[i] for i in gone if isinstance(self.sources[i], Future)]
        for j, i in enumerate(gone):
            self.workers[i] = live[j % len(live)]
            if isinstance(self.sources[i], Future):
                self.sources[i] = _load(client, self.chunks[i], self.workers[i], self.on_host[i], i)
        client.cancel(stale)
        self.link()

    def link(self) -> None:
        """Point each streamed task at the ranges its worker streams next (`following`, cyclic: a
        worker's last streamed tasks name its first ones, for the next pass), to be read ahead
        while the task works (`tasks.read_ahead`)."""
        streamed = [not isinstance(s, Future) for s in self.sources]
        for i, later in following(self.ranges, self.workers, streamed, cyclic=True).items():
            self.sources[i] = replace(self.chunks[i], following=later)

    def release(self, client: Client) -> None:
        """Drop the kept chunks, then free what the workers kept for the run (`tasks.end_run`).
        Called after a failed run too, so it raises nothing (a lost cluster has nothing to free)."""
        kept = [s for s in self.sources if isinstance(s, Future)]
        with contextlib.suppress(Exception):
            client.cancel(kept)
        _free_on_workers(client, end_run, self.chunks[0].backend, [f.key for f in kept])


def _free_on_workers(client: Client, function: Callable, *args, workers: list[str] | None = None) -> None:
    """`function(*args)` on the workers (all, or `workers`) to free what they keep; raises nothing,
    and does nothing when the client has lost its scheduler (a failed run's own error would first
    wait ~30 s for the connection to time out)."""
    if client.status != "running":
        return
    with contextlib.suppress(Exception):
        client.run(function, *args, workers=workers, on_error="ignore")


def following(
    ranges: list[tuple[int, int]], workers: list[str], selected: list[bool], *, cyclic: bool
) -> dict[int, tuple[tuple[int, int], ...]]:
    """For each selected task (index), the ranges of the selected tasks its worker runs after it, in
    order: up to the largest `READ_AHEAD`, each once; `cyclic`: a worker's last tasks continue with
    its first (the next pass), else they name only those after them."""
    depth = max(READ_AHEAD.values())
    out = {}
    for worker in sorted(set(workers)):
        mine = [i for i, (w, chosen) in enumerate(zip(workers, selected, strict=True)) if w == worker and chosen]
        for n, i in enumerate(mine):
            count = min(depth, len(mine)) if cyclic else min(depth, len(mine) - n - 1)
            out[i] = tuple(ranges[mine[(n + d) % len(mine)]] for d in range(1, count + 1))
    return out


def deal_tasks(n: int, chunk: int, workers: int, aligned: bool = True) -> tuple[list[tuple[int, int]], list[int]]:
    """Particle ranges of the tasks, and the worker (index) of each: `[0, n)` cut into `2·workers`
    equal segments (each worker takes two, so every worker gets the same number of particles and
    at least two tasks), each cut into tasks of at most `chunk` particles: at the store's chunk
    edges when `aligned` (no task spans two chunks), else into equal parts."""
    segments = max(1, min(2 * workers, n // MIN_TASK))
    cuts = [n * j // segments for j in range(segments + 1)]
    edges = set(cuts)
    if aligned:
        edges |= set(range(0, n, chunk))
    else:
        for a, b in itertools.pairwise(cuts):
            parts = -(-(b - a) // chunk)  # ceil
            edges |= {a + (b - a) * i // parts for i in range(parts)}
    ranges = list(itertools.pairwise(sorted(edges)))
    owners = [(bisect.bisect_right(cuts, a) - 1) % workers for a, _ in ranges]
    return ranges, owners


def _memory_budget(backend: str, reserve: int = 0, dask_worker=None) -> tuple[int | None, int, int | None]:
    """Bytes of prepared chunks this worker may keep where its tasks run (its GPU's memory on GPU
    workers, else its host memory; None: no limit known) and, on GPU workers with a memory limit,
    in their host memory besides (else 0): a fraction of the memory it has left in each, less
    `reserve` (a pass's sums) where its tasks run; and the memory it has left there (None: no limit
    known)."""
    forget_run(backend)  # what an earlier or failed run left (page-locked memory would count as used)
    limit = dask_worker.memory_manager.memory_limit
    used = psutil.Process().memory_info().rss  # the worker's own start-up (libraries, buffers)
    left = max(0, limit - used) if limit else None
    host = int(RESIDENT_FRACTION * left) if left is not None else None
    if backend == "cupy":
        import cupy

        free = cupy.cuda.runtime.memGetInfo()[0]
        # No host tier without a memory limit: workers sharing a node would each lock 40% of it.
        return int(RESIDENT_FRACTION * max(0, free - reserve)), host or 0, free
    return (None if left is None else int(RESIDENT_FRACTION * max(0, left - reserve))), 0, left


def measure_memory(client: Client, backend: str, box: int, sums: tuple[int, str, str]) -> dict[str, tuple]:
    """Each worker's `_memory_budget` (and each forgets what an earlier run left), once every
    worker has been checked to have the memory for `sums`: the bytes a pass at `box` needs per
    worker, what they are, and the options that make them smaller. One that has not is named in
    the `DvaInputError`, with what to change."""
    reserve, what, smaller = sums
    measured = client.run(_memory_budget, backend, reserve)
    short = sorted((left, w) for w, (_, _, left) in measured.items() if left is not None and left < reserve)
    if short:
        left, worker = short[0]
        if backend == "cupy":
            where, fix = "free on its GPU", f"use {smaller} (or GPUs with more memory)"
        else:
            where = "left under its memory limit"
            fix = f"give each worker more memory (fewer --workers, a larger --memory-limit), or use {smaller}"
        raise DvaInputError(
            f"a pass at box {box} needs {reserve / 1e9:.1f} GB per worker for {what}, and worker {worker} has "
            f"{left / 1e9:.1f} GB {where}: {fix}"
        )
    return measured


def place_chunks(
    client: Client,
    store: str,
    n: int,
    chunk: int,
    box: int,
    backend: str,
    resident_bytes: int | None = None,
    aligned: bool = True,
    host_bytes: int | None = None,
    sums: tuple[int, str, str] = (0, "", "a smaller --box"),
) -> Placement:
    """Deal the first `n` particles of `store` to the workers and start reading the chunks they keep.

    Tasks take at most `chunk` particles, within the store's chunks when `aligned` (see
    `store.task_limits`). `resident_bytes` caps the prepared chunks kept per worker where its tasks
    run, `host_bytes` those a GPU worker keeps in its host memory besides (default: from each
    worker's memory, less the `sums` a pass needs: bytes per worker, what they are, and the options
    that make them smaller). First checks that every worker can open the store and has the memory
    for those sums, and names one that cannot or has not."""
    client.wait_for_workers(1)
    failures = {w: e for w, e in client.run(store_error, store).items() if e is not None}
    if failures:
        worker, error = next(iter(failures.items()))
        raise DvaInputError(
            f"{store}: worker {worker} cannot open the store ({error}); every worker must see it at this "
            f"path (a shared filesystem or an object-store URL)"
        )
    addresses = sorted(client.ncores())  # asks the scheduler now (scheduler_info() may be stale)
    # Also when both budgets are given: each worker forgets what an earlier run left (`forget_run`).
    measured = measure_memory(client, backend, box, sums)
    budgets = {}  # per worker: bytes to keep where its tasks run, and in host memory besides
    for w in addresses:
        device, host, _ = measured.get(w, (None, 0, None))
        if resident_bytes is not None:
            device = resident_bytes
        if host_bytes is not None:
            host = host_bytes
        budgets[w] = device, host if backend == "cupy" else 0  # (CPU workers' tasks run in host memory)
    per_particle = chunk_bytes_per_particle(make_band(box))
    ranges, owners = deal_tasks(n, chunk, len(addresses), aligned)
    used = {w: [0, 0] for w in addresses}  # bytes kept where tasks run, and in host memory besides
    chunks = [ChunkSource(store, a, b, box, backend) for a, b in ranges]
    workers = [addresses[owner] for owner in owners]
    kept, on_host = [], []
    for (a, b), worker in zip(ranges, workers, strict=True):
        size, budget = (b - a) * per_particle, budgets[worker]
        tier = next((t for t in (0, 1) if budget[t] is None or used[worker][t] + size <= budget[t]), None)
        if tier is not None:
            used[worker][tier] += size
        kept.append(tier is not None)
        on_host.append(tier == 1)
    # Each worker loads the chunks it keeps in order, reading the next ones ahead meanwhile.
    loads = following(ranges, workers, kept, cyclic=False)
    sources: list[Future | ChunkSource] = [
        _load(client, replace(source, following=loads[i]), workers[i], on_host[i], i) if kept[i] else source
        for i, source in enumerate(chunks)
    ]
    lefts = [measured[w][2] - used[w][0] for w in addresses if w in measured and measured[w][2] is not None]
    placement = Placement(ranges, chunks, sources, workers, on_host, min(lefts) if lefts else None)
    placement.link()
    return placement


def _collect(client: Client, key: str, tasks: int) -> dict | None:
    """The volume-sized sums of pass `key`: each worker's (`collect_held`, a task on it) summed in a
    tree on the workers, the total gathered; None when they do not hold each of its `tasks` exactly
    once (a worker was lost, or a task ran twice)."""
    held_by = [
        client.submit(collect_held, key, pure=False, workers=[worker], allow_other_workers=True)
        for worker in sorted(client.ncores())
    ]
    total = client.gather(tree_sum(client, held_by))
    return total if sorted(total.pop("tasks")) == list(range(tasks)) else None


def _scatter(client: Client, shared: object) -> Future:
    """Send `shared` to one worker; the others fetch it from there (or from each other) when their
    first task needs it. Not `broadcast=True`: the scheduler's replication of it retries a worker
    that died meanwhile forever (seen as a hung run when a worker was killed mid-run)."""
    try:
        return client.scatter(shared, hash=False)
    except OSError as error:  # the worker it went to had died: the pass starts again
        raise CommClosedError(str(error)) from error


def _load(client: Client, source: ChunkSource, worker: str, on_host: bool, order: int) -> Future:
    """Read and prepare a chunk on `worker`, to keep there (`on_host`: in a GPU worker's host memory);
    `order`, its task's place among all the tasks, is its priority (higher first): a worker runs its
    tasks in their order, which its reads ahead follow (`following`). Tasks submitted at once share
    the scheduler's priority (a "generation" per 100 ms), and a worker ran them in an order of their
    keys, reading ahead the wrong chunks. A pass's tasks take the same priorities, so a worker runs
    task i of the first pass as soon as chunk i is loaded."""
    return client.submit(
        load_host_chunk if on_host else load_chunk,
        source,
        pure=False,
        workers=[worker],
        allow_other_workers=True,
        priority=-order,
    )
