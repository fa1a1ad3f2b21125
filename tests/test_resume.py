"""Checkpoints after every iteration; `dva run --resume` after Ctrl-C or SIGTERM ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from dva.cli import app
from dva.engine.checkpoint import load_checkpoint
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset

runner = CliRunner()
ITERATIONS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A store of 1,200 tiny particles, the run arguments and an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("resume")
    sim = simulate_dataset(tmp / "sim", "tiny", particles=1200, seed=6)
    import_particles(read_star(sim / "particles.star"), tmp / "s.zarr", chunk_size=150)
    args = ["run", str(tmp / "s.zarr"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12", "--modes", "2"]
    args += ["--iterations", str(ITERATIONS), "--workers", "2", "--quiet"]
    r = runner.invoke(app, [*args, "--out", str(tmp / "whole")])
    assert r.exit_code == 0, r.output
    return tmp, args


def outputs(folder):
    z = xr.open_zarr(folder / "dva_coordinates.zarr", consolidated=False)["z"].values
    return z, json.loads((folder / "job.json").read_text())


def interrupt(args, out, sig, group: bool):
    """Start `dva run` as its own process (group), send `sig` once two iterations are saved, and
    return its exit code, its stderr and the iterations done when the signal was sent."""
    command = [sys.executable, "-m", "dva", *args, "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "run.log"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\niteration ") >= 2:
            break
        time.sleep(0.05)
    sent_after = log.read_text().count("\niteration ")
    (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, sent_after


@pytest.mark.parametrize(
    ("sig", "group", "code", "cause"), [(signal.SIGINT, True, 130, "Ctrl-C"), (signal.SIGTERM, False, 143, "signal 15")]
)
def test_a_stopped_run_resumes_to_the_same_result(dataset, tmp_path, sig, group, code, cause):
    tmp, args = dataset
    out = tmp_path / "stopped"
    returncode, err, sent_after = interrupt(args, out, sig, group)
    assert sent_after < ITERATIONS
    assert returncode == code, err
    assert "Traceback" not in err and " ERROR " not in err, err  # teardown logs are silenced on a stop
    last = err.strip().splitlines()[-1]
    saved = load_checkpoint(out / "checkpoint").iteration
    assert sent_after <= saved < ITERATIONS
    assert last == (
        f"dva run: stopped ({cause}); iterations 1–{saved} of {ITERATIONS} are saved in {out / 'checkpoint'}: "
        "run the same command with --resume to continue"
    )
    assert not (out / "job.json").exists()
    r = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    z, job = outputs(out)
    z0, _ = outputs(tmp / "whole")
    np.testing.assert_allclose(z, z0, rtol=0, atol=1e-5 * np.abs(z0).max())
    assert [m["iteration"] for m in job["iterations"]] == list(range(1, ITERATIONS + 1))
    assert job["resumed_at_iteration"] == saved


def test_the_checkpoint_holds_the_last_iteration(dataset):
    tmp, _ = dataset
    saved = load_checkpoint(tmp / "whole" / "checkpoint")
    z, _ = outputs(tmp / "whole")
    assert saved.iteration == ITERATIONS
    assert saved.coordinates.shape == (1200, 3)  # z_0, z_1 and the scale α of the last E-step
    assert saved.components.shape == (2, 32, 32, 32)
    assert [m["iteration"] for m in saved.metrics] == list(range(1, ITERATIONS + 1))
    # The last E-step's coordinates span the final ones (which are rotated onto principal axes).
    fit = np.linalg.lstsq(np.c_[saved.coordinates[:, :2], np.ones(1200)], z, rcond=None)[1]
    assert (fit / (len(z) * z.var(axis=0))).max() < 0.05


def test_resume_refuses_other_parameters_or_no_checkpoint(dataset, tmp_path):
    tmp, args = dataset
    other = [a if a != "12" else "15" for a in args]
    r = runner.invoke(app, [*other, "--out", str(tmp / "whole"), "--resume"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "filter_res_A = 12.0, not 15.0" in r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "new"), "--resume"])
    assert r.exit_code == 2 and "no checkpoint to resume from" in r.output, r.output
