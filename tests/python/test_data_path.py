"""Large results stay in the executor that made them until something else reads them,
then live in shared memory: copied once, read in place by consumers on the same worker and
after a network fetch, freed when released."""

import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rankmesh

MIB = 1 << 20


def make(i):
    return np.full(1_000_000, float(i))


def backing_objects(*arrays):
    """What each array's memory ultimately belongs to, and whether it is writable."""
    found = []
    for array in arrays:
        owner = array
        while getattr(owner, "base", None) is not None:
            owner = owner.base
        if isinstance(owner, memoryview):
            owner = owner.obj
        found.append((type(owner).__name__, bool(array.flags.writeable)))
    return found


def shm_files(worker_pids, base="/dev/shm"):
    """Files holding objects (released segments a worker keeps for reuse wait in its
    `free/` folder; the executors' sockets and crash reports live beside the objects)."""
    files = [f for pid in worker_pids for f in glob.glob(f"{base}/rankmesh-{pid}-*/*")]
    name = os.path.basename
    return [f for f in files if not (name(f) == "free" or name(f).endswith((".sock", ".fault")))]


def test_large_inputs_are_mapped_not_copied_and_freed_on_release():
    from conftest import cluster_workers

    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        workers = cluster_workers(cluster)
        worker_pids = [p.pid for p in workers]
        parts = client.map(make, range(6))
        # Six 8 MB inputs spread over both workers: some arrive from the other one. Each is
        # read in place: the array the executor made and kept (one executor per worker),
        # or, made on the other worker, the copy this executor made of it straight from the
        # other's memory (its frames, bytearrays), which it keeps too.
        backing = client.submit(backing_objects, *parts).result(timeout=60)
        assert set(backing) <= {("ndarray", True), ("bytearray", True)}, backing
        assert ("bytearray", True) in backing, "one made on the other worker"
        assert shm_files(worker_pids) == [], "nothing crossed through shared memory"
        gathered = client.gather(parts)  # copied out of the executors that keep them
        np.testing.assert_array_equal(gathered[3], np.full(1_000_000, 3.0))
        assert gathered[0].flags.writeable
        assert len(shm_files(worker_pids)) >= 6
        del parts
        client.submit(len, "flush releases").result(timeout=60)
        deadline = time.monotonic() + 10
        while shm_files(worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm_files(worker_pids) == []
    for worker in workers:
        assert not glob.glob(f"/dev/shm/rankmesh-{worker.pid}-*"), "shared-memory folder left"
        # Not /proc/<pid>: CI's concurrent builds start processes fast enough to reuse a
        # pid; psutil compares the start time too.
        assert not worker.is_running()


def test_a_dropped_future_frees_its_result_with_no_further_call_from_the_client():
    from conftest import cluster_workers

    with rankmesh.LocalCluster(n_workers=1) as cluster, rankmesh.Client(cluster) as client:
        worker_pids = [p.pid for p in cluster_workers(cluster)]
        made = client.submit(make, 1)
        np.testing.assert_array_equal(made.result(timeout=60), np.full(1_000_000, 1.0))
        assert len(shm_files(worker_pids)) == 1, "copied out to be sent"
        del made  # and nothing more asked of the client: a notebook's user reading
        deadline = time.monotonic() + 10
        while shm_files(worker_pids):
            assert time.monotonic() < deadline, "still held"
            time.sleep(0.05)


def test_results_only_their_own_executor_reads_are_never_written():
    from conftest import cluster_workers

    with rankmesh.LocalCluster(n_workers=1) as cluster, rankmesh.Client(cluster) as client:
        worker_pids = [p.pid for p in cluster_workers(cluster)]
        made = client.submit(make, 1)
        doubled = client.submit(np.multiply, made, 2.0)
        total = client.submit(np.sum, doubled)
        assert total.result(timeout=60) == 2_000_000.0
        # Two 8 MB results, each read only by the executor that made and kept it.
        assert shm_files(worker_pids) == []
        np.testing.assert_array_equal(doubled.result(timeout=60), np.full(1_000_000, 2.0))
        assert len(shm_files(worker_pids)) == 1, "copied out for the client, once"
        np.testing.assert_array_equal(doubled.result(timeout=60), np.full(1_000_000, 2.0))
        assert len(shm_files(worker_pids)) == 1
        # Read after it was copied out, it is read from the copy.
        assert client.submit(backing_objects, doubled).result(timeout=60) == [("MappedView", True)]
        assert client.submit(backing_objects, made).result(timeout=60) == [("ndarray", True)]


def executor_pid(_input):
    return os.getpid()


def test_a_worker_of_two_executors_runs_tasks_where_their_inputs_are_kept():
    import dask.array as da
    from conftest import cluster_workers

    with (
        rankmesh.LocalCluster(n_workers=1, threads_per_worker=2) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        worker_pids = [p.pid for p in cluster_workers(cluster)]
        made = client.submit(make, 1)
        doubled = client.submit(np.multiply, made, 2.0)
        total = client.submit(np.sum, doubled)
        assert total.result(timeout=60) == 2_000_000.0
        assert shm_files(worker_pids) == [], "each step ran where its input was kept"
        # Results kept by both executors, joined by one: the other's are copied out for it.
        parts = [client.submit(make, i) for i in range(8)]
        ran_on = client.gather([client.submit(executor_pid, part) for part in parts])
        assert len(set(ran_on)) == 2, "the parts' readers ran on both executors"
        joined = client.submit(np.concatenate, parts)
        np.testing.assert_array_equal(
            joined.result(timeout=60), np.concatenate([make(i) for i in range(8)])
        )
        copies = len(shm_files(worker_pids))
        assert 1 <= copies <= 9, f"{copies} files: some parts copied out, once each"
        # A rechunk across both executors equals the threaded scheduler's.
        cube = da.random.default_rng(0).standard_normal((60, 90, 90), chunks=(5, 90, 90))
        std = cube.rechunk((60, 30, 30)).std(axis=0)
        np.testing.assert_allclose(client.compute(std, sync=True), std.compute(scheduler="threads"))


def huge_page_bytes() -> int:
    """Bytes of tmpfs files on huge pages, on the whole machine."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["ShmemHugePages"].split()[0]) * 1024


def test_results_live_under_the_shared_memory_base_given_and_on_its_huge_pages(monkeypatch):
    import dask.array as da
    from conftest import cluster_workers, tmpfs

    # As a site may mount /dev/shm: files of a tmpfs mounted huge=within_size get 2 MiB
    # pages where they are long enough, which readers map in one fault each. (Not in
    # tmp_path: executors' sockets in it would need longer paths than sockets take.)
    with (
        tempfile.TemporaryDirectory(prefix="rankmesh-test-") as folder,
        tmpfs(Path(folder) / "huge", "size=1g,mode=1777,huge=within_size") as base,
    ):
        monkeypatch.setenv("RANKMESH_SHM_BASE", str(base))
        with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
            workers = cluster_workers(cluster)
            worker_pids = [p.pid for p in workers]
            for pid in worker_pids:
                assert len(glob.glob(f"{base}/rankmesh-{pid}-*")) == 1
                assert not glob.glob(f"/dev/shm/rankmesh-{pid}-*")
            before = huge_page_bytes()
            parts = client.map(make, range(6))
            gathered = client.gather(parts)  # each copied out into a file of 8 MB
            np.testing.assert_array_equal(gathered[5], np.full(1_000_000, 5.0))
            assert len(shm_files(worker_pids, base)) >= 6
            # Written whole 2 MiB pages at a time: each file's length is set first (a file
            # that grows with each write gets small pages).
            assert huge_page_bytes() - before >= 6 * 6 * MIB
            cube = da.random.default_rng(1).standard_normal((60, 90, 90), chunks=(5, 90, 90))
            std = cube.rechunk((60, 30, 30)).std(axis=0)
            expected = std.compute(scheduler="threads")
            np.testing.assert_allclose(client.compute(std, sync=True), expected)
        for worker in workers:
            assert not worker.is_running()
            assert not glob.glob(f"{base}/rankmesh-{worker.pid}-*"), "folder left behind"


def test_a_shared_memory_base_too_long_for_sockets_stops_the_cluster_with_why(
    tmp_path, monkeypatch, capfd
):
    long = tmp_path / ("a-site-folder-" * 4)
    long.mkdir()
    monkeypatch.setenv("RANKMESH_SHM_BASE", str(long))
    with pytest.raises(RuntimeError, match="while starting"):
        rankmesh.LocalCluster(n_workers=1)
    assert "too long a path for the sockets made in it" in capfd.readouterr().err


_kept = []


def keep(x):
    _kept.append(x)  # a task that holds on to its input after it returns
    return float(x[0])


def first_kept():
    return float(_kept[0][0]), float(_kept[0].sum())


def test_a_received_input_a_task_still_holds_is_not_overwritten_by_the_next_transfer(client):
    a, b = client.workers()
    n = 1_000_000
    first = client.submit(np.full, n, 1.0, workers=[a])
    held = client.submit(keep, first, workers=[b])
    assert held.result(timeout=60) == 1.0
    del first, held  # released: worker b drops its copy, the task's reference stays
    # The same size again, into worker b, where a released segment could be reused.
    second = client.submit(np.full, n, 2.0, workers=[a])
    assert client.submit(lambda x: float(x.sum()), second, workers=[b]).result(60) == 2.0 * n
    assert client.submit(first_kept, workers=[b]).result(timeout=60) == (1.0, float(n))
