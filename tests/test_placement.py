"""Which chunks stay resident and which are streamed; a store named by an fsspec URL."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from dva.em.chunk import chunk_bytes_per_particle, make_band
from dva.engine.cluster import connect
from dva.engine.loop import RunParams, run_3dva
from dva.engine.placement import MIN_TASK, deal_tasks
from dva.engine.tasks import READ_AHEAD, mean_partial
from dva.errors import DvaInputError
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.sim.simulate import simulate_dataset


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(
    ("n", "chunk", "workers", "busy_workers"),
    [(1000, 300, 2, 2), (20000, 16384, 2, 2), (20000, 8192, 2, 2), (1003, 100, 3, 3), (100, 7, 4, 1)],
)  # 100 particles: one task's worth
def test_tasks_cover_the_particles_once_within_store_chunks_evenly_dealt(n, chunk, workers, busy_workers, aligned):
    ranges, owners = deal_tasks(n, chunk, workers, aligned)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(b - a <= chunk for a, b in ranges)
    if aligned:
        assert all(a // chunk == (b - 1) // chunk for a, b in ranges)  # no task spans two zarr chunks
    else:  # each worker's tasks as equal as the chunk size lets them be
        for w in range(workers):
            sizes = [b - a for (a, b), o in zip(ranges, owners, strict=True) if o == w]
            assert not sizes or max(sizes) - min(sizes) <= 1
    per_worker = np.bincount(owners, weights=[b - a for a, b in ranges], minlength=workers)
    busy = per_worker[per_worker > 0]
    assert busy.max() - busy.min() <= 2  # the same number of particles, up to rounding
    assert len(busy) == busy_workers
    if n >= 2 * workers * MIN_TASK:
        assert min(np.bincount(owners, minlength=workers)) >= 2  # at least two tasks each


def test_tasks_are_o_chunks():
    assert len(deal_tasks(100_000, 100, 2)[0]) == 1000  # one task per small chunk


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    sim = simulate_dataset(tmp / "sim", "tiny", particles=600, seed=3)
    import_particles(read_star(sim / "particles.star"), tmp / "s.zarr", chunk_size=100)
    return tmp / "s.zarr", sim / "mask.mrc"


@pytest.fixture(scope="module")
def cluster():
    c = connect(workers=2, gpus="none")
    yield c
    c.close()


PARAMS = RunParams(filter_res_A=12.0, modes=2, iterations=3)


def test_streamed_and_partly_resident_runs_equal_the_resident_run(store, cluster):
    path, mask = store
    resident = run_3dva(path, mask, PARAMS, cluster)
    assert resident.resident_particles == 600
    streamed = run_3dva(path, mask, PARAMS, cluster, resident_bytes=0)
    assert streamed.resident_particles == 0
    two_chunks = 2 * 100 * chunk_bytes_per_particle(make_band(32))
    partly = run_3dva(path, mask, PARAMS, cluster, resident_bytes=two_chunks)
    assert partly.resident_particles == 300  # two of the four tasks of 75 particles per worker
    for other in (streamed, partly):  # the same float64 sums, added on each worker in its own order
        np.testing.assert_allclose(
            other.components, resident.components, rtol=0, atol=1e-6 * abs(resident.components).max()
        )
        np.testing.assert_allclose(other.z, resident.z, rtol=0, atol=1e-6 * abs(resident.z).max())


@pytest.fixture(params=["stand-in", pytest.param("cupy", marks=pytest.mark.gpu)])
def gpu_cluster(request):
    """Workers and driver on CuPy, and how close their job must come to the NumPy job's: through the
    CuPy stand-in on two in-process workers (`tests.device`: the CUDA source compiled for the CPU,
    host arrays refused where CuPy would refuse them), to float64 rounding; on a CUDA device, a
    LocalCUDACluster, within 1e-4 (issue 7)."""
    from distributed import Client, LocalCluster

    from dva.engine.cluster import Cluster

    if request.param == "cupy":
        from tests.conftest import _cupy_or_skip

        _cupy_or_skip()
        cluster, tolerance = connect(), 1e-4
        assert cluster.backend == "cupy"
    else:
        request.getfixturevalue("numpy_as_cupy")
        local = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
        cluster, tolerance = Cluster(client=Client(local), backend="cupy", local=local, driver_gpu=0), 1e-6
    yield cluster, tolerance
    cluster.close()


def test_the_job_on_the_gpu_backend_equals_the_numpy_job(store, cluster, gpu_cluster, monkeypatch):
    """The whole job on the GPU backend, its chunks kept in device memory, kept in host memory
    (copied over by each task) and streamed from the store, equals the NumPy job."""
    import gc
    import time

    from dva.engine.placement import _memory_budget
    from tests import device

    monkeypatch.setenv("DVA_GPU_TASK_MB", "0.001")  # tasks of one shard, as on CPU workers: all three tiers
    path, mask = store
    want = run_3dva(path, mask, PARAMS, cluster)
    on_gpu, tolerance = gpu_cluster
    device._RawKernelOnCpu.launched.clear()
    device._MemoryPool.live_at_free.clear()
    gc.collect()
    before = device.live_device_bytes()
    device.reset_peak()
    one_chunk = 100 * chunk_bytes_per_particle(make_band(32))
    got = run_3dva(path, mask, PARAMS, on_gpu, resident_bytes=2 * one_chunk, host_bytes=one_chunk)
    at_end = device._MemoryPool.live_at_free[-4:]  # the workers' frees when the run released its chunks
    assert 0 < got.host_particles < got.resident_particles < 600
    for on_device, on_host, _ in on_gpu.client.run(_memory_budget, "cupy").values():  # what workers keep by default
        assert on_device > 0 and on_host > 0
    if tolerance < 1e-4:  # the stand-in: two workers, each 4 tasks of 75 particles (2 on the device, 1 on the host)
        assert (got.resident_particles, got.host_particles) == (450, 150)
        assert device._Device.used[-1] == 0  # the driver's work on its "GPU" too
        assert set(device._RawKernelOnCpu.launched) == {"slice_stencil", "insert_float64", "estep_sums", "estep_insert"}
        # The workers freed CuPy's pools at the end once they had let go of the kept chunks (1.35 MB
        # on the device; the last model, 0.4 MB, may still be there), not as soon as the cancel returned.
        assert len(at_end) == 4 and max(at_end) - before < 2 * one_chunk
        # Nothing left on the "device" once the run is over (its chunks, sums and models released;
        # the workers' cached band remains: 50 kB, in-process workers share it), though it held
        # megabytes meanwhile.
        assert device.peak_device_bytes() - before > 2 * one_chunk
        left = 2 * sum(a.nbytes for a in vars(make_band(32)).values() if isinstance(a, np.ndarray)) + 16_000
        deadline = time.monotonic() + 10
        while device.live_device_bytes() - before > left and time.monotonic() < deadline:
            time.sleep(0.1)
            gc.collect()
        assert device.live_device_bytes() - before <= left
    for name in ("mean", "components", "z", "alpha"):
        value, expected = getattr(got, name), getattr(want, name)
        assert isinstance(value, np.ndarray)
        np.testing.assert_allclose(value, expected, rtol=0, atol=tolerance * abs(expected).max(), err_msg=name)


def test_gpu_workers_keep_what_the_placement_says_where_it_says(store, gpu_cluster):
    """The chunks a GPU worker keeps are device arrays, or host arrays in a `HostChunk` where the
    placement put them in host memory; and a run's end frees CuPy's cached memory."""
    from distributed import Future

    from dva.engine.placement import place_chunks
    from dva.engine.tasks import HostChunk
    from tests.device import _MemoryPool

    on_gpu, tolerance = gpu_cluster
    one_chunk = 100 * chunk_bytes_per_particle(make_band(32))
    placement = place_chunks(
        on_gpu.client, str(store[0]), 600, 100, 32, "cupy", 2 * one_chunk, aligned=False, host_bytes=one_chunk
    )
    kept = [i for i, s in enumerate(placement.sources) if isinstance(s, Future)]
    held = on_gpu.client.gather([placement.sources[i] for i in kept])
    assert [isinstance(h, HostChunk) for h in held] == [placement.on_host[i] for i in kept]
    assert 0 < placement.host < placement.resident < 600
    for h in held:
        arrays = h.chunk.arrays if isinstance(h, HostChunk) else h.arrays
        assert all(isinstance(a, np.ndarray) == isinstance(h, HostChunk) for a in arrays)
    _MemoryPool.live_at_free.clear()
    placement.release(on_gpu.client)
    if tolerance < 1e-4:  # the stand-in: each worker freed CuPy's device and pinned pools
        assert len(_MemoryPool.live_at_free) == 2 * len(on_gpu.client.ncores())


def test_subset_reconstructions_on_the_gpu_backend_equal_numpys(store, cluster, gpu_cluster):
    """The display job's reconstructions of weighted particle subsets (`reconstruct_subsets`) on the
    GPU backend equal those of NumPy workers."""
    from dva.engine.reconstruct import reconstruct_subsets

    on_gpu, tolerance = gpu_cluster
    weights = np.random.default_rng(4).random((600, 3))
    want = reconstruct_subsets(store[0], weights, 32, "input", 1.0, cluster)
    got = reconstruct_subsets(store[0], weights, 32, "input", 1.0, on_gpu)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * abs(want).max())


def test_subsets_are_reconstructed_in_as_many_passes_as_memory_needs(store, cluster, monkeypatch):
    """Subsets per pass: `MAX_GROUPS` with memory to spare or none known, as many as 3/4 of the
    spare memory holds the sums of, at least one; split over passes, the same volumes."""
    from dva.em.chunk import band_rows, sums_bytes
    from dva.engine import reconstruct

    one = 8 * 3 * (256 * 256 * 128 + len(band_rows(256)))  # float64 (re, im, den): the accumulator and held rows
    assert sums_bytes(256, 3) == one
    assert [reconstruct.subsets_per_pass(s, one) for s in (None, 10**13, 0, one, 4 * one)] == [32, 32, 1, 1, 3]
    weights = np.random.default_rng(5).random((600, 5))
    whole = reconstruct.reconstruct_subsets(store[0], weights, 32, "input", 1.0, cluster)
    monkeypatch.setattr(reconstruct, "subsets_per_pass", lambda spare, subset_bytes: 2)
    split = reconstruct.reconstruct_subsets(store[0], weights, 32, "input", 1.0, cluster)
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6 * np.abs(whole).max())  # float32 volumes


def test_a_worker_short_of_memory_for_a_pass_s_sums_is_named(store, cluster, gpu_cluster):
    """Before any chunk is read: one line naming the worker, what it has left (under its memory
    limit, or free on its GPU), and what to change."""
    from dva.engine.placement import place_chunks

    on_gpu, _ = gpu_cluster
    sums = (10**15, "the test's sums", "a smaller sum")
    for c, said in (
        (cluster, r"left under its memory limit: give each worker more memory .* or use a smaller sum$"),
        (on_gpu, r"free on its GPU: use a smaller sum \(or GPUs with more memory\)$"),
    ):
        with pytest.raises(
            DvaInputError,
            match=r"a pass at box 32 needs 1000000\.0 GB per worker for the test's sums, "
            r"and worker \S+ has [0-9.]+ GB " + said,
        ):
            place_chunks(c.client, str(store[0]), 600, 100, 32, c.backend, sums=sums)
        assert sum(c.client.run(_chunks_held).values()) == 0


def test_cpu_workers_keep_no_chunks_in_a_host_tier(store, cluster):
    """A host tier is for GPU workers (whose tasks run in device memory); CPU workers' host memory
    is where their tasks run, so what does not fit there is streamed."""
    from dva.engine.placement import place_chunks

    placement = place_chunks(cluster.client, str(store[0]), 600, 100, 32, "numpy", 0, host_bytes=10**12)
    assert placement.resident == placement.host == 0
    placement.release(cluster.client)


def test_a_store_url_reads_through_fsspec(store, cluster):
    path, mask = store
    by_path = run_3dva(path, mask, PARAMS, cluster)
    by_url = run_3dva(f"file://{path}", mask, PARAMS, cluster)
    np.testing.assert_array_equal(by_url.z, by_path.z)


def test_a_pass_longer_than_the_stall_check_finishes(store, cluster, monkeypatch):
    """`settle` checks on a running pass every STALL_CHECK_S: a slow pass is waited for, not
    mistaken for a stuck one (its workers are all there)."""
    from dva.engine import placement as placement_module

    monkeypatch.setattr(placement_module, "STALL_CHECK_S", 0.05)
    placement = placement_module.place_chunks(cluster.client, str(store[0]), 600, 100, 32, "numpy", 0)
    found = placement.map(cluster.client, _slow_count, 0.3, total=False)
    assert found == [b - a for a, b in placement.ranges]


def test_tasks_are_pinned_where_their_chunks_are(store, cluster):
    """Each worker holds the chunks of its equal share of particles, and `locate` keeps every task
    on the worker holding its chunk (`who_has` answers in its own order, not the tasks': pinning by
    position dealt 7,200 of 20,000 particles to the wrong worker, each pass 1.6x its share)."""
    from distributed import wait

    from dva.engine.placement import place_chunks

    client = cluster.client
    placement = place_chunks(client, str(store[0]), 600, 50, 32, "numpy")
    wait(placement.sources)
    placement.locate(client)
    holders = client.who_has(placement.sources)
    assert len(placement.sources) == 12
    assert all(list(holders[s.key]) == [w] for s, w in zip(placement.sources, placement.workers, strict=True))
    shares = {
        w: sum(b - a for (a, b), o in zip(placement.ranges, placement.workers, strict=True) if o == w)
        for w in set(placement.workers)
    }
    assert sorted(shares.values()) == [300, 300]
    placement.release(client)


def _slow_count(source, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return source.stop - source.start


def _volume_and_count(source) -> dict:
    """A stand-in task: a volume-sized sum that `held` keeps on the worker, and a small one."""
    return {"G": np.full((4, 3), float(source.start)), "particles": source.stop - source.start}


def test_volume_sums_are_added_on_the_workers_and_each_task_counted_once(store, cluster):
    from dva.engine import placement as placement_module
    from dva.engine.tasks import held

    client = cluster.client
    placement = placement_module.place_chunks(client, str(store[0]), 600, 100, 32, "numpy", 0)
    total = placement.map(client, _volume_and_count)
    np.testing.assert_array_equal(total["G"], np.full((4, 3), float(sum(a for a, _ in placement.ranges))))
    assert total["particles"] == 600
    # A pass whose workers' sums miss a task, or hold one twice, is not taken.
    tasks = len(placement.ranges)
    for ran in (range(tasks - 1), [*range(tasks), 0]):
        key = f"check-{len(ran)}"
        client.gather([client.submit(held, _volume_and_count, key, i, placement.sources[i], pure=False) for i in ran])
        assert placement_module._collect(client, key, tasks) is None


def test_a_task_finishing_after_its_pass_was_collected_adds_nothing():
    from dva.engine.tasks import collect_held, held

    for i in (0, 1):
        held(lambda: {"G": np.ones(3), "particles": 1}, "late", i)
    collected = collect_held("late")
    assert collected["tasks"] == [0, 1]
    np.testing.assert_array_equal(collected["G"], 2 * np.ones(3))
    out = held(lambda: {"G": np.ones(3), "particles": 1}, "late", 2)
    assert collect_held("late") == {"tasks": []} and out["particles"] == 1


def test_a_model_goes_to_the_device_once_and_is_forgotten_with_it():
    """Every task of a pass gets the worker's one scattered model: its arrays are copied to the
    device for the first and reused by the rest, and forgotten when the model is."""
    import gc

    from dva.em.model import Model
    from dva.engine import tasks

    def model(value: float) -> Model:
        return Model(np.full((6, 2), value, np.complex64), np.ones(3), 1e-3, "optimal")

    before = set(tasks._DEVICE_MODELS)  # of models other tests still hold
    first, second = model(1.0), model(2.0)
    on_device = tasks._on_device(first, "numpy")
    assert tasks._on_device(first, "numpy") is on_device
    assert tasks._on_device(second, "numpy").volumes[0, 0] == 2.0
    np.testing.assert_array_equal(on_device.volumes, first.volumes)
    del first, on_device
    gc.collect()
    assert set(tasks._DEVICE_MODELS) - before == {(id(second), "numpy")}
    del second
    gc.collect()
    assert set(tasks._DEVICE_MODELS) == before


def test_each_worker_reads_its_next_streamed_chunk_ahead(store, cluster):
    """Streamed tasks name the range their worker streams next, in the order it runs them, and the
    last names the first (read ahead for the next pass); resident tasks name none."""
    from distributed import Future

    from dva.engine import placement as placement_module

    three_tasks = 3 * 75 * chunk_bytes_per_particle(make_band(32))
    placement = placement_module.place_chunks(
        cluster.client, str(store[0]), 600, 100, 32, "numpy", three_tasks, aligned=False
    )
    for worker in set(placement.workers):
        mine = [i for i, w in enumerate(placement.workers) if w == worker]
        streamed = [i for i in mine if not isinstance(placement.sources[i], Future)]
        assert len(mine) == 4 and len(streamed) == 1  # four tasks of 75 particles, three resident
        only = placement.sources[streamed[0]]
        assert only.following == ((only.start, only.stop),)  # one streamed chunk: itself, for the next pass
    placement.release(cluster.client)
    streamed = placement_module.place_chunks(cluster.client, str(store[0]), 600, 100, 32, "numpy", 0)
    assert max(READ_AHEAD.values()) == 3
    for worker in set(streamed.workers):
        mine = [
            (s.start, s.stop, s.following)
            for s, w in zip(streamed.sources, streamed.workers, strict=True)
            if w == worker
        ]
        assert len(mine) == 4  # (0, 100) (100, 150) (150, 200) (200, 300) and the same from 300
        a, b, c, d = ((start, stop) for start, stop, _ in mine)
        assert [following for _, _, following in mine] == [(b, c, d), (c, d, a), (d, a, b), (a, b, c)]


def test_a_chunk_read_ahead_is_the_chunk_read_now_and_is_read_once(store, monkeypatch):
    from dva.engine import tasks

    reads = []
    read = tasks.read_chunk
    monkeypatch.setattr(tasks, "read_chunk", lambda source: reads.append(source.start) or read(source))
    first = tasks.ChunkSource(str(store[0]), 0, 100, 32, "numpy", following=((300, 400),))
    second = tasks.ChunkSource(str(store[0]), 300, 400, 32, "numpy", following=((0, 100),))
    tasks._resolve(first)
    chunk = tasks._resolve(second)  # taken from the read ahead
    ahead = [source.start for source in tasks._AHEAD]
    tasks.drop_read_ahead()  # (its read may not have started yet: cancelled then)
    assert reads.count(300) == 1 and reads.count(0) >= 1  # `second` was read once, ahead, not again
    assert ahead == [0]  # and (0, 100) is read ahead in its place
    direct = tasks.load_chunk(tasks.ChunkSource(str(store[0]), 300, 400, 32, "numpy"))
    for name in ("y", "ctf", "rotation", "scale"):
        np.testing.assert_array_equal(getattr(chunk, name), getattr(direct, name))


def test_following_names_each_workers_next_selected_ranges():
    from dva.engine.placement import following

    ranges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    workers = ["a", "b", "a", "a", "a"]
    selected = [True, True, True, False, True]  # task 3 not (resident among streamed, or the reverse)
    assert max(READ_AHEAD.values()) == 3
    assert following(ranges, workers, selected, cyclic=False) == {0: ((2, 3), (4, 5)), 2: ((4, 5),), 4: (), 1: ()}
    assert following(ranges, workers, selected, cyclic=True) == {
        0: ((2, 3), (4, 5), (0, 1)),
        2: ((4, 5), (0, 1), (2, 3)),
        4: ((0, 1), (2, 3), (4, 5)),
        1: ((1, 2),),
    }


def test_loading_resident_chunks_reads_the_next_ones_ahead(store, monkeypatch):
    """A worker's loads name its next resident ranges: each is read once, the later ones by the
    read-ahead thread while the one before is prepared."""
    import threading

    from dva.engine import tasks

    tasks.drop_read_ahead()
    reads = []
    read = tasks.read_chunk
    monkeypatch.setattr(
        tasks,
        "read_chunk",
        lambda source: reads.append((source.start, threading.current_thread().name)) or read(source),
    )
    path = str(store[0])
    first = tasks.load_chunk(tasks.ChunkSource(path, 0, 100, 32, "numpy", following=((300, 400),)))
    second = tasks.load_chunk(tasks.ChunkSource(path, 300, 400, 32, "numpy"))
    threads = dict(reads)  # (the read ahead may start before the read now)
    assert len(reads) == 2 and sorted(threads) == [0, 300]  # each once
    assert not threads[0].startswith("dva-read-ahead") and threads[300].startswith("dva-read-ahead")
    assert not tasks._AHEAD
    for chunk, start in ((first, 0), (second, 300)):
        direct = tasks._prepare(
            tasks.ChunkSource(path, start, start + 100, 32, "numpy"),
            read(tasks.ChunkSource(path, start, start + 100, 32, "numpy")),
        )
        np.testing.assert_array_equal(chunk.y, direct.y)


def test_several_chunks_are_read_ahead_each_once_a_pass(store, monkeypatch):
    """Two ranges ahead: each task's chunk comes from the reads ahead (read once), the ones after it
    are read meanwhile, and the last task reads the first two ahead for the next pass."""
    from dva.engine import tasks

    tasks.drop_read_ahead()
    monkeypatch.setitem(tasks.READ_AHEAD, "numpy", 2)
    reads = []
    read = tasks.read_chunk
    monkeypatch.setattr(tasks, "read_chunk", lambda source: reads.append(source.start) or read(source))
    ranges = [(0, 100), (100, 200), (300, 400)]
    sources = [
        tasks.ChunkSource(str(store[0]), a, b, 32, "numpy", following=(ranges[(n + 1) % 3], ranges[(n + 2) % 3]))
        for n, (a, b) in enumerate(ranges)
    ]
    chunks = [tasks._resolve(source) for source in sources]
    for pending in list(tasks._AHEAD.values()):
        pending.result()  # the next pass's reads ahead, done
    ahead = sorted(source.start for source in tasks._AHEAD)
    tasks.drop_read_ahead()
    assert ahead == [0, 100]
    assert sorted(reads) == [0, 0, 100, 100, 300]  # this pass: each once (0 now, the others ahead)
    for source, chunk in zip(sources, chunks, strict=True):
        direct = tasks.load_chunk(replace(source, following=()))
        np.testing.assert_array_equal(chunk.y, direct.y)


def test_a_read_ahead_that_no_task_takes_gives_its_buffer_back(store, monkeypatch):
    """When a worker's order changes (a worker lost, its tasks dealt again) the next task wants other
    chunks ahead: one already read is dropped, and its buffer serves the next reads."""
    from dva.engine import tasks
    from dva.engine.buffers import BufferPool

    made = []

    class Counted(BufferPool):
        def take(self, nbytes, pinned):
            buffer = super().take(nbytes, pinned)
            made.append(id(buffer))
            return buffer

    monkeypatch.setattr(tasks, "_BUFFERS", Counted(keep=4))
    tasks.drop_read_ahead()
    path = str(store[0])
    for start, ahead in ((0, 100), (300, 400)):  # 100:200 read ahead, then not wanted: 400:500 instead
        read = tasks.read_ahead(
            tasks.ChunkSource(path, start, start + 100, 32, "numpy", following=((ahead, ahead + 100),))
        )
        tasks._BUFFERS.give(read.buffer, False)
        next(iter(tasks._AHEAD.values())).result()
    # 4 reads into at most 2 buffers (1 when each read ahead started after the read beside it had
    # given its buffer back); a dropped read's buffer kept from the pool makes a third
    assert len(made) == 4 and len(set(made)) <= 2
    tasks.drop_read_ahead()


def test_reads_reuse_a_buffer_and_each_chunk_keeps_its_own_data(store, xp):
    """A read's buffer (page-locked for GPU workers) is given back once its chunk is prepared, and
    the next read fills it again; chunks prepared from it in turn each equal their images read
    directly from the store and prepared with NumPy."""
    import zarr

    from dva.em.chunk import make_band, prepare_chunk
    from dva.engine import tasks
    from tests.conftest import to_host

    backend = "numpy" if xp is np else "cupy"
    tasks.forget_run(backend)  # no reads ahead, and no free buffers left by other tests to be taken instead
    sources = [tasks.ChunkSource(str(store[0]), a, a + 100, 32, backend) for a in (0, 300, 100)]
    reads = [tasks.read_chunk(sources[0])]
    chunks = [tasks._prepare(sources[0], reads[0])]
    for source in sources[1:]:
        reads.append(tasks.read_chunk(source))
        assert reads[-1].buffer is reads[0].buffer  # the same memory, read into again
        chunks.append(tasks._prepare(source, reads[-1]))
    images = zarr.open_group(str(store[0]), mode="r")["images"]
    for source, read, chunk in zip(sources, reads, chunks, strict=True):
        direct = prepare_chunk(images[source.start : source.stop], read.rows, make_band(32), read.original_box)
        for name in ("y", "ctf", "rotation", "scale"):
            want = getattr(direct, name)
            np.testing.assert_allclose(to_host(getattr(chunk, name)), want, rtol=0, atol=1e-5 * abs(want).max())
            if xp is np:
                np.testing.assert_array_equal(getattr(chunk, name), want)
    np.testing.assert_array_equal(reads[-1].images, images[100:200])  # what the buffer holds last
    tasks.forget_run(backend)


_STARTS: list[int] = []  # a worker's record of the tasks it ran, in order


def _record(source) -> dict:
    """A pass's task that only notes which particles it was given."""
    _STARTS.append(source.start)
    return {}


