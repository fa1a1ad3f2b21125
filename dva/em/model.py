"""What every pass of an iteration needs: the volumes as Fourier stacks and the noise weights."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dva.ops.filters import half_spectrum
from dva.ops.slice import gridding_correction


@dataclass(frozen=True)
class Model:
    """Broadcast once per iteration.

    `volumes`: `(half_rows, K+1)` complex64, the half spectra of V_0 … V_K (`dva.ops.slice`);
    `noise_inverse`: `(shells,)` 1/σ² per shell; `eps`: E-step regulariser; `scale`:
    `optimal`, `input` or `none`; `data_sign`: ±1 applied to the stored images (−1 when the
    run found them black on white); `scale_prior`: mean and variance of the true optimal scales
    across particles (None: no shrinkage), see `scale_prior`; `pixels`: `(P,)` bool, the band's
    pixels (`dva.em.chunk.filter_pixels`) where the components are sliced and the M-step statistics
    inserted (None: all); elsewhere the filtered components count as zero.
    """

    volumes: np.ndarray
    noise_inverse: np.ndarray
    eps: float
    scale: str
    data_sign: float = 1.0
    scale_prior: tuple[float, float] | None = None
    pixels: np.ndarray | None = None

    @property
    def modes(self) -> int:
        return self.volumes.shape[1] - 1


def fourier_stack(mean: np.ndarray, components: np.ndarray, xp: ModuleType = np) -> np.ndarray:
    """`(half_rows, K+1)` complex64, the half spectra (`dva.ops.slice`) of a real mean `(D, D, D)` and
    components `(K, D, D, D)`, divided by the gridding correction first so that trilinear slices of
    them match the volumes' projections."""
    box = mean.shape[0]
    correction = gridding_correction(box, xp)
    vols = [mean, *components]
    return xp.stack([half_spectrum(xp.asarray(v) / correction, xp).ravel() for v in vols], -1).astype(xp.complex64)


def scale_prior(moments, n: int) -> tuple[float, float]:
    """Mean and spread (variance) of the per-particle scales, from `(Σα̂, Σα̂², Σ var α̂)` of `n`
    least-squares estimates: the spread is their variance less their mean noise variance."""
    mean = float(moments[0]) / n
    return mean, max(float(moments[1]) / n - mean**2 - float(moments[2]) / n, 0.0)
