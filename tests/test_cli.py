from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from dva.cli import app
from dva.io.store import open_store

runner = CliRunner()


def test_simulate_import_info(tmp_path):
    sim = tmp_path / "sim"
    r = runner.invoke(app, ["simulate", "--preset", "tiny", "--particles", "200", "--out", str(sim), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("particles.star", "particles.mrcs", "particles.cs", "mask.mrc", "truth/truth.npz", "truth/mean.mrc"):
        assert (sim / name).is_file(), name
    r = runner.invoke(app, ["import", str(sim / "particles.cs"), "--out", str(tmp_path / "s.zarr"), "--box", "24"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(tmp_path / "s.zarr")])
    assert r.exit_code == 0
    assert "200 images of 24x24 px" in r.stdout and "Fourier-cropped from box 32" in r.stdout
    images, _, attrs = open_store(tmp_path / "s.zarr")
    assert attrs["box"] == 24 and np.isfinite(images[:]).all()


def test_info_on_something_else(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_demo(tmp_path):
    r = runner.invoke(app, ["demo", "--preset", "tiny", "--out", str(tmp_path / "d"), "--quiet", "--iterations", "5"])
    assert r.exit_code == 0, r.output
    assert "600 images of 32x32 px" in r.stdout
    assert "subspace capture of the" in r.stdout and "Spearman(z0, latent)" in r.stdout
    for name in ("dva_map.mrc", "dva_component_0.mrc", "dva_particles.cs", "dva_particles.star", "job.json"):
        assert (tmp_path / "d" / "run" / name).is_file(), name


def test_quiet_means_no_progress(tmp_path):
    r = runner.invoke(app, ["simulate", "--preset", "tiny", "--particles", "50", "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0 and "simulating" not in r.output
