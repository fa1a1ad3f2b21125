"""Host buffers that a worker's chunk reads reuse.

Reading into a new array pays for its memory's page faults on every read: on the 2-core VM here a
134 MB chunk of box-128 images was read at 0.2-0.5 GB/s into a new array and at 1.5 GB/s into a
reused one (the file itself at 2.3 GB/s). A new page-locked array (GPU workers) costs a
`cudaHostAlloc` as well. A worker keeps the buffers of the chunk being prepared and of those read
ahead meanwhile (`tasks.READ_AHEAD`) through a run: a task's images each, one chunk (128 MB by
default) on CPU workers, up to `store.GPU_TASK_MB` (512 MB) on GPU workers, which keep up to four
(2 GB of page-locked memory, outside the budget of the chunks they keep).
"""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    """Flat byte buffers, taken for a read and given back when its images have been used; `keep`
    free ones are kept (more are left to the garbage collector), until `clear`. A buffer taken
    before a `clear` and given back after it (a read ahead that finished after its run ended) is
    left to the garbage collector too: it would otherwise stay in page-locked memory between runs."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: list[tuple[np.ndarray, bool]] = []  # (buffer, page-locked)
        self._out: set[int] = set()  # ids of the buffers taken since the last `clear` (alive: not reused)
        self._lock = threading.Lock()

    def take(self, nbytes: int, pinned: bool) -> np.ndarray:
        """A uint8 buffer of at least `nbytes` (contents undefined): the smallest free one that is
        large enough, else a new one of exactly `nbytes` (page-locked host memory when `pinned`)."""
        with self._lock:
            fits = [i for i, (b, p) in enumerate(self._free) if p == pinned and b.nbytes >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i][0].nbytes)
                buffer = self._free.pop(best)[0]
                self._out.add(id(buffer))
                return buffer
        if pinned:
            import cupyx

            buffer = cupyx.empty_pinned((nbytes,), np.uint8)
        else:
            buffer = np.empty(nbytes, np.uint8)
        with self._lock:
            self._out.add(id(buffer))
        return buffer

    def clear(self) -> None:
        """Forget the free buffers, and those taken (the end of a run)."""
        with self._lock:
            self._free.clear()
            self._out.clear()

    def give(self, buffer: np.ndarray, pinned: bool) -> None:
        """Return a buffer from `take` (nothing may use it after): kept for the next read, the
        largest `keep` of those free (unless it was taken before the last `clear`)."""
        with self._lock:
            if id(buffer) not in self._out:
                return
            self._out.discard(id(buffer))
            self._free.append((buffer, pinned))
            self._free.sort(key=lambda item: -item[0].nbytes)
            del self._free[self.keep :]


def view(buffer: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The first bytes of `buffer` as a C-contiguous array of `shape` and `dtype`."""
    dtype = np.dtype(dtype)
    return buffer[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
