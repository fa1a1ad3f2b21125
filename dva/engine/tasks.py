"""Functions that run on the workers: read a chunk from zarr, and the per-chunk passes."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np
import zarr

from dva.em.chunk import Band, Chunk, make_band, prepare_chunk
from dva.em.estep import em_statistics
from dva.em.mean import mean_statistics
from dva.em.model import Model
from dva.engine.buffers import BufferPool, view
from dva.io.rows import forget_rows, read_rows
from dva.io.shards import read_images
from dva.io.table import CTF_FIELDS

ROW_FIELDS = ("rotation", "shift_px", "pixel_size_A", *CTF_FIELDS)
VOLUME_SUMS = ("G", "b", "num", "den")  # the volume-sized sums a worker keeps through a pass (`held`)
_HELD: dict[str, tuple[list[int], dict]] = {}  # this worker's running sums, by pass: (its tasks, sums)
_COLLECTED: set[str] = set()  # passes already collected here: a task still running then adds nothing
_HELD_LOCK = threading.Lock()  # a worker with several threads runs several tasks at once
_DEVICE_MODELS: dict[tuple[int, str], Model] = {}  # the models of live passes on the device, by (id, backend)
_DEVICE_LOCK = threading.Lock()


def array_module(backend: str) -> ModuleType:
    if backend == "cupy":
        import cupy

        return cupy
    return np


@dataclass(frozen=True)
class ChunkSource:
    """Where a task finds particles `start:stop` of a store (path or fsspec URL), prepared at `box`;
    `following`, when streamed: the particle ranges its worker streams next, in order, the first
    `READ_AHEAD[backend]` of them read ahead meanwhile."""

    store: str
    start: int
    stop: int
    box: int
    backend: str
    following: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Read:
    """A chunk's stored images `(n, D1, D1)` float32 (page-locked host memory for GPU workers), in
    `buffer` (of `_BUFFERS`, given back once they are prepared), its table rows and the store's
    `original_box`: what `prepare_chunk` takes."""

    images: np.ndarray
    buffer: np.ndarray
    rows: dict[str, np.ndarray]
    original_box: int


# Chunks a streaming worker reads ahead, each in its own thread. A GPU worker prepares a chunk far
# faster than one thread reads it (0.02-0.05 s for 2,048 particles of box 128 against 0.1 s to
# read its 134 MB at 1.3 GB/s here; two threads read 2.1 GB/s on 2 cores); a CPU worker's own
# preparation is the slower part (0.2-0.4 s per 2,048 of box 64), so one chunk ahead does.
READ_AHEAD = {"numpy": 1, "cupy": 3}
RELEASE_WAIT_S = 10.0  # at most, for a worker to let go of a run's chunks before it frees their memory
_BUFFERS = BufferPool(keep=max(READ_AHEAD.values()) + 1)  # this worker's host buffers for reads
_READER = ThreadPoolExecutor(max_workers=max(READ_AHEAD.values()), thread_name_prefix="dva-read-ahead")
_AHEAD: dict[ChunkSource, Future] = {}  # the reads ahead on this worker, by source
_AHEAD_LOCK = threading.RLock()  # `read_ahead` drops others while holding it


def read_chunk(source: ChunkSource) -> Read:
    """Read `source`'s particles from the store into one of this worker's host buffers (page-locked
    for GPU workers: copied to the device at 55 instead of 10 GB/s)."""
    root = zarr.open_group(source.store, mode="r")
    images = root["images"]
    shape = (source.stop - source.start, *images.shape[1:])
    pinned = source.backend == "cupy"
    buffer = _BUFFERS.take(int(np.prod(shape)) * images.dtype.itemsize, pinned)
    out = view(buffer, shape, images.dtype)
    read_images(images, source.store, source.start, source.stop, out)
    # The table read with zarr itself, never as dask arrays, which would be computed through the
    # worker's client from inside this task, queued behind the tasks that wait for them.
    rows = read_rows(root, source.store, ROW_FIELDS, source.start, source.stop)
    return Read(out, buffer, rows, int(root.attrs["original_box"]))


def load_chunk(source: ChunkSource) -> Chunk:
    """Read `source`'s particles on this worker (or take them from the reads ahead) and prepare
    them, reading its `following` ranges ahead meanwhile."""
    return _prepare(source, read_ahead(source))


@dataclass(frozen=True)
class HostChunk:
    """A GPU worker's prepared chunk kept in its page-locked host memory (its device memory being
    full): every task that takes it copies it to the device (at 55 GB/s on the H100 against
    2.1 GB/s at best for reading and preparing it again from the store)."""

    chunk: Chunk  # of NumPy arrays
    backend: str

    def on_device(self) -> Chunk:
        return self.chunk.map(array_module(self.backend).asarray)


def load_host_chunk(source: ChunkSource) -> HostChunk:
    """`load_chunk` on the worker's device, then kept in its page-locked host memory."""
    import cupyx

    xp = array_module(source.backend)

    def pinned(a):
        copy = cupyx.empty_pinned(a.shape, a.dtype)
        xp.ascontiguousarray(a).get(out=copy)
        return copy

    return HostChunk(load_chunk(source).map(pinned), source.backend)


