"""The 3DVA job as map-reduce passes over zarr chunks (DESIGN.md §2–3).

Pass 0 reconstructs the mean; every iteration is one pass (E-step and M-step statistics per
chunk, summed on each worker, then over the workers in a tree); a last pass computes the
coordinates with the final components. Chunks are read and prepared on the workers once and stay
there; the model is scattered once per iteration; the driver only solves per voxel and filters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from dva.em.chunk import BAND_TOLERANCE, filter_pixels, make_band, sums_bytes
from dva.em.estep import mstep_channels
from dva.em.finish import principal_axes, subspace_angle_deg
from dva.em.mean import noise_from_power, solve_mean
from dva.em.model import Model, fourier_stack, scale_prior
from dva.em.mstep import band_filter, random_components, regularize, solve_components
from dva.engine.checkpoint import Checkpoint, check_identity, load_checkpoint, save_checkpoint
from dva.engine.cluster import Cluster, gpu_count
from dva.engine.placement import place_chunks
from dva.engine.tasks import array_module, em_coordinates, em_partial, mean_partial, to_numpy
from dva.errors import DvaInputError
from dva.io.mask import load_mask
from dva.io.store import open_store, store_location, task_limits
from dva.ops.filters import filter_real
from dva.ops.fsc import fsc, resolution_A

EPS = 0.01  # E-step ridge, relative to tr(G_i)/K


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
    halfsets: bool = False
    band_tolerance: float = BAND_TOLERANCE


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
    halves: dict | None = None  # split-half validation (`--halfsets`), see `compare_halves`
    resident_particles: int = 0  # kept in worker memory between passes (the rest were re-read)
    host_particles: int = 0  # of those, kept in host memory by GPU workers (copied over every pass)
    resumed_at_iteration: int | None = None  # where `--resume` continued from a checkpoint


@dataclass(frozen=True)
class State:
    """What one iteration hands the next: the mean and components (real space), 1/σ² per shell and
    the spread of the optimal scales (None before the first iteration)."""

    mean: np.ndarray
    components: np.ndarray
    noise_inverse: np.ndarray
    prior: tuple[float, float] | None


def halfset_labels(halfset: np.ndarray, seed: int) -> np.ndarray:
    """Half-set 0/1 per particle: the metadata's, and a seeded random one where it is −1."""
    labels = halfset.astype(np.int64).copy()
    missing = labels < 0
    labels[missing] = np.random.default_rng([seed, 2]).integers(0, 2, int(missing.sum()))
    return labels


def align(components: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The rotation of `components (K, ...)` (same span) closest to `reference` (orthogonal Procrustes)."""
    k = len(components)
    m = reference.reshape(k, -1).astype(np.float64) @ components.reshape(k, -1).astype(np.float64).T
    u, _, vt = np.linalg.svd(m)
    return ((u @ vt) @ components.reshape(k, -1)).reshape(components.shape)


def compare_halves(components: list[np.ndarray], z: list[np.ndarray], pixel_size_A: float) -> dict:
    """Per mode: the FSC between the two halves' (aligned) components, its 0.143 resolution (Å; None
    when it starts below), and the correlation of the coordinates each half's components give
    every particle."""
    curves, resolution = [], []
    for a, b in zip(components[0], components[1], strict=True):
        freq, curve = fsc(a, b, pixel_size_A)
        curves.append(curve.tolist())
        res = resolution_A(freq, curve)
        resolution.append(res if np.isfinite(res) else None)  # None: below 0.143 from the first shell
    corr = [float(np.corrcoef(z[0][:, k], z[1][:, k])[0, 1]) for k in range(z[0].shape[1])]
    return {
        "frequency_A_inv": freq.tolist(),
        "fsc": curves,
        "resolution_A": resolution,
        "coordinate_correlation": corr,
        "components": [c.astype(np.float32) for c in components],
    }


def driver_module(cluster: Cluster) -> ModuleType:
    """Where the driver's per-iteration work runs (`update_components`, `fourier_stack`): on the
    cluster's `driver_gpu` (made this thread's current device) when the workers run CuPy and this
    process sees a GPU, else (or with no `driver_gpu`) NumPy. On one CPU core it takes ~0.4 s per
    iteration at box 128, K=3 (per-voxel solves 0.18 s, filters and transforms 0.25 s), a quarter
    of a 30 s / 20-iteration budget."""
    if cluster.backend != "cupy" or cluster.driver_gpu is None or gpu_count() == 0:
        return np
    xp = array_module(cluster.backend)
    xp.cuda.Device(cluster.driver_gpu).use()
    return xp


def release_driver(driver: ModuleType) -> None:
    """Give back what the driver's GPU module keeps cached of its device memory and of the
    page-locked host memory its copies from host arrays were staged through (~4 GB at box 256,
    K = 10: the summed statistics and the components). The run is over. Raises nothing: after a
    CUDA error the run's own error is the one to tell."""
    if driver is not np:
        for pool in (driver.get_default_memory_pool, driver.get_default_pinned_memory_pool):
            with contextlib.suppress(Exception):
                pool().free_all_blocks()