def _recorded() -> tuple[list[int], int]:
    """This worker's record (emptied) and how many of its reads ahead no task has taken."""
    from dva.engine import tasks

    starts = list(_STARTS)
    _STARTS.clear()
    return starts, len(tasks._AHEAD)


def test_workers_run_their_tasks_in_the_placements_order(store, cluster):
    """Which their reads ahead follow: each task is submitted with its place in the order as its
    priority (tasks submitted at once share the scheduler's, and a worker ran them in the order of
    their keys; its reads ahead of the next chunks were then not taken, and read again)."""
    from distributed import Future, wait

    from dva.engine.placement import place_chunks

    client = cluster.client
    kept = place_chunks(client, str(store[0]), 600, 50, 32, "numpy")  # every chunk loaded and kept
    wait([s for s in kept.sources if isinstance(s, Future)])
    assert all(pending == 0 for _, pending in client.run(_recorded).values())  # each read ahead taken
    kept.release(client)
    streamed = place_chunks(client, str(store[0]), 600, 50, 32, "numpy", resident_bytes=0, host_bytes=0)
    wait(streamed.submit(client, _record))
    for worker, (starts, _) in client.run(_recorded).items():
        assert starts == [a for (a, _), w in zip(streamed.ranges, streamed.workers, strict=True) if w == worker]
    streamed.release(client)


