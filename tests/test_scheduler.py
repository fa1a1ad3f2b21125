"""`dva run --scheduler` on clusters started with dask's own tools: plain, with TLS, losing a
worker in the middle of an iteration; and the check that every worker can read the store."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster
from typer.testing import CliRunner

from dva.cli import app
from dva.engine.placement import place_chunks
from dva.errors import DvaInputError
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset
from tests.external import client_for, cluster_logs, external_cluster, make_certificates

runner = CliRunner()
MODES = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A store of 1,600 tiny particles in 16 chunks, its mask, and the embedded cluster's run of it."""
    tmp = tmp_path_factory.mktemp("scheduler")
    sim = simulate_dataset(tmp / "sim", "tiny", particles=1600, seed=4)
    import_particles(read_star(sim / "particles.star"), tmp / "s.zarr", chunk_size=100)
    args = ["run", str(tmp / "s.zarr"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    args += ["--modes", str(MODES), "--iterations", "6", "--quiet"]
    r = runner.invoke(app, [*args, "--out", str(tmp / "embedded"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    return tmp, args


def coordinates(folder):
    return xr.open_zarr(folder / "dva_coordinates.zarr", consolidated=False)["z"].values


def assert_same_result(a, b):
    za, zb = coordinates(a), coordinates(b)
    for k in range(MODES):
        assert np.corrcoef(za[:, k], zb[:, k])[0, 1] >= 0.9999


def test_external_cluster_gives_the_embedded_result(dataset, tmp_path):
    tmp, args = dataset
    with external_cluster(tmp_path) as address:
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "ext"), "--scheduler", address])
    assert r.exit_code == 0, r.output
    assert_same_result(tmp_path / "ext", tmp / "embedded")


def test_tls_cluster_gives_the_embedded_result(dataset, tmp_path):
    tmp, args = dataset
    tls = make_certificates(tmp_path)
    security = [a for option, path in tls.items() for a in (option, str(path))]
    with external_cluster(tmp_path, tls=tls) as address:
        assert address.startswith("tls://")
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "plain"), "--scheduler", address])
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output  # no certificate: one line
        assert "cannot connect" in r.output
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "tls"), "--scheduler", address, *security])
    assert r.exit_code == 0, r.output
    assert_same_result(tmp_path / "tls", tmp / "embedded")


@pytest.mark.parametrize(("workers", "killed"), [(3, 1), (2, 2)], ids=["one-of-three", "every-worker"])
def test_a_killed_worker_does_not_change_the_result(dataset, tmp_path, workers, killed):
    """Worker processes killed by pid mid-run (their nannies start new ones at new addresses):
    dask recomputes what was lost, and a pass whose every worker is gone is dealt out again."""
    tmp, args = dataset
    out = tmp_path / "killed"
    with external_cluster(tmp_path, workers=workers) as address:
        with client_for(address) as client:
            pids = client.run(os.getpid)
        command = [sys.executable, "-m", "dva", *args, "--out", str(out), "--scheduler", address]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = out / "run.log"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().count("\niteration ") >= 2:
                break
            time.sleep(0.05)
        done_before = log.read_text().count("\niteration ")
        for victim in sorted(pids.values())[:killed]:
            os.kill(victim, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            state = scheduler_state(address)
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(
                f"the run did not finish after a worker was killed:\n{output}\n{state}\n"
                f"--- run.log\n{log.read_text()}\n{cluster_logs(tmp_path)}"
            )
    assert 2 <= done_before < 6  # killed in the middle of the run
    assert proc.returncode == 0, output
    assert_same_result(out, tmp / "embedded")


def scheduler_state(address: str) -> str:
    """The scheduler's workers and its unfinished tasks (state, restrictions, where processing)."""

    def dump(dask_scheduler) -> str:
        lines = [f"workers: {sorted(dask_scheduler.workers)}"]
        for key, ts in dask_scheduler.tasks.items():
            if ts.state not in ("memory", "released", "forgotten"):
                on = ts.processing_on.address if ts.processing_on else None
                lines.append(f"{key} {ts.state} on={on} restrict={sorted(ts.worker_restrictions or ())}")
        return "\n".join(lines[:80])

    with client_for(address) as client:
        return client.run_on_scheduler(dump)


def test_a_worker_that_cannot_read_the_store_is_named(dataset, tmp_path):
    from distributed import Client, LocalCluster

    tmp, _ = dataset
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as client:
        missing = str(tmp_path / "elsewhere.zarr")  # as a store on a disk the workers do not mount
        with pytest.raises(DvaInputError, match=r"elsewhere\.zarr: worker tcp://.* cannot open the store"):
            place_chunks(client, missing, 100, 100, 32, "numpy")
        placement = place_chunks(client, str(tmp / "s.zarr"), 1600, 100, 32, "numpy")
        assert [b - a for a, b in placement.ranges] == [100] * 16
        placement.release(client)


def _malloc_settings() -> tuple[str | None, ...]:
    return tuple(os.environ.get(f"MALLOC_{name}") for name in ("MMAP_THRESHOLD_", "TRIM_THRESHOLD_", "ARENA_MAX"))


class _LocalClusterAsCuda(LocalCluster):
    """dask-cuda's LocalCUDACluster as `connect` starts it, on a machine without GPUs (dask-cuda
    26.10's is a LocalCluster of nannies that start their workers in its constructor, so they get
    the same environment; a change in dask-cuda itself is not caught here)."""

    def __init__(self, CUDA_VISIBLE_DEVICES=None, **kwargs):  # (dask-cuda's argument, unused here)
        super().__init__(n_workers=1, **kwargs)


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("memory_limit", [None, "2GB"])
def test_embedded_workers_keep_large_temporaries_off_mmap(memory_limit, gpu, monkeypatch):
    """Large temporaries come from the heap (mmapped ones cost a page fault per page, every batch);
    under a memory limit the heap's top is trimmed as dask has it, else it is kept; GPU workers'
    threads share one malloc arena (their reads, below)."""
    import types

    from dva.engine import cluster as cluster_module
    from dva.engine.cluster import MMAP_THRESHOLD, TRIM_UNDER_LIMIT, connect

    if gpu:
        monkeypatch.setattr(cluster_module, "gpu_count", lambda: 1)
        monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=_LocalClusterAsCuda))
    cluster = connect(workers=1, gpus=None if gpu else "none", memory_limit=memory_limit)
    try:
        assert cluster.backend == ("cupy" if gpu else "numpy")
        (started,) = cluster.client.run(_malloc_settings).values()
        cluster.client.restart()  # as the nanny restarts a worker that passed its memory limit
        (restarted,) = cluster.client.run(_malloc_settings).values()
    finally:
        cluster.close()
    trim = TRIM_UNDER_LIMIT if memory_limit else MMAP_THRESHOLD
    assert started == restarted == (str(MMAP_THRESHOLD), str(trim), "1" if gpu else "0")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity to set here")