def mean_volume(stats: dict, group: int, box: int, xp: ModuleType = np) -> np.ndarray:
    """Group `group`'s volume `(D, D, D)` float32 (NumPy) from a mean pass's summed `num` and `den`,
    solved on `xp` (the driver's module: its GPU where it has one; box 256: ~1 s on a core)."""
    return to_numpy(solve_mean(xp.asarray(stats["num"][group]), xp.asarray(stats["den"][group]), box, xp))


def initial_components(params: RunParams, mask, filt, seed, xp: ModuleType = np) -> np.ndarray:
    """Seeded random components `(K, D, D, D)` (NumPy), masked, filtered and orthonormalised on `xp`
    (the driver's GPU where it has one: at box 256, K = 10 that took 11-20 s on one core here);
    the same draws on every backend. `mask` and `filt` are `xp` arrays."""
    return to_numpy(random_components(params.modes, mask, filt, np.random.default_rng(seed), xp))


def update_components(
    stats: dict, old: np.ndarray, mask, filt, box: int, params: RunParams, xp: ModuleType = np
) -> tuple[np.ndarray, float]:
    """The M-step on the driver, on `xp`: new components `(K, D, D, D)` (NumPy) from an iteration's
    summed `G` and `b` (solved per voxel, masked, filtered, orthonormalised as `params` say) and the
    largest angle (degrees) between their span and that of the `old` components. `mask` and `filt`
    are `xp` arrays."""
    sums = {name: xp.asarray(stats[name]) for name in ("G", "b")}
    new = solve_components(sums, box, params.modes, params.lam, xp)
    new = regularize(new, mask, filt, orthonormalize=params.gram_schmidt, xp=xp)
    return to_numpy(new), subspace_angle_deg(xp.asarray(old), new, xp)


def pass_sums(box: int, modes: int) -> tuple[int, str, str]:
    """What a run's passes need per worker for their volume-sized sums at `box`, for
    `dva.engine.placement.measure_memory`: bytes (the iterations' M-step channels; the mean's pass
    has 3, no more than K = 1's), what they are, and how to need less."""
    need = sums_bytes(box, mstep_channels(modes))
    return need, f"the M-step's sums of {modes} modes", "a smaller --box or fewer --modes"


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
    if not 0 <= params.band_tolerance < 1:
        raise DvaInputError(
            f"--band-tolerance {params.band_tolerance}: use a filter weight from 0 up to (not including) 1"
        )
    if params.noise not in ("colored", "white"):
        raise DvaInputError(f"--noise {params.noise}: use colored or white")
    if not params.lam > 0:
        raise DvaInputError(f"--lambda {params.lam}: must be positive (it keeps every voxel's K×K system solvable)")
    return box, pixel


def _identity(store: str, particles: int, params: RunParams) -> dict:
    """What a checkpoint must have been written with to be resumed: the data and every parameter
    but the number of iterations and the half-set validation (both may change on resume)."""
    identity = {"store": store, "particles": particles, **asdict(params)}
    for free in ("iterations", "halfsets"):
        identity.pop(free)
    return identity


