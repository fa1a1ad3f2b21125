"""How fast a worker reads a store's chunks: `read_chunk` (images straight from the shard files, and
the table rows) in GB/s of images, in one thread and in as many threads as GPU workers read ahead
with, against zarr's own read of the same images (a whole shard into fresh memory, then copied).

    python tests/benchmarks/reads.py STORE [--chunk 2048] [--repeats 3]

Run in a process with a worker's malloc settings to see what a worker sees (gpu.sh does). Prints one
JSON line. Not a test (the reads' results are tested in tests/test_shards.py and test_rows.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype

from dva.engine import tasks


def rate(read, ranges: list[tuple[int, int]], image_bytes: int, threads: int, repeats: int) -> float:
    """Median GB/s of images over `repeats` reads of every range, `threads` at a time."""
    total = sum(b - a for a, b in ranges) * image_bytes
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, ranges))
        seconds.append(time.perf_counter() - t)
    return total / statistics.median(seconds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="numpy", help="cupy: into page-locked buffers, as GPU workers read")
    args = parser.parse_args()
    images = zarr.open_group(args.store, mode="r")["images"]
    n, image_bytes = images.shape[0], 4 * images.shape[1] * images.shape[2]
    ranges = [(a, min(a + args.chunk, n)) for a in range(0, n, args.chunk)]
    box = images.shape[-1]

    def dva_read(r):
        read = tasks.read_chunk(tasks.ChunkSource(args.store, r[0], r[1], box, args.backend))
        tasks._BUFFERS.give(read.buffer, args.backend == "cupy")

    mine = threading.local()  # each thread's buffer, reused

    def zarr_read(r):
        if not hasattr(mine, "out"):
            mine.out = np.empty((args.chunk, box, box), np.float32)
        out = mine.out[: r[1] - r[0]]
        images.get_basic_selection(slice(*r), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))

    threads = tasks.READ_AHEAD["cupy"]
    found = {
        "images_GB": round(n * image_bytes / 1e9, 2),
        "chunk": args.chunk,
        "dva_GBps_1_thread": rate(dva_read, ranges, image_bytes, 1, args.repeats),
        f"dva_GBps_{threads}_threads": rate(dva_read, ranges, image_bytes, threads, args.repeats),
        "zarr_GBps_1_thread": rate(zarr_read, ranges, image_bytes, 1, args.repeats),
        f"zarr_GBps_{threads}_threads": rate(zarr_read, ranges, image_bytes, threads, args.repeats),
    }
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in found.items()}), flush=True)


if __name__ == "__main__":
    main()