def test_embedded_cpu_workers_are_the_cores_this_process_may_run_on():
    """One worker per core of the process's affinity (a SLURM allocation, a container's quota), not
    per core of the machine."""
    from dva.engine.cluster import connect

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        cluster = connect(gpus="none")
        try:
            assert len(cluster.client.ncores()) == 1
        finally:
            cluster.close()
    finally:
        os.sched_setaffinity(0, cores)


_THREADED_READS = """
import ctypes, resource, sys
from concurrent.futures import ThreadPoolExecutor

assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE: count 4 kB pages wherever THP is "always"

def read():
    with open(sys.argv[1], "rb") as f:
        return len(f.read())

pool = ThreadPoolExecutor(1)  # as a worker's read-ahead thread
pool.submit(read).result()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    pool.submit(read).result()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_gpu_workers_reads_in_threads_reuse_their_memory(tmp_path):
    """A store read of more than 64 MB (a whole shard) in a read-ahead thread: with GPU workers'
    malloc settings the memory of one read is reused by the next (no page faults after the first),
    with CPU workers' each read is mmapped afresh (a fault per 4 kB page, every read)."""
    from dva.engine.cluster import _worker_heap

    shard = tmp_path / "shard"
    shard.write_bytes(np.random.default_rng(0).bytes(80 << 20))
    pages = 3 * (80 << 20) // 4096
    faults = {}
    for gpu in (True, False):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | _worker_heap(None, gpu)
        done = subprocess.run(
            [sys.executable, "-c", _THREADED_READS, str(shard)], env=env, capture_output=True, text=True, check=True
        )
        faults[gpu] = int(done.stdout)
    assert faults[True] < 0.02 * pages < pages <= faults[False], faults


@pytest.mark.parametrize(
    ("gpus", "first"), [(None, 0), ("", 0), ("2", 2), ("1,3", 1), (" 3 , 0", 3), ("GPU-8f2e", None)]
)
def test_the_driver_works_on_the_first_of_the_gpus_given(gpus, first, numpy_as_cupy, monkeypatch):
    """`--gpus 1,3` puts the driver's work on GPU 1 (not on GPU 0, which may be someone else's); on
    NumPy when it cannot tell which GPU that is (a UUID), or when the workers work on NumPy."""
    from dva.engine.cluster import Cluster, first_gpu
    from dva.engine.loop import driver_module
    from tests.device import _Device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert first_gpu(gpus) == first
    _Device.used.clear()
    driver = driver_module(Cluster(client=None, backend="cupy", local=None, driver_gpu=first_gpu(gpus)))
    assert driver is (np if first is None else numpy_as_cupy)
    assert _Device.used == ([] if first is None else [first])
    assert driver_module(Cluster(client=None, backend="numpy", local=None)) is np
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")  # this process sees the machine's GPUs 1 and 3 only
    assert (first_gpu("3"), first_gpu("1,3"), first_gpu("2")) == (1, 0, None)
