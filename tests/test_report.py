"""`dva report`: every embedded image decodes, is not blank and has its stated size; the movies."""

from __future__ import annotations

import base64
import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dva.cli import app
from dva.engine.loop import Result
from dva.io.results import write_results
from dva.io.star import read_star
from dva.report.page import MOVIE_FRAMES
from dva.sim.phantom import render_volume
from dva.sim.simulate import simulate_dataset

runner = CliRunner()
N = 3000
# Pixel sizes of the figures (figsize × 100 dpi in dva/report/plots.py).
SIZES = {
    "scatter": (450, 400),
    "energy": (450, 320),
    "map": (900, 220),
    "component": (900, 220),
    "convergence": (800, 300),
    "halfsets": (600, 350),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    table = read_star(simulate_dataset(tmp / "sim", "tiny", particles=N, seed=3) / "particles.star")

    def blob(centre):
        return render_volume(np.array([centre], float), np.array([6.0]), np.array([1.0]), 32, 4.0)

    rng = np.random.default_rng(0)
    result = Result(
        mean=blob((0, 0, 0)).astype(np.float32),
        components=np.stack([blob((8, 0, 0)) - blob((-8, 0, 0)), blob((0, 8, 0)) - blob((0, -8, 0))]).astype(
            np.float32
        ),
        z=np.stack([rng.normal(0, 2, N), rng.normal(0, 1, N)], 1).astype(np.float32),
        alpha=np.ones(N, np.float32),
        variances=np.array([4.0, 1.0]),
        box=32,
        pixel_size_A=4.0,
        particles=N,
        metrics=[{"iteration": i + 1, "subspace_change_deg": 10.0 / (i + 1), "explained": 0.01 * i} for i in range(5)],
        halves={
            "frequency_A_inv": [0.01, 0.02, 0.03],
            "fsc": [[0.9, 0.5, 0.1], [0.1, 0.0, -0.1]],
            "resolution_A": [40.0, None],
            "coordinate_correlation": [0.8, 0.05],
            "particles": [1500, 1500],
            "components": [np.zeros((2, 32, 32, 32), np.float32), np.ones((2, 32, 32, 32), np.float32)],
        },
    )
    write_results(tmp / "r", "dva", result, table, {"input": "test"})
    return tmp / "r"


def test_every_embedded_image_decodes_and_is_not_blank(run_dir):
    r = runner.invoke(app, ["report", str(run_dir)])
    assert r.exit_code == 0, r.output
    page = (run_dir / "report" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    found = re.findall(r"alt='([^']+)' title='[^']+' src='data:(image/\w+);base64,([^']+)'", page)
    names = sorted(name for name, _, _ in found)
    assert names == sorted(
        [
            *("scatter_0_1.png", "energy_0.png", "energy_1.png", "map.png", "component_0.png", "component_1.png"),
            *("movie_0.gif", "movie_1.gif", "convergence.png", "halfsets_fsc.png"),
        ]
    )
    for name, mime, data in found:
        raw = base64.b64decode(data)
        assert raw == (run_dir / "report" / name).read_bytes()
        image = Image.open(io.BytesIO(raw))
        assert image.format == ("GIF" if mime == "image/gif" else "PNG")
        if image.format == "PNG":
            assert image.size == SIZES[name.split("_")[0].removesuffix(".png")], name
            assert np.asarray(image.convert("L"), dtype=float).var() > 0, name


def test_halfset_outputs_and_report_table(run_dir):
    assert (run_dir / "dva_component_1_half_B.mrc").is_file() and (run_dir / "dva_component_0_half_A.mrc").is_file()
    runner.invoke(app, ["report", str(run_dir), "--out", str(run_dir / "rep3")])
    page = (run_dir / "rep3" / "report.html").read_text()
    assert "<tr><td>0</td><td>40</td><td>0.800</td></tr>" in page
    assert "<tr><td>1</td><td>none (below 0.143 at once)</td><td>0.050</td></tr>" in page


def test_movie_has_the_frames_and_they_differ(run_dir):
    runner.invoke(app, ["report", str(run_dir), "--out", str(run_dir / "rep2")])
    gif = Image.open(run_dir / "rep2" / "movie_0.gif")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("L"), dtype=float))
    assert len(frames) == 2 * MOVIE_FRAMES - 2  # there and back, ends once
    assert frames[0].shape == (32, 96)  # three 32² projections side by side
    assert all(np.abs(a - b).max() > 0 for a, b in itertools.pairwise(frames))
    np.testing.assert_array_equal(frames[1], frames[-1])  # oscillates back


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "job.json" in r.output


def test_quiet_commands_print_no_progress(run_dir, tmp_path):
    for args in (
        ["simulate", "--preset", "tiny", "--particles", "50", "--out", str(tmp_path / "s"), "--quiet"],
        ["display", str(run_dir), "--out", str(tmp_path / "d"), "--frames", "3", "--quiet"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        progress_line = re.compile(r"^(simulating|writing frames): [\d,]+/[\d,]+$", re.MULTILINE)
        assert "━" not in r.output and not progress_line.search(r.output)
        noisy = runner.invoke(app, [a for a in args if a != "--quiet"])
        # Not a terminal here: plain progress lines ("simulating: 50/50") instead of a bar.
        assert noisy.exit_code == 0 and "━" not in noisy.output
        assert progress_line.search(noisy.output)


def test_mp4_beside_the_gif_where_imageio_ffmpeg_is_installed(run_dir, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "rep")])
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "rep" / "movie_0.mp4"), pix_fmt="gray")
    meta = reader.__next__()
    frames = np.frombuffer(b"".join(reader), np.uint8).reshape(-1, 32, 96)
    assert meta["size"] == (96, 32) and len(frames) == 2 * MOVIE_FRAMES - 2
    gif = Image.open(tmp_path / "rep" / "movie_0.gif")
    gif.seek(3)
    # H.264 is lossy: the frame matches the GIF's to a few grey levels on average.
    assert np.abs(frames[3].astype(float) - np.asarray(gif.convert("L"), dtype=float)).mean() < 6
