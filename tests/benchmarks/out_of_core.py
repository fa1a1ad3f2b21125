"""Out-of-core, shown: the same run with every chunk resident, every chunk streamed (re-read from
zarr each pass), and under a worker memory limit smaller than the data; rates, peak memory per
worker, and the largest difference between the results.

    python tests/benchmarks/out_of_core.py --particles 250000 --box 32 --memory-limit 800MB

Prints one JSON line per configuration and a summary. Not a test (minutes of CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dva.engine.bench import _peak_rss_mb, dataset
from dva.engine.cluster import connect
from dva.engine.loop import RunParams, run_3dva
from dva.io.star import read_star


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=40_000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--memory-limit", default="800MB")
    parser.add_argument("--skip-streamed", action="store_true", help="Only the resident and memory-limited runs.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dva-ooc-") as tmp:
        sim, store = dataset(Path(tmp), args.particles, args.box, args.chunk_size)
        stored_gb = args.particles * args.box**2 * 4 / 1e9
        pixel = float(read_star(sim / "particles.star")["pixel_size_A"][0])
        params = RunParams(filter_res_A=4 * pixel, modes=3, iterations=args.iterations)
        configurations = {
            "resident": ({}, None),
            "streamed": ({}, 0),
            f"memory-limit {args.memory_limit}": ({"memory_limit": args.memory_limit}, None),
        }
        if args.skip_streamed:
            configurations.pop("streamed")
        results = {}
        for name, (cluster_options, resident_bytes) in configurations.items():
            cluster = connect(workers=args.workers, gpus="none", **cluster_options)
            try:
                t0 = time.perf_counter()
                result = run_3dva(store, sim / "mask.mrc", params, cluster, resident_bytes=resident_bytes)
                wall = time.perf_counter() - t0
                peaks = sorted(round(v) for v in cluster.client.run(_peak_rss_mb).values())
                limits = sorted({w["memory_limit"] for w in cluster.client.scheduler_info()["workers"].values()})
            finally:
                cluster.close()
            seconds = float(np.median([m["seconds"] for m in result.metrics]))
            results[name] = result
            print(
                json.dumps(
                    {
                        "configuration": name,
                        "particles": args.particles,
                        "box": args.box,
                        "stored_GB": round(stored_gb, 3),
                        "worker_memory_limit_MB": [round(v / 1e6) for v in limits],
                        "resident_particles": result.resident_particles,
                        "iteration_s": round(seconds, 2),
                        "particles_per_s": round(args.particles / seconds),
                        "wall_s": round(wall, 1),
                        "peak_worker_rss_MB": peaks,
                    }
                ),
                flush=True,
            )
        reference = results["resident"]
        for name, result in results.items():
            dz = np.abs(result.z - reference.z).max() / np.abs(reference.z).max()
            dc = np.abs(result.components - reference.components).max() / np.abs(reference.components).max()
            print(f"{name}: max relative difference to resident: z {dz:.2e}, components {dc:.2e}")


if __name__ == "__main__":
    main()
