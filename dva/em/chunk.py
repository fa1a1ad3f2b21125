"""One chunk of particles in the form every pass uses: centred Fourier samples inside the band.

Images are transformed once (`rfft2(ifftshift(img))`, unnormalised, so a projection's transform
equals the volume's `fftn` on the central slice), shifted to centre (`× exp(−2πi k·t)`) and
reduced to the pixels of the band: the half-plane kx ≥ 0 of a disc of radius `box//2 − 1`,
in the rfft2 layout's order (rows of ky, kx along each): neighbouring pixels read neighbouring
voxels (8-9% faster passes on a CPU than in order of radius).
The other half is the complex conjugate; `Band.multiplicity` counts each sample for both
(2 for kx > 0, 1 on the kx = 0 column, which holds both members of each pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dva.io.table import CTF_FIELDS
from dva.ops.ctf import ctf_2d
from dva.ops.filters import radius_3d
from dva.ops.fourier import fft, fourier_crop
from dva.ops.slice import half_rows

# Filter weight below which the components count as zero (`filter_pixels`): their slices and the
# M-step statistics skip those Fourier pixels. 0 (every pixel) by default: the order-1.5 low-pass
# falls slowly (0.05 at 2.7× the cut-off) and on whole runs 0.05 turned the components by 3.7-4.8°
# while saving 21-25% of the time (20k particles at box 64, filter at 8 px: 3.28 -> 2.59 s per
# iteration, coordinates correlated ≥ 0.9988 with the exact run's; README).
BAND_TOLERANCE = 0.0
PREPARE_BYTES = 32 * 2**20  # stored images prepared at a time
CTF_ARGUMENTS = tuple(f for f in CTF_FIELDS if f != "ctf_scale")  # the table fields `ctf_2d` takes


@dataclass(frozen=True)
class Band:
    """The 2D frequencies processed, `(P,)` each, in the rfft2 layout's order: cycles/pixel, radius in
    pixels, shell index, multiplicity in the full plane, and the flat index into the
    `(box, box//2 + 1)` rfft2 layout; and `rows`, the half spectra's rows that the statistics are
    kept on (`band_rows`)."""

    box: int
    kx: np.ndarray
    ky: np.ndarray
    radius: np.ndarray
    shell: np.ndarray
    multiplicity: np.ndarray
    flat: np.ndarray
    rows: np.ndarray

    @property
    def shells(self) -> int:
        return self.box // 2

    def shell_counts(self, particles: int, xp: ModuleType = np):
        """Full-plane pixels per shell over `particles` images (the denominators of shell averages)."""
        return xp.bincount(self.shell, weights=self.multiplicity, minlength=self.shells) * float(particles)


def half_radius(box: int, xp: ModuleType = np):
    """|k| in pixels (cycles per box) of every row `(D·D·D//2,)` of the half spectra (`dva.ops.slice`)."""
    return radius_3d(box, xp)[..., box // 2 :].ravel() * box


def half_multiplicity(box: int, xp: ModuleType = np):
    """How many voxels of the full grid each row of the half spectra stands for `(D·D·D//2,)`: 1 on
    the kx = 0 plane (its own mirror's half), 2 elsewhere (itself and its mirror)."""
    weight = xp.full((box, box, box // 2), 2.0)
    weight[..., 0] = 1.0
    return weight.ravel()


def inside_band_half(box: int, xp: ModuleType = np):
    """`(D·D·D//2,)` bool: rows of the half spectra within the band radius `box//2 − 1`."""
    return half_radius(box, xp) <= box // 2 - 1


def band_rows(box: int, xp: ModuleType = np):
    """The rows `(R,)` of the half spectra in the shells the band reaches (|k| rounded to at most
    `box//2 − 1` pixels), sorted: the only rows the solves read (`inside_band_half` and the means
    of its shells), so a task's M-step and mean statistics at these alone are moved to the front of
    its accumulator (which spans every row; `compact_rows`), and held on the worker, summed and sent
    so: 52% of the rows at box 128 (52 instead of 100 MB of M-step sums per worker and pass at K = 3),
    2.6 instead of 5.0 GB at box 256, K = 10. Each row's mirror (`completed_rows`) is among them."""
    return xp.flatnonzero(xp.rint(half_radius(box, xp)) <= box // 2 - 1)


def sums_bytes(box: int, channels: int) -> int:
    """Bytes a worker holds at once for a pass's volume-sized float64 sums of `channels` channels at
    `box`: a task's accumulator over the half spectrum beside the worker's sums held at the band's
    rows (`band_rows`; more than the two sets of held sums that meet where the workers' are added
    up). Box 256 with the M-step's 75 channels of K = 10: 7.7 GB (a CPU worker peaked at 8.3 GB)."""
    return 8 * channels * (half_rows(box) + len(band_rows(box)))


def make_band(box: int, xp: ModuleType = np) -> Band:
    """Every pixel of the `box`² rfft2 half-plane with |k| ≤ (box//2 − 1)/box cycles/pixel, in the
    layout's order (and the rows of the half spectra its statistics are kept on)."""
    ky, kx = xp.meshgrid(xp.fft.fftfreq(box), xp.fft.rfftfreq(box), indexing="ij")
    radius = (xp.sqrt(kx * kx + ky * ky) * box).ravel()
    flat = xp.flatnonzero(radius <= box // 2 - 1)
    kx, ky, radius = kx.ravel()[flat], ky.ravel()[flat], radius[flat]
    return Band(
        box=box,
        kx=kx,
        ky=ky,
        radius=radius,
        shell=xp.rint(radius).astype(xp.int64),
        multiplicity=xp.where(kx > 0, 2.0, 1.0),
        flat=flat,
        rows=band_rows(box, xp).astype(xp.int32),  # (kept by each worker: 2.2 MB at box 128)
    )


def filter_pixels(band: Band, filt, tolerance: float) -> np.ndarray:
    """`(P,)` bool: the band's pixels whose trilinear samples can reach a voxel where the centred
    filter volume `filt (D, D, D)` is at least `tolerance`; elsewhere, slices of filtered volumes are
    below `tolerance` of their unfiltered amplitude. A sample at radius r reads voxels within √3
    pixels of it. NumPy only (the driver's work)."""
    radius = radius_3d(band.box).ravel() * band.box
    strong = radius[np.asarray(filt).ravel() >= tolerance]
    pixel_radius = np.asarray(band.radius)
    if strong.size == 0:
        return np.zeros(len(pixel_radius), bool)
    return (pixel_radius >= strong.min() - np.sqrt(3)) & (pixel_radius <= strong.max() + np.sqrt(3))


@dataclass(frozen=True)
class Chunk:
    """n particles of a store, ready for the passes (arrays of one backend)."""

    y: np.ndarray  # (n, P) complex64, centred data samples
    ctf: np.ndarray  # (n, P) float32
    rotation: np.ndarray  # (n, 3, 3) float64, RELION matrices A
    scale: np.ndarray  # (n,) float64, per-particle scale from the metadata

    @property
    def arrays(self) -> tuple:
        """`y`, `ctf`, `rotation`, `scale` (not copied, as `dataclasses.astuple` would copy them)."""
        return self.y, self.ctf, self.rotation, self.scale

    def map(self, function: Callable) -> Chunk:
        """The chunk with `function` applied to each of its arrays (a selection of its particles, a
        copy to or from a device)."""
        return Chunk(*(function(a) for a in self.arrays))


def chunk_bytes_per_particle(band: Band) -> int:
    """Bytes one particle takes in a `Chunk` (`y`, `ctf`, `rotation`, `scale`)."""
    return len(band.flat) * (8 + 4) + 9 * 8 + 8


def prepare_chunk(
    images: np.ndarray,
    rows: dict[str, np.ndarray],
    band: Band,
    original_box: int,
    xp: ModuleType = np,
) -> Chunk:
    """A `Chunk` from stored images `(n, D1, D1)` and their table rows, Fourier-cropped to `band.box`.

    `rows` holds the table variables (`rotation`, `shift_px`, CTF fields, `pixel_size_A`) for the n
    particles in the units of the source images, whose box is `original_box`. Prepared
    `PREPARE_BYTES` of images at a time (bounds the transforms' temporaries).
    """
    n, size = len(images), len(band.flat)
    y, ctf = xp.empty((n, size), xp.complex64), xp.empty((n, size), xp.float32)
    step = max(1, PREPARE_BYTES // (4 * original_box**2))
    for lo in range(0, n, step):
        part = slice(lo, lo + step)
        y[part], ctf[part] = _samples(images[part], {k: v[part] for k, v in rows.items()}, band, original_box, xp)
    return Chunk(
        y=y,
        ctf=ctf,
        rotation=xp.asarray(rows["rotation"], dtype=xp.float64),
        scale=xp.asarray(rows["ctf_scale"], dtype=xp.float64),
    )


def _samples(images, rows: dict[str, np.ndarray], band: Band, original_box: int, xp: ModuleType) -> tuple:
    """`prepare_chunk`'s centred samples `(n, P)` complex64 and CTFs `(n, P)` float32."""
    box = band.box
    factor = original_box / box
    imgs = fourier_crop(xp.asarray(images, dtype=xp.float32), box, xp=xp)
    transforms = fft(xp)
    f = transforms.rfft2(transforms.ifftshift(imgs, axes=(-2, -1))).reshape(len(imgs), -1)[:, band.flat]
    # The shift's phase in float32 (as stored; ~1e-5 radians off at 100 px): cos and sin, not a
    # complex exp (NumPy's complex exp is not vectorised: 10x slower)
    shift = (xp.asarray(rows["shift_px"]) / factor).astype(xp.float32)
    kx, ky = band.kx.astype(xp.float32), band.ky.astype(xp.float32)
    angle = (-2 * np.pi) * (shift[:, 0:1] * kx[None, :] + shift[:, 1:2] * ky[None, :])
    phase = xp.cos(angle) + 1j * xp.sin(angle)
    ctf = xp.empty(f.shape, xp.float32)
    pixel = np.asarray(rows["pixel_size_A"]) * factor
    for size in np.unique(pixel):  # per pixel size (optics group): the frequencies are one row (1, P)
        group = np.flatnonzero(pixel == size)
        ctf[xp.asarray(group)] = ctf_2d(
            band.ky[None, :] / size,
            band.kx[None, :] / size,
            **{name: xp.asarray(rows[name][group])[:, None] for name in CTF_ARGUMENTS},
            xp=xp,
        )
    return f * phase, ctf
