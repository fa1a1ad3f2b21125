"""The mean volume V_0: direct Fourier reconstruction as one map-reduce pass (DESIGN.md §2).

`V_0(ω) = Σ Sᵢᵀ(α c ỹ) / (Σ Sᵢᵀ(α² c²) + τ(ω))`. Noise weights are constant within a shell and a
slice keeps |k|, so they cancel in the ratio; they are estimated here from the data power.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.em.chunk import Band, Chunk, band_rows, half_multiplicity, half_radius, inside_band_half
from dva.ops.filters import to_real
from dva.ops.slice import (
    compact_rows,
    complete_plane,
    gridding_correction,
    half_rows,
    insert,
    slice_stencil,
    view_order,
)

MEAN_TAU = 1e-3  # τ as a fraction of the shell's mean denominator
BATCH = 128  # particles per vectorised step on CPU workers (their cache), for one group
GPU_POINTS = 2**22  # samples per vectorised step on GPU workers for one group (~0.5 GB of temporaries)


def batch_size(pixels: int, groups: int, xp: ModuleType = np) -> int:
    """Particles per vectorised step for images of `pixels` samples and `groups` subsets: `BATCH`
    on CPU workers; on GPU workers as many as make `GPU_POINTS` samples (666 at box 128), so that
    each of the step's few kernel launches has work to do (unmeasured on a GPU); both divided by
    the groups, so a step's values `(samples, 3·groups)` float64 stay the same size (~100 MB on
    GPU workers) whatever their number."""
    per_step = BATCH if xp is np else GPU_POINTS // max(pixels, 1)
    return max(1, per_step // groups)


def mean_statistics(chunk: Chunk, band: Band, scale: str, xp: ModuleType = np, weights=None) -> dict:
    """Partial sums of one chunk on the band's rows of the half spectra (`dva.ops.slice`,
    `Band.rows`: R of them): numerator `(G, 2, R)` (re, im), denominator `(G, R)`, power per shell.

    `weights (n, G)` reconstructs G particle subsets at once (group g sums `w_ig ·` each particle's
    terms); None is one group with weight 1, the mean.
    """
    box = band.box
    groups = 1 if weights is None else weights.shape[1]
    half = band.multiplicity / 2  # each sample stands for itself and its mate (see `complete_plane`)
    sums = xp.zeros((half_rows(box), 3 * groups))  # voxel-major: (re, im, den) of each group side by side
    weights = None if weights is None else xp.asarray(weights)
    batch = batch_size(len(band.flat), groups, xp)
    order = view_order(chunk.rotation, batch, xp)  # batches of nearby slice planes (cache locality)
    for lo in range(0, len(chunk.y), batch):
        sl = order[lo : lo + batch]
        alpha = chunk.scale[sl] if scale == "input" else xp.ones(len(sl))
        w = xp.ones((len(alpha), 1)) if weights is None else weights[sl]
        index, weights_3d, mate = slice_stencil(chunk.rotation[sl], band.kx, band.ky, box, xp)
        num = (alpha[:, None] * chunk.ctf[sl] * half) * chunk.y[sl]
        den = (alpha[:, None] * chunk.ctf[sl]) ** 2 * half
        imaginary = num.imag * mate.reshape(num.shape)  # conjugate where taken at the mirror
        values = xp.empty((*num.shape, groups, 3))  # per sample, (re, im, den) of each group
        for c, part in enumerate((num.real, imaginary, den)):
            xp.multiply(w[:, None, :], part[:, :, None], out=values[..., c])
        insert(values.reshape(-1, 3 * groups), index, weights_3d, sums, xp)
    # Summed over the particles first: one add per pixel into the few shells, not one per sample (on
    # a GPU those are float64 atomics into ~D/2 addresses).
    power = xp.bincount(
        band.shell,
        weights=(xp.abs(chunk.y) ** 2).sum(axis=0, dtype=xp.float64) * band.multiplicity,
        minlength=band.shells,
    )
    count = band.shell_counts(len(chunk.y), xp)
    sums = compact_rows(sums, band.rows).T.reshape(groups, 3, len(band.rows))
    return {"num": sums[:, :2], "den": sums[:, 2], "power": power, "count": count}


def shell_mean(values, rows, box: int, xp: ModuleType = np):
    """Mean over each shell (rounded |k|·D) of the full grid of `values (len(rows),)` given at the half
    spectra's `rows` (whole shells: `band_rows`; each row standing for itself and, off the kx = 0
    plane, its mirror, which holds the same value), broadcast back to those rows."""
    shell = xp.rint(half_radius(box, xp)[rows]).astype(xp.int64)
    weight = half_multiplicity(box, xp)[rows]
    total = xp.bincount(shell, weights=values * weight)
    count = xp.maximum(xp.bincount(shell, weights=weight), 1)
    return (total / count)[shell]


def solve_mean(num, den, box: int, xp: ModuleType = np) -> np.ndarray:
    """A volume `(D, D, D)` float32 (real space, map units, gridding-corrected) from one group's summed
    numerator `(2, R)` and denominator `(R,)` on the band's rows of the half spectra (`band_rows`)."""
    rows = band_rows(box, xp)
    num = complete_plane(num[:1], rows, box, 1.0, xp)[0] + 1j * complete_plane(num[1:], rows, box, -1.0, xp)[0]
    den = complete_plane(den[None], rows, box, 1.0, xp)[0]
    tau = MEAN_TAU * shell_mean(den, rows, box, xp) + 1e-30
    spectrum = xp.zeros(half_rows(box), dtype=num.dtype)
    spectrum[rows] = xp.where(inside_band_half(box, xp)[rows], num / (den + tau), 0)
    return (to_real(spectrum.reshape(box, box, box // 2), xp) / gridding_correction(box, xp)).astype(xp.float32)


def noise_from_power(stats: dict, white: bool, xp: ModuleType = np):
    """1/σ² per shell from a summed power and count (σ² constant over shells when `white`)."""
    power, count = stats["power"], xp.maximum(stats["count"], 1)
    sigma2 = xp.full_like(power, power.sum() / count.sum()) if white else power / count
    return 1.0 / xp.maximum(sigma2, 1e-12 * sigma2.max())
