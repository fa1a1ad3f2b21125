"""`dva run` end to end: every output of DESIGN.md §4, and the coordinates read back."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from dva.cli import app
from dva.io.cs import load_cs
from dva.io.results import star_column
from dva.io.star import read_star
from dva.sim.simulate import simulate_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    sim = simulate_dataset(tmp / "sim", "tiny", particles=400, seed=2)
    out = tmp / "r"
    args = ["run", str(sim / "particles.star"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    args += ["--performance-report", str(tmp / "perf.html")]
    r = runner.invoke(app, [*args, "--modes", "2", "--iterations", "3", "--out", str(out), "--workers", "2", "--quiet"])
    assert r.output.strip().startswith("explained by")  # --quiet: no progress bars or dashboard line
    assert r.exit_code == 0, r.output
    return out


def test_every_output_is_written(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(
        [
            "dva_map.mrc",
            "dva_component_0.mrc",
            "dva_component_1.mrc",
            "dva_particles.cs",
            "dva_particles.star",
            "dva_coordinates.zarr",
            "job.json",
            "run.log",
            "checkpoint",
        ]
    )  # the temporary import store is gone
    for name in ("dva_map.mrc", "dva_component_0.mrc"):
        with mrcfile.open(run_dir / name) as m:
            assert m.data.dtype == np.float32 and m.data.shape == (32, 32, 32)
            assert m.voxel_size.x == pytest.approx(4.0)
            assert tuple(m.header.origin.item()) == (0, 0, 0)
    job = json.loads((run_dir / "job.json").read_text())
    assert job["type"] == "var_3D" and job["parameters"]["modes"] == 2 and len(job["iterations"]) == 3
    assert {"numpy", "dask", "zarr"} <= set(job["versions"])
    log = (run_dir / "run.log").read_text().splitlines()
    assert log[0].startswith("dva ") and log[1].startswith("parameters ")
    iterations = [json.loads(line.split(" ", 1)[1]) for line in log if line.startswith("iteration ")]
    assert iterations == job["iterations"]
    assert log[-1].startswith("timings_s ")
    perf = (run_dir.parent / "perf.html").read_text()
    assert "<html" in perf.lower() and len(perf) > 10_000  # dask's performance report


def test_coordinates_read_back_the_same(run_dir):
    coords = xr.open_zarr(run_dir / "dva_coordinates.zarr", consolidated=False)
    z = coords["z"].values
    cs = load_cs(run_dir / "dva_particles.cs")
    star = read_star(run_dir / "dva_particles.star")
    import starfile

    raw = starfile.read(run_dir / "dva_particles.star")["particles"]
    for k in range(2):
        np.testing.assert_array_equal(cs[f"components_mode_{k}/component"], k)
        np.testing.assert_allclose(cs[f"components_mode_{k}/value"], z[:, k], rtol=1e-6)
        np.testing.assert_allclose(raw[star_column(k)], z[:, k], rtol=1e-6)
    np.testing.assert_array_equal(cs["uid"], coords["uid"].values)
    assert star.sizes["particle"] == len(z) == 400


def test_run_refuses_bad_input(tmp_path):
    r = runner.invoke(
        app,
        [
            "run",
            str(tmp_path / "none.star"),
            "--mask",
            str(tmp_path / "m.mrc"),
            "--filter-res",
            "12",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_inverted_images_are_detected(tmp_path):
    """Images stored black on white give a negative mean: the run notices and uses them negated."""
    from dva.engine.cluster import connect
    from dva.engine.loop import RunParams, run_3dva
    from dva.io.store import import_particles

    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=300, seed=6)
    table = read_star(sim / "particles.star")
    import_particles(table, tmp_path / "up.zarr")
    import_particles(table, tmp_path / "down.zarr", data_sign="-1")
    cluster = connect(workers=1)
    try:
        params = RunParams(filter_res_A=12, modes=2, iterations=2)
        up = run_3dva(tmp_path / "up.zarr", sim / "mask.mrc", params, cluster)
        down = run_3dva(tmp_path / "down.zarr", sim / "mask.mrc", params, cluster)
    finally:
        cluster.close()
    assert (up.data_sign, down.data_sign) == (1.0, -1.0)
    truth = np.load(sim / "truth" / "truth.npz")["mean"]
    assert np.corrcoef(down.mean.ravel(), truth.ravel())[0, 1] > 0.9
    np.testing.assert_allclose(down.mean, up.mean, atol=1e-4 * np.abs(up.mean).max())


def test_progress_is_plain_lines_off_a_terminal(tmp_path):
    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=200, seed=8)
    args = ["run", str(sim / "particles.star"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    r = runner.invoke(app, [*args, "--modes", "1", "--iterations", "2", "--out", str(tmp_path / "r"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(line.startswith("dask dashboard: http") for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("EM iteration")] == [
        "EM iteration 1/2",
        "EM iteration 2/2",
    ]
    assert "importing: 200/200" in lines and "━" not in r.output


def test_workers_short_of_memory_for_the_sums_are_told_before_any_pass(tmp_path, monkeypatch):
    """Box 256 with 10 modes: a task's M-step sums over the half spectrum (75 float64 channels of
    256²·128 voxels, 5.0 GB) beside the worker's held ones (2.6 GB) do not fit under a 4 GB memory
    limit. The run stops at once with one line (the worker was restarted 5 times, then the run
    failed, advising --resume), before it imports the particles it was given as a .star."""
    import re

    from dva.io import store

    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=40, box=256, seed=1, truth=False)
    args = ["run", str(sim / "particles.star"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    args += ["--modes", "10", "--memory-limit", "4GB", "--workers", "1", "--out", str(tmp_path / "o"), "--quiet"]
    monkeypatch.setattr(store, "import_particles", lambda *a, **k: pytest.fail("imported before the check"))
    r = runner.invoke(app, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    found = re.search(
        r"box 256 needs ([0-9.]+) GB per worker for the M-step's sums of 10 modes, and worker \S+ has ([0-9.]+) GB "
        r"left under its memory limit: .* fewer --modes$",
        lines[0],
    )
    assert found, lines[0]
    need, left = map(float, found.groups())
    assert 8 * 75 * 256 * 256 * 128 / 1e9 < need < 8 * 75 * 256 * 256 * 256 / 1e9 and left < 4.0


@pytest.mark.parametrize(
    ("option", "value"), [("--band-tolerance", "1"), ("--band-tolerance", "-0.1"), ("--lambda", "0")]
)
def test_parameters_out_of_range_are_refused(tmp_path, option, value):
    """A band tolerance outside [0, 1), or no M-step regularisation (the per-voxel solves need it)."""
    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=20, seed=1)
    args = ["run", str(sim / "particles.star"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    r = runner.invoke(app, [*args, option, value, "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert f"{option} {float(value)}" in lines[0]