def _free_buffers() -> int:
    from dva.engine import tasks

    return len(tasks._BUFFERS._free)


def test_workers_that_stream_nothing_free_their_read_buffers_and_the_others_keep_them(store, cluster):
    from distributed import wait

    from dva.engine import placement as placement_module

    client = cluster.client
    for resident_bytes, kept in ((None, False), (0, True)):  # all chunks resident, all streamed
        placement = placement_module.place_chunks(client, str(store[0]), 600, 100, 32, "numpy", resident_bytes)
        outs = placement.submit(client, mean_partial, 32, "none", "numpy")
        wait(outs)
        assert all(n >= 1 for n in client.run(_free_buffers).values())  # the reads' buffers, given back
        placement.trim(client)
        assert all((n >= 1) == kept for n in client.run(_free_buffers).values())
        placement.release(client)
        assert set(client.run(_free_buffers).values()) == {0}  # the end of a run


def test_the_buffer_pool_gives_the_smallest_fitting_free_buffer_and_keeps_a_few():
    from dva.engine.buffers import BufferPool

    pool = BufferPool(keep=2)
    small, large = pool.take(100, pinned=False), pool.take(1000, pinned=False)
    assert small.nbytes == 100 and large.nbytes == 1000
    pool.give(large, pinned=False)
    pool.give(small, pinned=False)
    assert pool.take(50, pinned=False) is small and pool.take(50, pinned=False) is large
    assert pool.take(2000, pinned=False).nbytes == 2000  # none large enough: a new one
    tiny = pool.take(10, pinned=False)
    for b in (small, large, tiny):
        pool.give(b, pinned=False)
    assert pool.take(1, pinned=False) is small and pool.take(1, pinned=False) is large  # the largest two kept
    pool.give(small, pinned=True)  # another kind of memory: not given for unpinned reads
    assert pool.take(1, pinned=False) is not small
    pool.give(large, pinned=False)
    late = pool.take(5, pinned=False)  # taken before the run ends (a read ahead still reading)
    assert late is large
    pool.clear()  # the end of a run
    assert pool.take(1, pinned=False) is not large
    pool.give(late, pinned=False)  # given back after it: not kept until the next run
    assert pool.take(1, pinned=False) is not late and not pool._free


