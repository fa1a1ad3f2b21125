"""Figures of a run with matplotlib (Agg): coordinates, free energy, volumes, convergence."""

from __future__ import annotations

import io

import numpy as np

from dva.report.images import central_slices, projections, signed_grey


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width_in, height_in), dpi=100)


def png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def scatter_density(a: np.ndarray, b: np.ndarray, label_a: str, label_b: str) -> bytes:
    """2D histogram of two coordinates, log-shaded, so 10^7 points show density, not a blob."""
    from matplotlib.colors import LogNorm

    fig = _figure(4.5, 4.0)
    ax = fig.add_subplot()
    bins = int(np.clip(np.sqrt(len(a)) / 2, 20, 200))
    _, _, _, im = ax.hist2d(a, b, bins=bins, cmap="viridis", norm=LogNorm(), cmin=1)
    fig.colorbar(im, ax=ax, label="particles per bin")
    ax.set_xlabel(label_a)
    ax.set_ylabel(label_b)
    fig.tight_layout()
    return png(fig)


def free_energy(values: np.ndarray, label: str) -> bytes:
    """Histogram of one coordinate with −ln(density) in kT (minimum 0) on a second axis."""
    fig = _figure(4.5, 3.2)
    ax = fig.add_subplot()
    bins = int(np.clip(np.sqrt(len(values)), 20, 200))
    counts, edges, _ = ax.hist(values, bins=bins, color="0.7")
    ax.set_xlabel(label)
    ax.set_ylabel("particles")
    centres = (edges[:-1] + edges[1:]) / 2
    seen = counts > 0
    energy = -np.log(counts[seen] / counts.max())
    ax2 = ax.twinx()
    ax2.plot(centres[seen], energy, color="C3")
    ax2.set_ylabel("free energy −ln(p/p_max) (kT)", color="C3")
    fig.tight_layout()
    return png(fig)


def volume_views(volume: np.ndarray, title: str, *, signed: bool) -> bytes:
    """Three central slices and three projections of a volume, grey (signed: zero at mid-grey)."""
    fig = _figure(9.0, 2.2)
    pictures = central_slices(volume) + projections(volume)
    names = ["slice z", "slice y", "slice x", "projection z", "projection y", "projection x"]
    scale = {}
    if signed:
        pictures = signed_grey(pictures[:3]) + signed_grey(pictures[3:])
        scale = {"vmin": 0.0, "vmax": 1.0}
    for i, (pic, name) in enumerate(zip(pictures, names, strict=True)):
        ax = fig.add_subplot(1, 6, i + 1)
        ax.imshow(pic, cmap="gray", origin="lower", **scale)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return png(fig)


def convergence(metrics: list[dict]) -> bytes:
    """Subspace change (degrees, log scale) and explained power per iteration."""
    fig = _figure(8.0, 3.0)
    its = [m["iteration"] for m in metrics]
    ax = fig.add_subplot(1, 2, 1)
    ax.semilogy(its, [max(m["subspace_change_deg"], 1e-6) for m in metrics], marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("subspace change (°)")
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(its, [100 * m["explained"] for m in metrics], marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("explained residual power (%)")
    fig.tight_layout()
    return png(fig)


def half_fsc(halves: dict) -> bytes:
    """Per mode, the FSC between the two half-sets' components, with the 0.143 line."""
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    freq = np.asarray(halves["frequency_A_inv"])
    for k, (curve, res) in enumerate(zip(halves["fsc"], halves["resolution_A"], strict=True)):
        ax.plot(freq, curve, label=f"component {k}: " + ("none" if res is None else f"{res:.3g} Å"))
    ax.axhline(0.143, color="0.5", linestyle="--", linewidth=1)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC between half-sets")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)
