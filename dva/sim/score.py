"""How well a run recovered a simulation's truth (used by `dva demo` and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dva.em.mstep import band_filter
from dva.io.mask import load_mask
from dva.ops.filters import filter_real
from dva.ops.fourier import fourier_crop


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (Pearson correlation of the ranks; values are continuous, so no ties)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def score(result, sim_dir: Path, filter_res_A: float, *, min_fraction: float = 0.05) -> dict:
    """Subspace capture of the true components carrying ≥ `min_fraction` of the variance.

    Truth and estimate are compared inside the mask after the run's low-pass:
    `capture = ‖U_trueᵀ U_est‖²_F / k` (1 is perfect), also per true component. The coordinates
    are compared with the simulated latent (Spearman, best over components) and state.
    """
    truth = np.load(sim_dir / "truth" / "truth.npz")
    mask = load_mask(sim_dir / "mask.mrc", result.box, result.pixel_size_A)
    filt = band_filter(result.box, result.pixel_size_A, filter_res_A, 1.5, None, 8)
    box = result.box
    chosen = [c for c, f in zip(truth["components"], truth["variance_fraction"], strict=True) if f >= min_fraction]
    true = []
    for c in chosen:
        if c.shape[0] != box:  # the run Fourier-cropped the data: crop the truth alike
            c = fourier_crop(c, box, ndim=3)
        true.append(filter_real(c * mask, filt).ravel())
    q_true, _ = np.linalg.qr(np.stack(true).T)
    q_est, _ = np.linalg.qr(result.components.reshape(len(result.components), -1).T.astype(np.float64))
    per_mode = ((q_true.T @ q_est) ** 2).sum(1)
    n = len(result.z)
    rho = [abs(rank_correlation(result.z[:, k], truth["latent"][:n])) for k in range(result.z.shape[1])]
    state = [abs(float(np.corrcoef(result.z[:, k], truth["present"][:n])[0, 1])) for k in range(result.z.shape[1])]
    return {
        "true_components": len(chosen),
        "capture": float(per_mode.mean()),
        "capture_per_component": [float(v) for v in per_mode],
        "spearman_z0_latent": rho[0],
        "best_spearman_latent": max(rho),
        "best_correlation_state": max(state),
    }