def test_a_store_written_without_shards_runs_with_tasks_inside_its_chunks(store, cluster, tmp_path):
    """Stores written before shards read a chunk whole for any part of it: their tasks keep within
    chunks, and the run equals the sharded store's (tasks cut elsewhere: float64 sums in another order)."""
    import shutil

    import zarr

    from dva.io.store import open_store, task_limits

    path, mask = store
    unsharded = tmp_path / "unsharded.zarr"
    shutil.copytree(path, unsharded)
    root = zarr.open_group(unsharded, mode="r+")
    images = root["images"][:]
    del root["images"]
    rewritten = root.create_array(
        "images", shape=images.shape, chunks=(150, 32, 32), dtype="float32", compressors=None,
        dimension_names=("particle", "y", "x"),
    )  # fmt: skip
    rewritten[:] = images
    assert task_limits(open_store(unsharded)[0]) == (150, True)
    assert task_limits(open_store(path)[0]) == (100, False)
    old = run_3dva(unsharded, mask, PARAMS, cluster)
    new = run_3dva(path, mask, PARAMS, cluster)
    np.testing.assert_allclose(old.components, new.components, rtol=0, atol=1e-6 * abs(new.components).max())
    np.testing.assert_allclose(old.z, new.z, rtol=0, atol=1e-6 * abs(new.z).max())


