"""The 3DVA job as map-reduce passes over zarr chunks (DESIGN.md §2–3).

Pass 0 reconstructs the mean; every iteration is one pass (E-step and M-step statistics per
chunk, summed in a tree); a last pass computes the coordinates with the final components. Chunks
are read and prepared on the workers once and stay there; the model is broadcast once per
iteration; the driver only solves per voxel and filters.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dva.em.finish import principal_axes, subspace_angle_deg
from dva.em.mean import noise_from_power, solve_mean
from dva.em.model import Model, fourier_stack, scale_prior
from dva.em.mstep import band_filter, random_components, regularize, solve_components
from dva.engine.cluster import Cluster
from dva.engine.reduce import tree_sum
from dva.engine.tasks import em_coordinates, em_partial, load_chunk, mean_partial
from dva.errors import DvaInputError
from dva.io.mask import load_mask
from dva.io.store import open_store
from dva.ops.filters import to_fourier, to_real

EPS = 0.01  # E-step ridge, relative to tr(G_i)/K
MIN_TASK = 64  # fewest particles per task


@dataclass(frozen=True)
class RunParams:
    """Parameters of `dva run` (CryoSPARC's names and defaults where it has them)."""

    filter_res_A: float
    modes: int = 3
    iterations: int = 20
    filter_order: float = 1.5
    highpass_res_A: float | None = None
    highpass_order: float = 8.0
    lam: float = 0.01
    scale: str = "optimal"
    noise: str = "colored"
    gram_schmidt: bool = True
    box: int | None = None
    seed: int = 0
    max_particles: int | None = None


@dataclass
class Result:
    """What a run found, in map units at `pixel_size_A` and `box`."""

    mean: np.ndarray
    components: np.ndarray
    z: np.ndarray
    alpha: np.ndarray
    variances: np.ndarray
    box: int
    pixel_size_A: float
    particles: int
    data_sign: float = 1.0  # −1 when the stored images were found black on white
    metrics: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


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


def _check(params: RunParams, box_in: int, pixel_in: float) -> tuple[int, float]:
    box = params.box or box_in
    if params.box is None and box_in % 2:
        raise DvaInputError(f"the store's box {box_in} is odd: give an even --box to Fourier-crop it")
    if box > box_in or box % 2 or box < 16:
        raise DvaInputError(f"--box {box}: must be even, at least 16 and at most the stored box {box_in}")
    pixel = pixel_in * box_in / box
    if params.filter_res_A < 2 * pixel:
        raise DvaInputError(
            f"--filter-res {params.filter_res_A} Å: finer than Nyquist ({2 * pixel:.3g} Å) at box {box}"
        )
    if params.modes < 1:
        raise DvaInputError(f"--modes {params.modes}: need at least 1")
    if params.iterations < 1:
        raise DvaInputError(f"--iterations {params.iterations}: need at least 1")
    if params.max_particles is not None and params.max_particles < 1:
        raise DvaInputError(f"--max-particles {params.max_particles}: need at least 1")
    if params.scale not in ("optimal", "input", "none"):
        raise DvaInputError(f"--scale {params.scale}: use optimal, input or none")
    if params.noise not in ("colored", "white"):
        raise DvaInputError(f"--noise {params.noise}: use colored or white")
    return box, pixel


def run_3dva(
    store: str | Path,
    mask_path: str | Path,
    params: RunParams,
    cluster: Cluster,
    progress: Callable[[dict], None] | None = None,
) -> Result:
    """Fit the mean and `params.modes` components to the particles of `store`; `progress` gets each
    iteration's metrics."""
    store = str(Path(store).absolute())
    t0 = time.perf_counter()
    images, table, attrs = open_store(store)
    if not table.attrs["has_poses"]:
        raise DvaInputError(f"{attrs['source']}: particles have no poses (3DVA needs a consensus refinement)")
    if table["ctf_premultiplied"].to_numpy().any():
        raise DvaInputError(f"{attrs['source']}: CTF-premultiplied images are not supported yet")
    box, pixel = _check(params, images.shape[-1], attrs["pixel_size_A"])
    n = min(images.shape[0], params.max_particles or images.shape[0])
    mask = load_mask(mask_path, box, pixel)
    filt = band_filter(
        box, pixel, params.filter_res_A, params.filter_order, params.highpass_res_A, params.highpass_order
    )
    client, backend = cluster.client, cluster.backend
    client.wait_for_workers(1)
    addresses = sorted(client.ncores())  # asks the scheduler now (scheduler_info() may be stale)
    ranges = task_ranges(n, images.chunks[0], len(addresses))

    # Chunks are dealt round-robin to the workers and stay there (each E/M task is pinned to its chunk).
    chunks = [
        client.submit(load_chunk, store, a, b, box, backend, pure=False, workers=[addresses[i % len(addresses)]])
        for i, (a, b) in enumerate(ranges)
    ]
    mean_parts = [client.submit(mean_partial, c, box, params.scale, backend, pure=False) for c in chunks]
    mean_stats = tree_sum(client, mean_parts).result()
    owners = {f.key: next(iter(w)) for f, w in zip(chunks, client.who_has(chunks).values(), strict=True) if w}
    mean = solve_mean(mean_stats["num"][0], mean_stats["den"][0], box)
    # Data sign (DESIGN.md §1): protein density is positive; a low-passed mean that is negative
    # inside the mask means the stored images are black on white, so they are used negated.
    data_sign = 1.0 if float((to_real(to_fourier(mean) * filt) * mask).sum()) >= 0 else -1.0
    mean = mean * data_sign
    noise_inverse = noise_from_power(mean_stats, params.noise == "white")
    comps = random_components(params.modes, mask, filt, np.random.default_rng(params.seed))
    timings = {"mean_s": time.perf_counter() - t0}
    metrics: list[dict] = []

    prior = None  # the spread of the optimal scales, known after the first iteration

    def model_future(components: np.ndarray):
        model = Model(fourier_stack(mean, components), noise_inverse, EPS, params.scale, data_sign, prior)
        return client.scatter(model, broadcast=True, hash=False)

    for it in range(params.iterations):
        t_it = time.perf_counter()
        model = model_future(comps)
        parts = [
            client.submit(
                em_partial, c, model, box, backend, pure=False, workers=owners.get(c.key), allow_other_workers=True
            )
            for c in chunks
        ]
        stats = tree_sum(client, parts).result()
        # Re-centre: a common offset of the coordinates is an error of the mean, not variability;
        # moving it into the mean frees the components for what varies.
        mean = mean + np.tensordot(stats["zsum"] / n, comps, axes=1)
        new = solve_components(stats, box, params.modes, params.lam)
        new = regularize(new, mask, filt, orthonormalize=params.gram_schmidt)
        metrics.append(
            {
                "iteration": it + 1,
                "subspace_change_deg": subspace_angle_deg(comps, new),
                "objective": float(stats["objective"]),
                "explained": 1.0 - float(stats["objective"]) / float(stats["baseline"]),
                "seconds": time.perf_counter() - t_it,
            }
        )
        noise_inverse = noise_from_power(stats, params.noise == "white")
        if params.scale == "optimal":
            prior = scale_prior(stats["alpha_moments"], n)
            metrics[-1].update(scale_mean=prior[0], scale_std=prior[1] ** 0.5)
        comps = new
        if progress is not None:
            progress(metrics[-1])

    t_final = time.perf_counter()
    model = model_future(comps)
    coords = client.gather(
        [
            client.submit(
                em_coordinates, c, model, box, backend, pure=False, workers=owners.get(c.key), allow_other_workers=True
            )
            for c in chunks
        ]
    )
    z = np.concatenate([c["z"] for c in coords])
    alpha = np.concatenate([c["alpha"] for c in coords])
    noise_cov = sum(c["zcov"] for c in coords) / len(z)
    zbar = z.mean(axis=0)
    mean = (mean + np.tensordot(zbar, comps, axes=1)).astype(np.float32)
    components, z, variances = principal_axes(comps, z - zbar, noise_cov)
    timings["final_pass_s"] = time.perf_counter() - t_final
    timings["total_s"] = time.perf_counter() - t0
    return Result(
        mean=mean,
        components=components.astype(np.float32),
        z=z.astype(np.float32),
        alpha=alpha.astype(np.float32),
        variances=variances,
        box=box,
        pixel_size_A=pixel,
        particles=n,
        data_sign=data_sign,
        metrics=metrics,
        timings=timings,
        params=asdict(params),
    )
