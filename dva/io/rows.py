"""A worker's reads of the particle table's rows for its chunks, through one run.

Every task reads the table rows of its particles (poses, shifts, CTF parameters: ~170 bytes each).
Through zarr that is an open of each variable and a decompression of the table chunk (65,536 rows)
holding the rows, for each task: ~10 ms here for 12 variables, in the threads that read ahead
while the task thread launches kernels. A worker's tasks go through its particles in order, so the
variables are opened once and each table chunk is decompressed once per run (`forget_rows` at the run's
start and end), and tasks slice it.
"""

from __future__ import annotations

import threading

import numpy as np
import zarr

_ARRAYS: dict[tuple[str, str], zarr.Array] = {}  # this run's opened table variables, by (store, name)
_CHUNKS: dict[tuple[str, str], tuple[int, np.ndarray]] = {}  # the last decoded chunk of each
_LOCK = threading.Lock()  # read-ahead threads read rows at once


def read_rows(root: zarr.Group, store: str, names: tuple[str, ...], start: int, stop: int) -> dict[str, np.ndarray]:
    """The table variables `names` of `store` (whose root group is `root`) for particles `start:stop`
    (copies: the caller may keep or change them)."""
    with _LOCK:
        for name in names:
            if (store, name) not in _ARRAYS:
                _ARRAYS[(store, name)] = root["particles"][name]
        return {name: _rows(store, name, _ARRAYS[(store, name)], start, stop) for name in names}


def _rows(store: str, name: str, array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of one variable, from its decoded chunks (the last one kept)."""
    if stop <= start:
        return array[start:stop]
    size = array.chunks[0]
    parts = []
    for index in range(start // size, (stop - 1) // size + 1):
        kept = _CHUNKS.get((store, name))
        if kept is None or kept[0] != index:
            kept = (index, array[index * size : (index + 1) * size])
            _CHUNKS[(store, name)] = kept
        lo = max(start, index * size) - index * size
        parts.append(kept[1][lo : min(stop, (index + 1) * size) - index * size])
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def forget_rows() -> None:
    """Forget the opened variables and decoded chunks (a run starts or ends: a store may change)."""
    with _LOCK:
        _ARRAYS.clear()
        _CHUNKS.clear()