def _prepare(source: ChunkSource, read: Read) -> Chunk:
    """`read`'s particles prepared, its buffer given back."""
    xp = array_module(source.backend)
    chunk = prepare_chunk(read.images, read.rows, _band(source.box, source.backend), read.original_box, xp)
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()  # every copy from the buffer has been made
    _BUFFERS.give(read.buffer, source.backend == "cupy")
    return chunk


def read_ahead(source: ChunkSource) -> Read:
    """`source`'s particles, read: taken from the reads ahead when it is there, else read now. Then
    the next ranges (the first `READ_AHEAD` of `source.following`) are read ahead in background
    threads while the caller works on this one; reads ahead of other ranges are dropped (a worker
    holds at most `READ_AHEAD` chunks read ahead)."""
    plain = replace(source, following=())
    wanted = [replace(plain, start=a, stop=b) for a, b in source.following[: READ_AHEAD[source.backend]]]
    with _AHEAD_LOCK:
        pending = _AHEAD.pop(plain, None)
        for stale in [s for s in _AHEAD if s not in wanted]:
            _drop(_AHEAD.pop(stale), stale.backend == "cupy")
        for following in wanted:  # (`source` itself too when it is the worker's only streamed chunk: for the next pass)
            if following not in _AHEAD:
                _AHEAD[following] = _READER.submit(read_chunk, following)
    return pending.result() if pending is not None else read_chunk(plain)


def _drop(pending: Future, pinned: bool) -> None:
    """A read ahead that no task will take (the worker's order changed: a worker was lost): cancelled
    if it has not started, else its buffer given back to the pool once it is read."""

    def give_back(done: Future) -> None:
        if not done.cancelled() and done.exception() is None:
            _BUFFERS.give(done.result().buffer, pinned)

    if not pending.cancel():
        pending.add_done_callback(give_back)


def drop_read_ahead() -> None:
    """Forget this worker's reads ahead (the run ends)."""
    with _AHEAD_LOCK:
        for pending in _AHEAD.values():
            pending.cancel()
        _AHEAD.clear()


def free_buffers() -> None:
    """Forget this worker's free read buffers (it has no more chunks to read)."""
    _BUFFERS.clear()


def forget_run(backend: str) -> None:
    """Free what this worker kept for reading a run's chunks (its read ahead, its buffers, the table
    chunks it decoded) and, on GPU workers, what CuPy keeps cached of the device and page-locked
    memory freed meanwhile."""
    drop_read_ahead()
    free_buffers()
    forget_rows()
    if backend == "cupy":
        free_pools()


async def end_run(backend: str, kept: list, dask_worker=None) -> None:
    """`forget_run` once this worker has let go of the `kept` chunks (keys of cancelled futures: it
    hears of that after the cancel returns), or after `RELEASE_WAIT_S`; on the worker's event loop
    (`Client.run`), which must stay free meanwhile to hear it."""
    deadline = time.monotonic() + RELEASE_WAIT_S
    while any(key in dask_worker.data for key in kept) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    forget_run(backend)


def free_pools() -> None:
    """Give CuPy's cached free device and page-locked host memory back (to the system, to other
    processes, and to the next run's memory budget)."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def store_error(store: str) -> str | None:
    """Why this worker cannot read the store's images (None when it can)."""
    try:
        zarr.open_group(store, mode="r")["images"]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _resolve(chunk: Chunk | HostChunk | ChunkSource) -> Chunk:
    """A resident chunk as it is; one kept in host memory copied to the device, a streamed one read
    (ahead, when it was) and prepared now, both dropped after the task."""
    if isinstance(chunk, ChunkSource):
        return _prepare(chunk, read_ahead(chunk))
    return chunk.on_device() if isinstance(chunk, HostChunk) else chunk


