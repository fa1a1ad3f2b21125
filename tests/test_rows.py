"""A worker's table reads (`dva.io.rows`): decoded table chunks kept through a run, forgotten
between runs. References: zarr's own reads of the same rows."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from dva.engine.cluster import connect
from dva.engine.placement import place_chunks
from dva.engine.tasks import read_chunk
from dva.io.rows import forget_rows, read_rows
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset

NAMES = ("rotation", "defocus_u_A")


def _table(path, seed: int, n: int = 1000, chunk: int = 128):
    root = zarr.open_group(path, mode="w", zarr_format=3)
    table = root.create_group("particles")
    rng = np.random.default_rng(seed)
    table.create_array("rotation", data=rng.normal(size=(n, 3, 3)), chunks=(chunk, 3, 3))
    table.create_array("defocus_u_A", data=rng.uniform(5000, 30000, n), chunks=(chunk,))
    return zarr.open_group(path, mode="r")


def test_rows_are_zarrs_in_any_order_and_are_copies(tmp_path):
    root = _table(tmp_path / "s.zarr", 0)
    store = str(tmp_path / "s.zarr")
    forget_rows()
    ranges = [(0, 100), (100, 300), (250, 260), (999, 1000), (0, 1000), (127, 129), (500, 500), (3, 900)]
    ranges += [tuple(sorted(np.random.default_rng(1).choice(1001, 2, replace=False))) for _ in range(20)]
    for a, b in ranges:
        got = read_rows(root, store, NAMES, a, b)
        for name in NAMES:
            np.testing.assert_array_equal(got[name], root["particles"][name][a:b], err_msg=f"{name} {a}:{b}")
        got["rotation"][...] = 0  # the caller's own
    np.testing.assert_array_equal(read_rows(root, store, NAMES, 0, 1000)["rotation"], root["particles"]["rotation"][:])
    forget_rows()


def test_forgotten_rows_are_read_again(tmp_path):
    store = str(tmp_path / "s.zarr")
    forget_rows()
    first = read_rows(_table(store, 0), store, NAMES, 10, 20)
    second = _table(store, 1)  # another table at the same path
    forget_rows()
    got = read_rows(second, store, NAMES, 10, 20)
    np.testing.assert_array_equal(got["defocus_u_A"], second["particles"]["defocus_u_A"][10:20])
    assert not np.array_equal(got["defocus_u_A"], first["defocus_u_A"])
    forget_rows()


@pytest.fixture(scope="module")
def cluster():
    c = connect(workers=1, gpus="none")
    yield c
    c.close()


def test_a_run_reads_the_table_now_at_its_path_though_the_last_run_never_ended(tmp_path, cluster):
    """A driver that died leaves its workers' decoded rows; the next run's placement forgets them
    (also when it is given both memory budgets and measures none)."""
    store, client = tmp_path / "s.zarr", cluster.client
    placements = []
    try:
        for seed in (4, 5):
            sim = simulate_dataset(tmp_path / f"sim{seed}", "tiny", particles=200, seed=seed)
            shutil.rmtree(store, ignore_errors=True)
            import_particles(read_star(sim / "particles.star"), store, chunk_size=100)
            box = zarr.open_group(store, mode="r")["images"].shape[-1]
            placement = place_chunks(client, str(store), 200, 100, box, "numpy", resident_bytes=0, host_bytes=0)
            placements.append(placement)
            reads = client.gather(
                [
                    client.submit(read_chunk, source, pure=False, workers=[worker])
                    for source, worker in zip(placement.chunks, placement.workers, strict=True)
                ]
            )
            want = zarr.open_group(store, mode="r")["particles"]["rotation"][:]
            np.testing.assert_array_equal(np.concatenate([r.rows["rotation"] for r in reads]), want)
    finally:
        for placement in placements:
            placement.release(client)