def _chunks_held(dask_worker) -> int:
    from dva.em.chunk import Chunk

    return sum(isinstance(value, Chunk) for value in dask_worker.data.values())


def test_a_failed_run_lets_go_of_the_chunks_it_kept(store, cluster):
    """A run that fails part way (here its progress callback) still releases the chunks its workers
    kept, though the error's traceback still refers to the run's placement."""
    path, mask = store

    def fail(metric: dict) -> None:
        assert sum(cluster.client.run(_chunks_held).values()) > 0  # kept while the run goes on
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):  # (its traceback, kept, holds the run's frames)
        run_3dva(path, mask, PARAMS, cluster, progress=fail)
    assert sum(cluster.client.run(_chunks_held).values()) == 0


def test_failed_subset_reconstructions_let_go_of_the_chunks_they_kept(store, cluster, monkeypatch):
    from dva.engine import reconstruct

    def fail(*args):
        raise RuntimeError("stopped")

    monkeypatch.setattr(reconstruct, "mean_volume", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        reconstruct.reconstruct_subsets(store[0], np.ones((600, 2)), 32, "input", 1.0, cluster)
    assert sum(cluster.client.run(_chunks_held).values()) == 0


def _volume_or_failure(source, failing: int) -> dict:
    """`_volume_and_count`, but the task of particles from `failing` fails (after the others)."""
    import time

    if source.start == failing:
        time.sleep(0.5)
        raise ValueError("a task failed")
    return _volume_and_count(source)


def _passes_held() -> int:
    from dva.engine import tasks

    return len(tasks._HELD)


def test_a_pass_that_fails_leaves_no_sums_on_the_workers(store, cluster):
    """A task's error (or an interrupt) ends the run mid-pass: the sums the pass's finished tasks
    added up on their workers go with it (volume-sized device arrays on GPU workers)."""
    from dva.engine.placement import place_chunks

    client = cluster.client
    placement = place_chunks(client, str(store[0]), 600, 100, 32, "numpy", 0)
    with pytest.raises(ValueError, match="a task failed"):
        placement.map(client, _volume_or_failure, 300)
    assert sum(client.run(_passes_held).values()) == 0
    placement.release(client)
