"""What every pass of an iteration needs: the volumes as Fourier stacks and the noise weights."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dva.ops.filters import to_fourier


@dataclass(frozen=True)
class Model:
    """Broadcast once per iteration.

    `volumes`: `(D³, K+1)` complex64, the centred Fourier layout of V_0 … V_K flattened;
    `noise_inverse`: `(shells,)` 1/σ² per shell; `eps`: E-step regulariser; `scale`:
    `optimal`, `input` or `none`; `data_sign`: ±1 applied to the stored images (−1 when the
    run found them black on white).
    """

    volumes: np.ndarray
    noise_inverse: np.ndarray
    eps: float
    scale: str
    data_sign: float = 1.0

    @property
    def modes(self) -> int:
        return self.volumes.shape[1] - 1


def fourier_stack(mean: np.ndarray, components: np.ndarray, xp: ModuleType = np) -> np.ndarray:
    """`(D³, K+1)` complex64 from a real mean `(D, D, D)` and components `(K, D, D, D)`."""
    vols = [mean, *components]
    return xp.stack([to_fourier(xp.asarray(v), xp).ravel() for v in vols], -1).astype(xp.complex64)