@functools.lru_cache(maxsize=4)
def _band(box: int, backend: str) -> Band:
    """The band, built once per worker process (every task of every iteration reuses it)."""
    return make_band(box, array_module(backend))


def to_numpy(value):
    """A CuPy array copied to NumPy; anything else as it is."""
    return value.get() if hasattr(value, "get") and not isinstance(value, float) else value


def _host(d: dict) -> dict:
    """Arrays back to NumPy (partials travel between workers and to the driver), but the
    volume-sized sums: `held` keeps those where they are until the end of the pass."""
    return {k: v if k in VOLUME_SUMS else to_numpy(v) for k, v in d.items()}


def held(function: Callable, key: str, index: int, *args) -> dict:
    """`function(*args)`, task `index` of pass `key`, with its volume-sized sums (`VOLUME_SUMS`)
    added into this worker's running sums of the pass instead of returned: one set per worker
    travels at the end of the pass (`collect_held`), not one per task (device memory stays on the
    device until then)."""
    out = function(*args)
    with _HELD_LOCK:
        if key in _COLLECTED:  # a task of a cancelled pass, finishing late
            return out
        tasks, sums = _HELD.setdefault(key, ([], {}))
        for name in VOLUME_SUMS:
            if name in out:
                part = out.pop(name)
                if name in sums:
                    sums[name] += part
                else:  # a copy: the task's sums may be a view of its whole accumulator (`compact_rows`)
                    sums[name] = part.copy()
        tasks.append(index)
    return out


def collect_held(key: str) -> dict:
    """This worker's summed volume-sized sums of pass `key` (NumPy) and `tasks`, the indices of the
    tasks they hold; forgotten here."""
    with _HELD_LOCK:
        _COLLECTED.add(key)
        tasks, sums = _HELD.pop(key, ([], {}))
    return {"tasks": tasks, **{k: to_numpy(v) for k, v in sums.items()}}


def mean_partial(
    chunk: Chunk | HostChunk | ChunkSource, box: int, scale: str, backend: str, weights: np.ndarray | None = None
) -> dict:
    """Reconstruction sums of one chunk: the mean, or with `weights (n, G)` G particle subsets."""
    return _host(mean_statistics(_resolve(chunk), _band(box, backend), scale, array_module(backend), weights))


def _on_device(model: Model, backend: str) -> Model:
    """`model` with its arrays on the worker's device, copied once per model: every task of a pass
    gets the same scattered `model` object, and the copy is kept until that object is gone (at box
    128, K = 3 its volumes are 34 MB: 1.7 GB a pass over 100k particles in chunks of 2,048 when
    each task copied them)."""
    key = (id(model), backend)
    with _DEVICE_LOCK:
        if key not in _DEVICE_MODELS:
            xp = array_module(backend)
            _DEVICE_MODELS[key] = replace(
                model, volumes=xp.asarray(model.volumes), noise_inverse=xp.asarray(model.noise_inverse)
            )
            weakref.finalize(model, _DEVICE_MODELS.pop, key, None)
        return _DEVICE_MODELS[key]


def em_partial(
    chunk: Chunk | HostChunk | ChunkSource, model: Model, box: int, backend: str, keep: np.ndarray | None = None
) -> dict:
    """Summable statistics of one chunk (of its `keep` particles when given) for the M-step, and
    `coordinates`: a one-item list (lists add up by concatenation) of the E-step's z and α `(n, K+1)`."""
    out = _host(
        em_statistics(
            _resolve(chunk), _on_device(model, backend), _band(box, backend), keep=keep, xp=array_module(backend)
        )
    )
    out["coordinates"] = [np.concatenate([out.pop("z"), out.pop("alpha")[:, None]], axis=1).astype(np.float32)]
    out.pop("zcov")
    return out


def em_coordinates(
    chunk: Chunk | HostChunk | ChunkSource, model: Model, box: int, backend: str, keep: np.ndarray | None = None
) -> dict:
    """Coordinates `z (n, K)`, scales `alpha (n,)` and summed noise covariance `zcov` of one chunk
    (of its `keep` particles when given)."""
    out = em_statistics(
        _resolve(chunk),
        _on_device(model, backend),
        _band(box, backend),
        statistics=False,
        keep=keep,
        xp=array_module(backend),
    )
    return _host({"z": out["z"], "alpha": out["alpha"], "zcov": out["zcov"]})