def resume_point(checkpoint: Path | None, store: str | Path, params: RunParams) -> Checkpoint:
    """The checkpoint a `--resume` of `params` on `store` continues from, checked against them."""
    if checkpoint is None:
        raise DvaInputError("--resume needs the run's output folder (its checkpoint/)")
    saved = load_checkpoint(checkpoint)
    store = store_location(store)
    images, _, _ = open_store(store)
    check_identity(
        checkpoint,
        saved.identity,
        _identity(store, min(images.shape[0], params.max_particles or images.shape[0]), params),
    )
    if saved.iteration > params.iterations:
        raise DvaInputError(
            f"{checkpoint}: the checkpoint is at iteration {saved.iteration}, past --iterations {params.iterations}"
        )
    return saved


def run_3dva(
    store: str | Path,
    mask_path: str | Path,
    params: RunParams,
    cluster: Cluster,
    progress: Callable[[dict], None] | None = None,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    resident_bytes: int | None = None,
    host_bytes: int | None = None,
) -> Result:
    """Fit the mean and `params.modes` components to the particles of `store` (a path or URL);
    `progress` gets each iteration's metrics.

    With `checkpoint` (a folder) the state is saved there after the mean pass and after every
    iteration; `resume` continues from it. `resident_bytes` caps the prepared chunks each worker
    keeps between passes where its tasks run, `host_bytes` those a GPU worker keeps in its host
    memory besides (default: from its memory; the rest are re-read every pass)."""
    store = store_location(store)
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
    pixels = filter_pixels(make_band(box), filt, params.band_tolerance)
    identity = _identity(store, n, params)
    saved = resume_point(checkpoint, store, params) if resume else None
    client, backend = cluster.client, cluster.backend
    driver = driver_module(cluster)
    mask_on_driver, filt_on_driver = driver.asarray(mask), driver.asarray(filt)
    chunk, aligned = task_limits(images, backend)
    sums = pass_sums(box, params.modes)
    placement = place_chunks(client, store, n, chunk, box, backend, resident_bytes, aligned, host_bytes, sums)
    try:
        metrics: list[dict] = []
        if saved is None:
            mean_stats = placement.map(client, mean_partial, box, params.scale, backend)
            mean = mean_volume(mean_stats, 0, box, driver)
            # Data sign (DESIGN.md §1): protein density is positive; a low-passed mean that is negative
            # inside the mask means the stored images are black on white, so they are used negated.
            inside = float((filter_real(driver.asarray(mean), filt_on_driver, driver) * mask_on_driver).sum())
            data_sign = 1.0 if inside >= 0 else -1.0
            comps = initial_components(params, mask_on_driver, filt_on_driver, params.seed, driver)
            state = State(mean * data_sign, comps, noise_from_power(mean_stats, params.noise == "white"), None)
            start = 0
        else:
            state = State(saved.mean, saved.components, saved.noise_inverse, saved.prior)
            data_sign, metrics, start = saved.data_sign, saved.metrics, saved.iteration
        placement.locate(client)
        placement.trim(client)
        timings = {"mean_s": time.perf_counter() - t0}

        def save(iteration: int, coordinates: np.ndarray) -> None:
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    Checkpoint(
                        iteration=iteration,
                        mean=state.mean,
                        components=state.components,
                        noise_inverse=state.noise_inverse,
                        prior=state.prior,
                        data_sign=data_sign,
                        metrics=metrics,
                        identity=identity,
                        coordinates=coordinates,
                    ),
                )

        if saved is None:
            save(0, np.zeros((0, params.modes + 1), np.float32))

        def run_pass(function, state: State, components: np.ndarray, keep: list | None, total: bool):
            """`function` over every task with the model of `state` and `components` (see `Placement.map`)."""
            model = Model(
                to_numpy(fourier_stack(driver.asarray(state.mean), driver.asarray(components), driver)),
                state.noise_inverse,
                EPS,
                params.scale,
                data_sign,
                state.prior,
                pixels,
            )
            return placement.map(client, function, box, backend, shared=model, per_task=keep, total=total)

        def iterate(state: State, keep: list | None) -> tuple[State, dict, np.ndarray]:
            """One E/M pass over the particles (those of `keep` per task when given); also the
            E-step's coordinates and scales `(n, K+1)`."""
            t_it = time.perf_counter()
            stats = run_pass(em_partial, state, state.components, keep, total=True)
            t_pass = time.perf_counter()
            count = int(stats["particles"])
            # Re-centre: a common offset of the coordinates is an error of the mean, not variability;
            # moving it into the mean frees the components for what varies.
            mean = state.mean + np.tensordot(stats["zsum"] / count, state.components, axes=1)
            new, change = update_components(
                stats, state.components, mask_on_driver, filt_on_driver, box, params, driver
            )
            metric = {
                "subspace_change_deg": change,
                "objective": float(stats["objective"]),
                "explained": 1.0 - float(stats["objective"]) / float(stats["baseline"]),
                "seconds": time.perf_counter() - t_it,
                # Where the time went: the pass (model built and sent, workers' passes, their sums
                # collected, `collect_s` of it) and the driver's M-step (per-voxel solves, filters).
                "pass_s": t_pass - t_it,
                "collect_s": stats["collect_s"],
                "mstep_s": time.perf_counter() - t_pass,
            }
            prior = None
            if params.scale == "optimal":
                prior = scale_prior(stats["alpha_moments"], count)
                metric.update(scale_mean=prior[0], scale_std=prior[1] ** 0.5)
            state = State(mean, new, noise_from_power(stats, params.noise == "white"), prior)
            return state, metric, np.concatenate(stats["coordinates"])

        def coordinates(state: State, components: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """z `(N, K)`, α `(N,)` and the mean E-step noise covariance with `components`."""
            coords = run_pass(em_coordinates, state, components, None, total=False)
            z = np.concatenate([c["z"] for c in coords])
            return z, np.concatenate([c["alpha"] for c in coords]), sum(c["zcov"] for c in coords) / len(z)

        for it in range(start, params.iterations):
            state, metric, estep = iterate(state, None)
            metrics.append({"iteration": it + 1, **metric})
            save(it + 1, estep)
            if progress is not None:
                progress(metrics[-1])

        t_final = time.perf_counter()
        z, alpha, noise_cov = coordinates(state, state.components)
        zbar = z.mean(axis=0)
        mean = (state.mean + np.tensordot(zbar, state.components, axes=1)).astype(np.float32)
        components, z, variances = (  # on the driver's GPU: at box 256, K = 10 ~7-17 s on the host
            to_numpy(a)
            for a in principal_axes(driver.asarray(state.components), driver.asarray(z - zbar), noise_cov, driver)
        )
        timings["final_pass_s"] = time.perf_counter() - t_final
        halves = None
        if params.halfsets:
            t_half = time.perf_counter()
            labels = halfset_labels(table["halfset"].to_numpy()[:n], params.seed)
            fitted = []
            for h in (0, 1):
                keep = [labels[a:b] == h for a, b in placement.ranges]
                # Independent: each half starts from its own random components (gold standard).
                initial = initial_components(params, mask_on_driver, filt_on_driver, [params.seed, 3, h], driver)
                half = State(mean, initial, state.noise_inverse, state.prior)
                for _ in range(params.iterations):
                    half, _, _ = iterate(half, keep)
                fitted.append((half, align(half.components, components)))
            zs = [coordinates(half, aligned)[0] for half, aligned in fitted]
            halves = compare_halves([aligned for _, aligned in fitted], zs, pixel)
            halves["particles"] = [int((labels == h).sum()) for h in (0, 1)]
            timings["halfsets_s"] = time.perf_counter() - t_half
    finally:
        # what the workers kept for the run goes even when it failed (or was interrupted)
        placement.release(client)
        release_driver(driver)
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
        halves=halves,
        resident_particles=placement.resident,
        host_particles=placement.host,
        resumed_at_iteration=None if saved is None else saved.iteration,
    )
