"""The floor model's counts against a brute-force count, and its arithmetic."""

from __future__ import annotations

import numpy as np

from dva.em.estep import pair_index
from dva.engine.floor import H100, Ceilings, floor_seconds, iteration_work, measure_cpu_ceilings


def test_work_counts_match_a_brute_force_count():
    box, k, n = 16, 3, 10
    # Band: rfft half-plane pixels with |k| ≤ box//2 − 1 (in pixels of frequency), counted one by one.
    pixels = sum(
        1
        for ky in range(box)
        for kx in range(box // 2 + 1)
        if ((ky if ky < box // 2 else ky - box) ** 2 + kx**2) <= (box // 2 - 1) ** 2
    )
    work = iteration_work(n, box, k)
    assert work.band_pixels == pixels
    channels = len(pair_index(k)) + 2 * k  # G (a ≤ b) and b (re, im), as the E-step inserts them
    assert channels == 12
    assert work.scatter_adds == n * pixels * 8 * channels
    assert work.gathers == n * pixels * 8 * (k + 1) * 2
    assert work.bytes_resident == n * pixels * (8 + 4)
    assert work.bytes_stored == n * box * box * 4


def test_floor_is_the_slowest_part():
    work = iteration_work(100_000, 128, 3)
    floor = floor_seconds(work, H100)
    assert floor["floor_s"] == max(floor["memory_s"], floor["gather_s"], floor["scatter_s"])
    assert np.isclose(floor["scatter_s"], work.scatter_adds / 72e9)
    slow_read = Ceilings("slow link", 1000.0, 100.0, 100.0, read_GBps=0.1)
    assert np.isclose(floor_seconds(work, slow_read)["floor_s"], work.scatter_adds / 100e9)  # on the device: no reads
    all_on_host = floor_seconds(work, slow_read, host=work.particles)["floor_s"]
    assert np.isclose(all_on_host, work.bytes_resident / 0.1e9)  # prepared chunks
    all_streamed = floor_seconds(work, slow_read, streamed=work.particles)["floor_s"]
    assert np.isclose(all_streamed, work.bytes_stored / 0.1e9)  # stored images
    # a run with a quarter of its particles in host memory and a quarter streamed: each at its own bytes
    mixed = floor_seconds(work, slow_read, work.particles // 4, work.particles // 4)["read_s"]
    assert np.isclose(mixed, (work.bytes_resident + work.bytes_stored) / 4 / 0.1e9)


def test_cpu_ceilings_are_measured_per_worker():
    one, two = measure_cpu_ceilings(1, repeats=1), measure_cpu_ceilings(2, repeats=1)
    for c in (one, two):
        assert 0 < c.scatter_Gps < 100 and 0 < c.gather_Gps < 100 and 0 < c.memory_GBps < 1000
    assert two.device.startswith("2 CPU")


def test_bench_reports_a_floor_below_the_measured_time():
    import json

    from typer.testing import CliRunner

    from dva.cli import app

    r = CliRunner().invoke(
        app,
        ["bench", "--particles", "600", "--box", "32", "--modes", "2", "--iterations", "2", "--workers", "1", "--json"],
    )
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.strip().splitlines()  # the JSON line alone on stdout; progress on stderr, as it goes
    found = json.loads(line)
    assert "ready in" in r.stderr
    for i, seconds in enumerate(found["iteration_s"], 1):
        assert f"iteration {i}: {seconds:.2f} s" in r.stderr
    floor = found["floor"]
    assert floor["work"]["particles"] == 600 and floor["ceilings"]["device"].startswith("1 CPU")
    assert floor["measured_s"] == found["median_iteration_s"]
    assert floor["measured_over_floor"] > 1  # nothing runs faster than its primitives allow
    phases = found["phases_s"]
    assert all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= max(found["iteration_s"])  # parts of an iteration, none counted twice
    assert found["mean_pass_s"] + sum(found["iteration_s"]) < found["run_s"]  # and the final pass
    assert found["cluster_start_s"] > 0
    tasks = found["task_s"]  # the workers' share: each chunk read once, then a task per chunk and pass
    chunks = tasks["load_chunk"]["tasks"]
    assert tasks["mean_partial"]["tasks"] == chunks and tasks["em_partial"]["tasks"] == 2 * chunks
    assert 0 < tasks["em_partial"]["compute_s"] <= sum(found["iteration_s"])  # one worker: within the passes


def test_bench_data_is_made_once_and_reused(tmp_path):
    """`dva bench --data`: the dataset is made in the folder (its stack deleted once imported),
    reused for the same size (the store not written again) and made again for another."""
    import zarr

    from dva.engine.bench import dataset

    said = []
    sim, store = dataset(tmp_path, 300, 32, None, said.append)
    marker = store / "zarr.json"
    first = marker.stat().st_mtime_ns
    assert not (sim / "particles.mrcs").exists() and (sim / "mask.mrc").exists()
    assert dataset(tmp_path, 300, 32, None, said.append) == (sim, store) and marker.stat().st_mtime_ns == first
    assert len(said) == 1 and said[0].startswith("simulated in ") and "(0.00 GB of images)" in said[0]
    assert not (sim / "truth").exists()  # a benchmark needs no true volumes
    dataset(tmp_path, 200, 32, None)
    assert zarr.open_group(store, mode="r")["images"].shape == (200, 32, 32)  # the 200-particle store replaced it
