"""`dva run --scheduler` against a cluster started by hand: `dask scheduler` and two `dask worker`s."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from dva.cli import app
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset

runner = CliRunner()


@pytest.fixture
def scheduler_address(tmp_path):
    """A loopback scheduler on a random port and two single-thread workers; all stopped afterwards."""
    info = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "dask"]
    procs = [
        subprocess.Popen(
            [
                *dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(info),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.time() + 60
        while not info.exists() and time.time() < deadline:
            time.sleep(0.2)
        worker = [*dask, "worker", "--scheduler-file", str(info), "--nthreads", "1", "--no-dashboard"]
        procs += [subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        from distributed import Client

        address = json.loads(info.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_external_cluster_gives_the_embedded_result(tmp_path, scheduler_address):
    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=400, seed=4)
    import_particles(read_star(sim / "particles.star"), tmp_path / "s.zarr", chunk_size=100)
    common = ["run", str(tmp_path / "s.zarr"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    common += ["--modes", "2", "--iterations", "4", "--quiet"]
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "ext"), "--scheduler", scheduler_address])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "emb"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    ext = xr.open_zarr(tmp_path / "ext" / "dva_coordinates.zarr", consolidated=False)["z"].values
    emb = xr.open_zarr(tmp_path / "emb" / "dva_coordinates.zarr", consolidated=False)["z"].values
    for k in range(2):
        assert np.corrcoef(ext[:, k], emb[:, k])[0, 1] >= 0.9999
