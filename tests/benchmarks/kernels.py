"""The E-step passes alone, timed on one chunk of synthetic particles: each pass's seconds, samples
per second and (second pass) scatter-adds per second against the floor model's ceilings, and on a
GPU the same over launch shapes (threads per block, threads aimed at per pass, registers per
thread), to tune them. With dva's own shape also the rest of a chunk's work: preparing it from
stored images in host memory (`prepare_s`) and the mean's pass over it (`mean_statistics_s`).

    python tests/benchmarks/kernels.py --box 128 --modes 3 --particles 8192
    python tests/benchmarks/kernels.py --box 256 --modes 10 --particles 2048 --no-sweep

CuPy when a GPU is visible, else the numba kernels. Prints one JSON line per configuration. Not a
test (the passes' results are tested in tests/test_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from dva.em.chunk import Chunk, make_band, prepare_chunk
from dva.em.estep import _kernel_arguments, em_statistics, estep_insert, estep_sums, pair_index
from dva.em.mean import mean_statistics
from dva.em.model import Model
from dva.engine.cluster import gpu_count
from dva.engine.floor import H100
from dva.io.table import CTF_FIELDS
from dva.ops.rotation import random_rotations
from dva.ops.slice import half_rows, view_order


def synthetic(particles: int, box: int, modes: int, xp) -> tuple[Chunk, Model]:
    """Random data, CTFs, poses and volumes of the right shapes (the passes' speed does not depend
    on the values)."""
    rng = np.random.default_rng(0)
    band = make_band(box)
    pixels = len(band.flat)
    y = (rng.standard_normal((particles, pixels)) + 1j * rng.standard_normal((particles, pixels))).astype(np.complex64)
    chunk = Chunk(
        xp.asarray(y),
        xp.asarray(rng.uniform(-1, 1, (particles, pixels)).astype(np.float32)),
        xp.asarray(random_rotations(particles, rng)),
        xp.ones(particles),
    )
    volumes = rng.standard_normal((half_rows(box), modes + 1)) + 1j * rng.standard_normal((half_rows(box), modes + 1))
    return chunk, Model(volumes.astype(np.complex64), np.ones(box // 2), 0.01, "optimal")


def stored(particles: int, box: int) -> tuple[np.ndarray, dict]:
    """Images `(n, box, box)` float32 and table rows as a worker reads them from a store."""
    rng = np.random.default_rng(2)
    ctf = {"defocus_u_A": 15000.0, "defocus_v_A": 14000.0, "voltage_kV": 300.0, "cs_mm": 2.7, "amp_contrast": 0.1}
    rows = {name: np.full(particles, ctf.get(name, 0.0)) for name in CTF_FIELDS}
    rows.update(
        ctf_scale=np.ones(particles),
        rotation=random_rotations(particles, rng),
        shift_px=rng.uniform(-3, 3, (particles, 2)),
        pixel_size_A=np.ones(particles),
    )
    return rng.standard_normal((particles, box, box), dtype=np.float32), rows


def timed(function, xp, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up (device synchronised)."""

    def sync() -> None:
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()

    function()
    sync()
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        function()
        sync()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def measure(chunk: Chunk, model: Model, box: int, xp, repeats: int, whole_chunk: bool) -> dict:
    particles, modes = len(chunk.y), model.modes
    band = make_band(box, xp)
    on_device = Model(xp.asarray(model.volumes), xp.asarray(model.noise_inverse), model.eps, model.scale)
    shared = _kernel_arguments(chunk, on_device, band, xp)
    order = xp.ascontiguousarray(view_order(chunk.rotation, 128, xp), dtype=xp.int64)
    alpha, z = xp.ones(particles), xp.asarray(np.random.default_rng(1).normal(size=(particles, modes)))
    channels = len(pair_index(modes)) + 2 * modes
    sums = xp.zeros((half_rows(box), channels))
    samples = particles * len(band.flat)
    first = timed(lambda: estep_sums(order, shared, xp), xp, repeats)
    second = timed(lambda: estep_insert(order, shared, band, alpha, z, sums, xp), xp, repeats)
    whole = timed(lambda: em_statistics(chunk, on_device, band, xp=xp), xp, repeats)
    rest = {}
    if whole_chunk:
        images, rows = stored(particles, box)
        rest["prepare_s"] = timed(lambda: prepare_chunk(images, rows, band, box, xp), xp, repeats)
        rest["mean_statistics_s"] = timed(lambda: mean_statistics(chunk, band, "input", xp), xp, repeats)
    return {
        **rest,
        "sums_s": first,
        "insert_s": second,
        "em_statistics_s": whole,
        "sums_G_samples_per_s": samples / first / 1e9,
        "insert_G_samples_per_s": samples / second / 1e9,
        "insert_G_scatter_adds_per_s": samples * 8 * channels / second / 1e9,
        "gathers_G_per_s": samples * 8 * (modes + 1) * 2 * 2 / (first + second) / 1e9,  # re, im; both passes
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=8192)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--modes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="Only dva's own launch shape on a GPU.")
    args = parser.parse_args()
    on_gpu = gpu_count() > 0
    if on_gpu:
        import cupy as xp

        from dva.ops import kernels
    else:
        xp = np
    # dva's own (`dva_default`: its defaults, or what DVA_CUDA_* variables set; gpu.sh sets none
    # here), then each knob moved from it (threads, aim, register cap), and the cap of 96 also in
    # blocks of 128 threads (where it fits a fifth block per SM at K = 3)
    shapes = [(None, None, None)]
    if on_gpu and not args.no_sweep:
        aim = kernels.RESIDENT_THREADS
        shapes += [(128, aim, None), (256, aim // 4, None), (256, aim * 4, None)]
        shapes += [(256, aim, 64), (256, aim, 80), (256, aim, 96), (128, aim, 96)]
    chunk, model = synthetic(args.particles, args.box, args.modes, xp)
    for block, aim, cap in shapes:
        if block is not None:
            kernels.THREADS, kernels.RESIDENT_THREADS, kernels.MAX_REGISTERS = block, aim, cap
            kernels._kernel.cache_clear()
        found = measure(chunk, model, args.box, xp, args.repeats, whole_chunk=block is None)
        launch = kernels.launch_shape() if on_gpu else {}
        print(
            json.dumps(
                {
                    "backend": "cupy" if on_gpu else "numpy",
                    "particles": args.particles,
                    "box": args.box,
                    "modes": args.modes,
                    "dva_default": block is None,
                    **launch,
                    **{k: round(v, 4) for k, v in found.items()},
                    "ceilings_G_per_s": {"scatter": H100.scatter_Gps, "gather": H100.gather_Gps} if on_gpu else None,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
