"""The floor of one EM iteration: the work that must happen, and the time it takes at a device's
measured ceilings (`dva bench` prints it beside the measured time).

Per particle and Fourier pixel of the band (P pixels of the rfft half-plane) one iteration must
read the sample and its CTF (8 + 4 bytes; chunks not kept in device memory also come over from the
host: prepared ones as they are, streamed ones as stored images), gather
the K+1 slices trilinearly (8·(K+1) complex reads) and insert the M-step channels trilinearly
(8·(K(K+1)/2 + 2K) real adds). The floor is the slowest of the three at the ceilings, as if they
overlapped perfectly; per-particle K×K solves and the per-voxel M-step are small beside them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from dva.em.chunk import make_band
from dva.ops.slice import gather, insert, neighbour_offsets


@dataclass(frozen=True)
class Ceilings:
    """What one device sustains: memory bandwidth (GB/s), trilinear gathers and scatter-adds
    (G/s), and the rate at which chunks not kept in its memory arrive (GB/s: host to device; None
    when not measured or not apart, as on CPU workers)."""

    device: str
    memory_GBps: float
    gather_Gps: float
    scatter_Gps: float
    read_GBps: float | None = None


# Measured on the lent H100 with CuPy (../shared/gpu/README.md, 2026-11-26): device copy, gather
# and cupyx.scatter_add with trilinear-local indices at 128³, pinned host→device transfers.
H100 = Ceilings(
    "NVIDIA H100 (measured ceilings)", memory_GBps=2900.0, gather_Gps=137.0, scatter_Gps=72.0, read_GBps=55.0
)


@dataclass(frozen=True)
class Work:
    """What one iteration must do (counts, not seconds)."""

    particles: int
    band_pixels: int
    bytes_resident: float  # prepared samples and CTFs read
    bytes_stored: float  # stored images, when chunks are re-read every pass
    gathers: float  # trilinear complex reads (8 per pixel per volume)
    scatter_adds: float  # trilinear real adds (8 per pixel per channel)


def iteration_work(particles: int, box: int, modes: int, band_pixels: int | None = None) -> Work:
    """The work of one iteration on `particles` images at `box` with K=`modes`."""
    p = len(make_band(box).flat) if band_pixels is None else band_pixels
    channels = modes * (modes + 1) // 2 + 2 * modes
    return Work(
        particles=particles,
        band_pixels=p,
        bytes_resident=particles * p * 12.0,
        bytes_stored=particles * box * box * 4.0,
        gathers=particles * p * 8.0 * (modes + 1) * 2,  # complex: two reals per read
        scatter_adds=particles * p * 8.0 * channels,
    )


def floor_seconds(work: Work, ceilings: Ceilings, host: int = 0, streamed: int = 0) -> dict:
    """Seconds each part takes at the ceilings, and the floor (the slowest part). Of the
    particles, `host` have their prepared chunks kept in host memory (`dva bench --on-host`) and
    `streamed` are re-read from the store every pass (`--streamed`): both come over at the
    host-to-device rate, the streamed ones as stored images (as if from the page cache; reading
    and decoding the store is slower, so the floor stays a lower bound)."""
    parts = {
        "memory_s": work.bytes_resident / (ceilings.memory_GBps * 1e9),
        "gather_s": work.gathers / (ceilings.gather_Gps * 1e9),
        "scatter_s": work.scatter_adds / (ceilings.scatter_Gps * 1e9),
    }
    if (host or streamed) and ceilings.read_GBps:
        moved = (host * work.bytes_resident + streamed * work.bytes_stored) / work.particles
        parts["read_s"] = moved / (ceilings.read_GBps * 1e9)
    return {**parts, "floor_s": max(parts.values())}


def measure_cpu_ceilings(workers: int, box: int = 64, repeats: int = 3) -> Ceilings:
    """This machine's ceilings for `workers` single-threaded NumPy workers (one core each): the
    best of `repeats` timings of a large copy and of the NumPy path's own trilinear kernels
    (`gather` of 4 complex volumes, `insert` of 12 channels) on radius-local
    stencils, times `workers`."""
    rng = np.random.default_rng(0)
    size, m = box**3, 500_000
    base = np.sort(rng.integers(0, size - box * box - box - 1, m))  # slices touch neighbouring voxels
    index, weights = (base[:, None] + neighbour_offsets(box)).astype(np.int32), rng.random((m, 8), dtype=np.float32)
    volumes = (rng.random((size, 4)) + 1j * rng.random((size, 4))).astype(np.complex64)
    values, sums = rng.random((m, 12)), np.zeros((size, 12))
    source, target = rng.random(16_000_000), np.empty(16_000_000)
    best = {"copy": np.inf, "gather": np.inf, "scatter": np.inf}
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(target, source)
        best["copy"] = min(best["copy"], time.perf_counter() - t)
        t = time.perf_counter()
        gather(volumes, index, weights)
        best["gather"] = min(best["gather"], time.perf_counter() - t)
        t = time.perf_counter()
        insert(values, index, weights, sums)
        best["scatter"] = min(best["scatter"], time.perf_counter() - t)
    return Ceilings(
        device=f"{workers} CPU worker(s) (measured now)",
        memory_GBps=workers * 2 * source.nbytes / best["copy"] / 1e9,  # read + write
        gather_Gps=workers * index.size * volumes.shape[1] * 2 / best["gather"] / 1e9,  # complex: 2 reals
        scatter_Gps=workers * index.size * values.shape[1] / best["scatter"] / 1e9,
    )


def floor_report(
    particles: int, box: int, modes: int, ceilings: Ceilings, measured_s: float, host: int = 0, streamed: int = 0
) -> dict:
    """The work, the floor at `ceilings` (with `host` and `streamed` particles as `floor_seconds`
    says), the measured seconds per iteration and their ratio."""
    work = iteration_work(particles, box, modes)
    floor = floor_seconds(work, ceilings, host, streamed)
    return {
        "ceilings": asdict(ceilings),
        "work": asdict(work),
        **floor,
        "measured_s": measured_s,
        "measured_over_floor": measured_s / floor["floor_s"],
    }
