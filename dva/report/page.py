"""`dva report RESULTS`: PNGs, one GIF per component and a self-contained `report.html`.

Images are embedded in the HTML as base64 data URIs, so the page opens from disk in any browser
with no network. Files (in `RESULTS/report/` unless `--out`): `scatter_<a>_<b>.png`,
`energy_<k>.png`, `map.png`, `component_<k>.png`, `convergence.png`, `movie_<k>.gif`,
`halfsets_fsc.png` (runs with `--halfsets`), `report.html`, and `movie_<k>.mp4` where
imageio-ffmpeg is installed (`pip install dva[movies]`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from dva.display.subsets import frame_positions
from dva.io.atomic import atomic_path
from dva.io.results import RunOutputs
from dva.report import plots
from dva.report.images import movie_frames

MOVIE_FRAMES = 10  # positions per direction; the movie oscillates
MOVIE_PERCENTILE = 3.0
FRAME_MS = 120


def gif(frames: list[np.ndarray], frame_ms: int = FRAME_MS) -> bytes:
    """An endlessly looping greyscale GIF of uint8 frames."""
    from PIL import Image

    images = [Image.fromarray(f, mode="L") for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def write_mp4(frames: list[np.ndarray], path: Path, frame_ms: int = FRAME_MS) -> bool:
    """Write the frames as H.264 MP4 when imageio-ffmpeg is installed; returns whether it was."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return False
    height, width = frames[0].shape
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            pix_fmt_in="gray",
            fps=1000 / frame_ms,
            macro_block_size=2,  # even sizes (3·box by box) need no resize
            output_params=["-f", "mp4"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return True


def build_report(run: RunOutputs, out: Path) -> Path:
    """Write every figure and `report.html` into `out`; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    k_modes = run.z.shape[1]
    z = run.z
    figures: list[tuple[str, str, bytes]] = [  # (section, file name, bytes)
        (
            "Reaction coordinates",
            f"scatter_{a}_{a + 1}.png",
            plots.scatter_density(z[:, a], z[:, a + 1], f"z{a}", f"z{a + 1}"),
        )
        for a in range(k_modes - 1)
    ]
    figures += [
        ("Free energy along each coordinate", f"energy_{k}.png", plots.free_energy(z[:, k], f"z{k}"))
        for k in range(k_modes)
    ]
    figures.append(("Mean and components", "map.png", plots.volume_views(run.mean, "mean map", signed=False)))
    figures += [
        (
            "Mean and components",
            f"component_{k}.png",
            plots.volume_views(run.components[k], f"component {k}", signed=True),
        )
        for k in range(k_modes)
    ]
    for k in range(k_modes):
        positions = frame_positions(run.z[:, k], MOVIE_FRAMES, MOVIE_PERCENTILE)
        frames = movie_frames(run.mean, run.components[k], positions)
        figures.append(("Movies (projections along z, y, x)", f"movie_{k}.gif", gif(frames)))
        write_mp4(frames, out / f"movie_{k}.mp4")  # beside the GIF, when imageio-ffmpeg is installed
    halves = run.job.get("halfsets")
    if halves:
        figures.append(("Is each mode real? (split-half validation)", "halfsets_fsc.png", plots.half_fsc(halves)))
    metrics = run.job.get("iterations", [])
    if metrics:
        figures.append(("Convergence", "convergence.png", plots.convergence(metrics)))
    for _, name, data in figures:
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    page = out / "report.html"
    with atomic_path(page) as tmp:
        tmp.write_text(_html(run, figures))
    return page


def _html(run: RunOutputs, figures: list[tuple[str, str, bytes]]) -> str:
    job = run.job
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dva report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%;margin:4px}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
        f"<h1>dva 3D variability: {html.escape(str(run.folder))}</h1>",
        f"<p>{len(run.z):,} particles, box {run.mean.shape[-1]} at {run.pixel_size_A:.4g} Å/px, "
        f"{run.z.shape[1]} components; variances {', '.join(f'{v:.4g}' for v in job.get('variances', []))}.</p>",
    ]
    section = None
    for sec, name, data in figures:
        if sec != section:
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            section = sec
        mime = "image/gif" if name.endswith(".gif") else "image/png"
        uri = base64.b64encode(data).decode()
        parts.append(f"<img alt='{name}' title='{name}' src='data:{mime};base64,{uri}'>")
    halves = job.get("halfsets")
    if halves:
        parts.append("<h2>Split-half validation</h2><table><tr><td>component</td><td>FSC 0.143 (Å)</td>")
        parts.append("<td>coordinate correlation between halves</td></tr>")
        for k, (res, corr) in enumerate(zip(halves["resolution_A"], halves["coordinate_correlation"], strict=True)):
            shown = "none (below 0.143 at once)" if res is None else f"{res:.3g}"
            parts.append(f"<tr><td>{k}</td><td>{shown}</td><td>{corr:.3f}</td></tr>")
        parts.append(
            f"</table><p>half-sets of {halves['particles'][0]:,} and {halves['particles'][1]:,} particles; "
            "each half fitted alone from its own random start.</p>"
        )
    for title, table in (("Parameters", job.get("parameters", {})), ("Timings (s)", job.get("timings_s", {}))):
        parts.append(f"<h2>{title}</h2><table>")
        parts += [
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in table.items()
        ]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
