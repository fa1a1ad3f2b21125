"""Particle subsets of the display job: frames along a coordinate and clusters of coordinates."""

from __future__ import annotations

import numpy as np


def frame_weights(values: np.ndarray, positions: np.ndarray, window: int) -> np.ndarray:
    """Weights `(N, F)` of particles with coordinate `values (N,)` for frames at `positions (F,)`.

    `window > 0`: triangular, 1 at a frame's position falling to 0 `window` frame spacings away;
    `0`: hard bins, each particle in the frame nearest its coordinate (those outside the range in
    the end frames); `-1`: hard bins of equal particle count in coordinate order (then the
    positions are not used).
    """
    n, frames = len(values), len(positions)
    if window == -1:
        order = np.argsort(values, kind="stable")
        labels = np.empty(n, dtype=np.int64)
        labels[order] = np.arange(n) * frames // n
        return one_hot(labels, frames)
    if window == 0:
        return one_hot(np.abs(values[:, None] - positions[None, :]).argmin(1), frames)
    if window < -1:
        raise ValueError(f"window must be ≥ −1, got {window}")
    spacing = (positions[-1] - positions[0]) / max(frames - 1, 1)
    distance = np.abs(values[:, None] - positions[None, :]) / (window * spacing)
    return np.clip(1.0 - distance, 0.0, None)


def equal_count_positions(values: np.ndarray, frames: int) -> np.ndarray:
    """Median coordinate of each of `frames` equal-count bins (the `window = −1` frames)."""
    order = np.sort(values)
    return np.array([np.median(part) for part in np.array_split(order, frames)])


def one_hot(labels: np.ndarray, groups: int) -> np.ndarray:
    """`(N, groups)` float64 with a 1 at each particle's label."""
    out = np.zeros((len(labels), groups))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def cluster_labels(z: np.ndarray, clusters: int, method: str, seed: int) -> np.ndarray:
    """Cluster `(N, k)` coordinates: a Gaussian mixture with full covariances (`gmm`) or k-means;
    labels are renumbered by the clusters' first coordinate (ascending) so runs are comparable."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    if method == "gmm":
        model = GaussianMixture(clusters, covariance_type="full", n_init=3, random_state=seed)
    elif method == "kmeans":
        model = KMeans(clusters, n_init=10, random_state=seed)
    else:
        raise ValueError(f"method must be gmm or kmeans, got {method}")
    labels = model.fit_predict(z)
    centres = np.array([z[labels == c, 0].mean() if np.any(labels == c) else np.inf for c in range(clusters)])
    rank = np.empty(clusters, dtype=np.int64)
    rank[np.argsort(centres, kind="stable")] = np.arange(clusters)
    return rank[labels]


def coordinate_range(values: np.ndarray, percentile: float) -> tuple[float, float]:
    """The p-th and (100 − p)-th percentiles of one component's coordinates."""
    if not 0 <= percentile < 50:
        raise ValueError(f"percentile must be in [0, 50), got {percentile}")
    lo, hi = np.percentile(values, [percentile, 100 - percentile])
    return float(lo), float(hi)


def frame_positions(values: np.ndarray, frames: int, percentile: float) -> np.ndarray:
    """`frames` coordinates evenly spaced over the percentile range of `values` (ends included)."""
    return np.linspace(*coordinate_range(values, percentile), frames)
