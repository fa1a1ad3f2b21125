"""`dva bench`: time the E/M iterations on a synthetic dataset (simulate → import → run)."""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from dask.utils import key_split
from distributed import get_task_stream

from dva.engine.cluster import connect
from dva.engine.floor import H100, floor_report, measure_cpu_ceilings
from dva.engine.loop import RunParams, run_3dva
from dva.io.atomic import atomic_path
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.ops.kernels import launch_shape
from dva.sim.simulate import simulate_dataset


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. Linux's VmHWM where there is one: `ru_maxrss`
    also counts the parent's memory at the fork of a spawned worker (it survives `exec`)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dataset(
    folder: Path, particles: int, box: int, chunk_size: int | None, say: Callable[[str], None] = lambda line: None
) -> tuple[Path, Path]:
    """The simulated dataset (`sim/`: its metadata and mask; the image stack is deleted once
    imported, halving the disk it takes: 6.6 GB kept for 100k particles of box 128) and its
    imported store (`s.zarr`) in `folder`, made there unless a finished pair for the same
    particles, box and chunk size already is (`bench.json`, written last): a resident and a
    streamed run, or runs on other clusters, share one dataset. `say` gets a line with the time
    each step of making it took."""
    key = {"particles": particles, "box": box, "chunk_size": chunk_size, "seed": 0}
    marker, sim, store = folder / "bench.json", folder / "sim", folder / "s.zarr"
    if marker.exists() and json.loads(marker.read_text()) == key:
        return sim, store
    marker.unlink(missing_ok=True)
    for made in (sim, store):  # a half-made or other dataset of ours
        shutil.rmtree(made, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    simulate_dataset(sim, "small", particles=particles, box=box, seed=0, truth=False)
    t1 = time.perf_counter()
    import_particles(read_star(sim / "particles.star"), store, chunk_size=chunk_size)
    gb = particles * box * box * 4 / 1e9
    say(f"simulated in {t1 - t0:.1f} s, imported in {time.perf_counter() - t1:.1f} s ({gb:.2f} GB of images)")
    (sim / "particles.mrcs").unlink()
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(key))
    return sim, store


def _phases(metrics: list[dict]) -> dict:
    """Median seconds per iteration of its parts: the workers' passes (with the model built and sent
    to them), collecting their volume-sized sums, and the driver's M-step."""
    return {
        "passes": float(np.median([m["pass_s"] - m["collect_s"] for m in metrics])),
        "collect": float(np.median([m["collect_s"] for m in metrics])),
        "mstep": float(np.median([m["mstep_s"] for m in metrics])),
    }


def _task_seconds(records: list[dict]) -> dict:
    """Seconds the workers computed and tasks run, per task function (`load_chunk`: reading and
    preparing the chunks kept; `mean_partial`: the mean's pass; `em_partial`: the iterations'
    passes; ...), from dask's task stream: where the run's time went on the workers."""
    totals: dict[str, dict] = {}
    for record in records:
        seconds = sum(s["stop"] - s["start"] for s in record["startstops"] if s["action"] == "compute")
        entry = totals.setdefault(key_split(record["key"]), {"tasks": 0, "compute_s": 0.0})
        entry["tasks"] += 1
        entry["compute_s"] += seconds
    return {name: {**entry, "compute_s": round(entry["compute_s"], 3)} for name, entry in sorted(totals.items())}


def bench(
    particles: int,
    box: int,
    modes: int,
    *,
    chunk_size: int | None = None,
    workers: int | None = None,
    gpus: str | None = None,
    iterations: int = 3,
    scheduler: str | None = None,
    streamed: bool = False,
    on_host: bool = False,
    data: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Per-iteration times and their parts, particles per second per iteration, the whole run's
    time (`run_s`) and the cluster's start, the workers' compute seconds per task function
    (`task_s`: reading and preparing chunks, the mean's pass, ...), peak memory per worker, GPU workers' launch shape
    (`cuda_launch`), and the floor model (`dva.engine.floor`) at the backend's ceilings;
    `streamed` keeps no chunk resident, `on_host` none in GPU memory (GPU workers keep them in
    host memory; CPU workers none).
    The dataset is made in a temporary folder, or kept in and reused from `data` (`dataset`).
    `progress` gets a line as each stage and iteration ends (what a run cut short had done)."""
    say = progress or (lambda line: None)
    with ExitStack() as stack:
        folder = (
            Path(data)
            if data is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dva-bench-")))
        )
        t0 = time.perf_counter()
        sim, store = dataset(folder, particles, box, chunk_size, say)
        prepare_s = time.perf_counter() - t0
        say(f"dataset of {particles:,} particles, box {box}: ready in {prepare_s:.1f} s")
        pixel = float(read_star(sim / "particles.star")["pixel_size_A"][0])
        t_start = time.perf_counter()
        cluster = connect(scheduler, workers=workers, gpus=gpus)
        start_s = time.perf_counter() - t_start
        try:
            say(
                f"cluster of {len(cluster.client.ncores())} {cluster.backend} worker(s) up; the mean's pass, then the iterations"
            )
            params = RunParams(filter_res_A=4 * pixel, modes=modes, iterations=iterations)
            t_run = time.perf_counter()
            with get_task_stream(client=cluster.client) as stream:
                result = run_3dva(
                    store,
                    sim / "mask.mrc",
                    params,
                    cluster,
                    resident_bytes=0 if streamed or on_host else None,
                    host_bytes=0 if streamed else None,
                    progress=lambda m: say(
                        f"iteration {m['iteration']}: {m['seconds']:.2f} s ({particles / m['seconds']:,.0f} particles/s; "
                        f"workers' passes {m['pass_s'] - m['collect_s']:.2f} s, collecting {m['collect_s']:.2f} s, "
                        f"M-step {m['mstep_s']:.2f} s; {time.perf_counter() - t_run:.1f} s into the run)"
                    ),
                )
            peaks = cluster.client.run(_peak_rss_mb)
            n_workers = len(peaks)
            # the GPU workers' launch shape, as their environment set it
            launch = next(iter(cluster.client.run(launch_shape).values())) if cluster.backend == "cupy" else None
        finally:
            cluster.close()
    times = [m["seconds"] for m in result.metrics]
    median = float(np.median(times))
    ceilings = H100 if cluster.backend == "cupy" else measure_cpu_ceilings(n_workers)
    return {
        "particles": particles,
        "box": box,
        "modes": modes,
        "workers": n_workers,
        "backend": cluster.backend,
        "chunk_size": chunk_size,
        "resident_particles": result.resident_particles,
        "host_particles": result.host_particles,
        "iteration_s": times,
        "median_iteration_s": median,
        "particles_per_s": particles / median,
        "phases_s": _phases(result.metrics),
        "mean_pass_s": result.timings["mean_s"],
        "task_s": _task_seconds(stream.data),
        # the whole run from the imported store: mean's pass, iterations, final pass
        "run_s": result.timings["total_s"],
        "cluster_start_s": start_s,  # starting (or joining) the cluster, before the run
        "prepare_s": prepare_s,  # simulating and importing the dataset (0 when reused)
        "peak_worker_rss_mb": sorted(round(v, 1) for v in peaks.values()),
        "cuda_launch": launch,
        "floor": floor_report(
            particles,
            result.box,
            modes,
            ceilings,
            median,
            host=result.host_particles,
            streamed=particles - result.resident_particles,
        ),
    }
