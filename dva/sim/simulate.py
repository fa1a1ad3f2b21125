"""`dva simulate`: a heterogeneous dataset with known truth, written as RELION and CryoSPARC files.

Images are analytic real-space projections of Gaussian blobs (`dva.sim.phantom`), so the
simulator shares no code with the engine's Fourier slicer. Then the CTF (RELION sign, with
astigmatism) is applied in Fourier space and white Gaussian noise is added at the given SNR
(signal variance over noise variance, per image, averaged).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from dask.system import cpu_count

from dva.io.atomic import atomic_path
from dva.io.cs import write_cs
from dva.io.mrc import write_stack, write_volume
from dva.io.star import write_star
from dva.io.table import make_table, uids_from_rows
from dva.ops.ctf import ctf_2d, frequency_grid_2d
from dva.ops.fourier import fft
from dva.ops.rotation import random_rotations
from dva.sim.phantom import (
    blob_state,
    make_phantom,
    project_blobs,
    render_volume,
    soft_mask,
    true_mean_and_components,
)


@dataclass(frozen=True)
class Preset:
    """Size and difficulty of a simulated dataset."""

    particles: int
    box: int
    pixel_size_A: float
    snr: float


PRESETS = {
    "tiny": Preset(particles=600, box=32, pixel_size_A=4.0, snr=0.5),
    "small": Preset(particles=5000, box=64, pixel_size_A=3.0, snr=0.1),
    "large": Preset(particles=100_000, box=128, pixel_size_A=1.5, snr=0.1),
}
P_PRESENT = 0.5  # fraction of particles with the optional subunit
# The subunit's density relative to the rest: at 0.5 the motion is the first principal component
# (about 2/3 of the variance after a 12 Å filter) and the subunit the second.
SUBUNIT_CONTRAST = 0.5
TRUTH_COMPONENTS = 4
BATCH = 1024  # images per batch, fewer above box 128 (`_batches`)
BATCH_PIXELS = 1024 * 128 * 128  # a batch being made peaks at ~33 bytes per pixel: 0.55 GB


@dataclass(frozen=True)
class Draws:
    """Per-particle random quantities of a simulation."""

    latent: np.ndarray  # (n,) in [-1, 1], the continuous motion
    present: np.ndarray  # (n,) bool, the discrete subunit
    rotation: np.ndarray  # (n, 3, 3) RELION matrices
    shift_px: np.ndarray  # (n, 2) centring shifts
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_rad: np.ndarray
    halfset: np.ndarray


def draw(n: int, box: int, rng: np.random.Generator) -> Draws:
    """Latent values, states, uniform poses, small shifts and astigmatic defoci for n particles."""
    defocus = rng.uniform(10_000, 25_000, n)
    astig = rng.uniform(0, 800, n)
    return Draws(
        latent=rng.uniform(-1, 1, n),
        present=rng.random(n) < P_PRESENT,
        rotation=random_rotations(n, rng),
        shift_px=np.clip(rng.normal(0, 0.03 * box, (n, 2)), -0.08 * box, 0.08 * box),
        defocus_u_A=defocus + astig / 2,
        defocus_v_A=defocus - astig / 2,
        defocus_angle_rad=rng.uniform(-np.pi, np.pi, n),
        halfset=rng.integers(0, 2, n),
    )


CTF_CONSTANTS = {"voltage_kV": 300.0, "cs_mm": 2.7, "amp_contrast": 0.1}


def clean_images(phantom, d: Draws, rows: slice) -> np.ndarray:
    """CTF-modulated noiseless images `(n, D, D)` float32 for particles `rows` (the CTF applied on
    the `rfft2` half-plane in float32: the CTF is even, `ctf(−k) = ctf(k)`)."""
    centres, amplitude = blob_state(phantom, d.latent[rows], d.present[rows])
    proj = project_blobs(
        centres, phantom.sigma_A, amplitude, d.rotation[rows], d.shift_px[rows], phantom.box, phantom.pixel_size_A
    )
    ky, kx = frequency_grid_2d(phantom.box, phantom.pixel_size_A, rfft=True)
    ctf = ctf_2d(
        ky,
        kx,
        defocus_u_A=d.defocus_u_A[rows, None, None],
        defocus_v_A=d.defocus_v_A[rows, None, None],
        defocus_angle_rad=d.defocus_angle_rad[rows, None, None],
        **CTF_CONSTANTS,
    ).astype(np.float32)
    transforms = fft()
    f = transforms.rfft2(transforms.ifftshift(proj.astype(np.float32), axes=(-2, -1)))
    return transforms.fftshift(transforms.irfft2(f * ctf, s=proj.shape[-2:]), axes=(-2, -1)).astype(np.float32)


def noisy_images(phantom, d: Draws, rows: slice, sigma: float, seed: int) -> np.ndarray:
    """`clean_images` plus white Gaussian noise of standard deviation `sigma`, drawn from a stream
    of its own for each batch (`[seed, 1, first row]`): the same dataset however the batches are
    spread over threads."""
    clean = clean_images(phantom, d, rows)
    noise = np.random.default_rng([seed, 1, rows.start]).standard_normal(clean.shape, dtype=np.float32)
    return clean + np.float32(sigma) * noise


def _batches(phantom, d: Draws, n: int, sigma: float, seed: int) -> Iterator[np.ndarray]:
    """The noisy images in order, in batches of `BATCH` images or `BATCH_PIXELS` pixels, whichever
    is fewer, made by one thread per core (NumPy's FFTs, ufuncs and generators release the GIL), at
    most `cores + 2` batches in flight."""
    batch = max(1, min(BATCH, BATCH_PIXELS // (phantom.box * phantom.box)))
    rows = [slice(start, min(start + batch, n)) for start in range(0, n, batch)]
    cores = max(1, min(len(rows), cpu_count()))
    with ThreadPoolExecutor(cores) as pool:
        pending: deque = deque()
        for part in rows:
            pending.append(pool.submit(noisy_images, phantom, d, part, sigma, seed))
            if len(pending) >= cores + 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def simulate_dataset(
    out: str | Path,
    preset: str = "small",
    *,
    particles: int | None = None,
    box: int | None = None,
    snr: float | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    truth: bool = True,
) -> Path:
    """Write `particles.star`, `particles.mrcs`, `particles.cs`, `mask.mrc` and `truth/` into `out`.

    `particles`, `box` and `snr` override the preset's (a different box keeps the physical size);
    `truth=False` leaves out `truth/`.

    `truth/truth.npz` holds per-particle `latent` and `present`, the true `mean` volume and
    `components` (top eigenvectors of the volume distribution, unit norm) with their
    `variance_fraction`, and the optional `subunit` alone (so the mean given the state is
    `mean + (1 − p)·subunit` with it and `mean − p·subunit` without, p = 0.5); `truth/mean.mrc` and `truth/component_<k>.mrc` are the same volumes.
    """
    p = PRESETS[preset]
    if box is not None:  # the same molecule and physical box, sampled on `box` pixels
        p = Preset(particles=p.particles, box=box, pixel_size_A=p.pixel_size_A * p.box / box, snr=p.snr)
    n = particles or p.particles
    snr = snr or p.snr
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phantom = make_phantom(p.box, p.pixel_size_A, rng)
    phantom = replace(phantom, amplitude=np.where(phantom.optional, SUBUNIT_CONTRAST, 1.0) * phantom.amplitude)
    d = draw(n, p.box, rng)
    signal_var = float(clean_images(phantom, d, slice(0, min(n, 256))).var(axis=(1, 2)).mean())
    sigma = np.sqrt(signal_var / snr)

    def batches() -> Iterator[np.ndarray]:
        for images in _batches(phantom, d, n, sigma, seed):
            yield images
            if progress is not None:
                progress(len(images))

    stack = out / "particles.mrcs"
    write_stack(stack, (n, p.box, p.box), batches(), p.pixel_size_A)
    table = make_table(
        rotation=d.rotation,
        shift_px=d.shift_px,
        stacks=[str(stack.absolute())],
        source=str((out / "particles.star").absolute()),
        source_sha256="",
        source_format="simulated",
        has_poses=True,
        defocus_u_A=d.defocus_u_A,
        defocus_v_A=d.defocus_v_A,
        defocus_angle_rad=d.defocus_angle_rad,
        phase_shift_rad=0.0,
        bfactor_A2=0.0,
        ctf_scale=1.0,
        ctf_premultiplied=False,
        pixel_size_A=p.pixel_size_A,
        image_size=p.box,
        data_sign=1.0,
        halfset=d.halfset,
        uid=uids_from_rows(f"dva-simulate-{seed}", n),
        optics_group=1,
        stack=0,
        stack_index=np.arange(n),
        source_row=np.arange(n),
        **CTF_CONSTANTS,
    )
    write_star(out / "particles.star", table)
    write_cs(out / "particles.cs", table)
    write_volume(out / "mask.mrc", soft_mask(phantom, P_PRESENT), p.pixel_size_A)

    if truth:  # the true volumes: 11 s and 3.5 GB at box 256, which benchmarks do without
        mean, components, variances, fraction = true_mean_and_components(phantom, P_PRESENT, TRUTH_COMPONENTS)
        opt = phantom.optional
        subunit = render_volume(
            phantom.centres_A[opt], phantom.sigma_A[opt], phantom.amplitude[opt], p.box, p.pixel_size_A
        )
        folder = out / "truth"
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / "truth.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                latent=d.latent,
                present=d.present,
                mean=mean,
                components=components,
                variances=variances,
                variance_fraction=fraction,
                subunit=subunit,
                pixel_size_A=p.pixel_size_A,
                snr=snr,
                noise_sigma=sigma,
            )
        write_volume(folder / "mean.mrc", mean, p.pixel_size_A)
        for k, comp in enumerate(components):
            write_volume(folder / f"component_{k}.mrc", comp, p.pixel_size_A)
    return out
