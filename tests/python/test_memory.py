"""Work larger than memory: a worker holds its memory limit by spilling results to its
local directory, pausing and resuming; results equal Dask's threaded scheduler; a full
disk is a clear error, not a crash."""

import contextlib
import gc
import glob
import os
import threading
import time

import dask.array as da
import numpy as np
import psutil
import pytest
import rankmesh
from conftest import cluster_processes, cluster_workers, tmpfs

MIB = 1 << 20


def pss_outside_shm(pid: int) -> int:
    """Proportional set size without shared memory (counted from the files instead):
    private pages, and a share of mapped files (libraries, spilled results mapped back)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_File:")):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def shm_bytes(worker_pid: int) -> int:
    """Memory in a worker's shared-memory folder, its files mapped by anyone or no one."""
    total = 0
    for path in glob.glob(f"/dev/shm/rankmesh-{worker_pid}-*/*"):
        try:
            total += os.stat(path).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


class WorkerMemoryWatch:
    """Samples each worker's memory every 50 ms: the PSS of the worker and its executors,
    with the files in its shared-memory folder in place of what they map of them (results
    there take memory whether a process maps them or not)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.peak = 0
        # What made up the peak, MiB: ("worker"/"executor", pid) -> PSS, and "shm".
        self.peak_parts: dict[object, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = psutil.Process(self.cluster.pid)
        while not self._stop.is_set():
            for worker in root.children():
                try:
                    pids = [worker.pid] + [p.pid for p in worker.children()]
                except psutil.NoSuchProcess:
                    continue
                parts = {
                    ("worker" if pid == worker.pid else "executor", pid): pss_outside_shm(pid)
                    for pid in pids
                }
                parts["shm"] = shm_bytes(worker.pid)
                memory = sum(parts.values())
                if memory > self.peak:
                    self.peak = memory
                    self.peak_parts = {part: b // MIB for part, b in parts.items()}
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cube(n=14_480, chunk=2_896):
    """1.5 GiB of float64 in 64 MiB chunks."""
    return da.random.RandomState(0).random((n, n), chunks=chunk)


# Two workers of one executor, and one of two executors (which keep results and copy them
# out for each other) with the same memory per executor.
@pytest.mark.parametrize(
    "n_workers, threads_per_worker, limit_mib", [(2, 1, 300), (1, 2, 600)], ids=["2x1", "1x2"]
)
def test_an_array_five_times_the_cluster_memory_persists_and_computes_within_the_limit(
    tmp_path, n_workers, threads_per_worker, limit_mib
):
    limit = limit_mib * MIB
    x = cube()
    expected_sum = x.sum().compute(scheduler="threads")
    expected_mean = (x + x.T).mean().compute(scheduler="threads")
    spilling = {"memory_limit": f"{limit_mib}MiB", "local_directory": tmp_path}
    shape = {"n_workers": n_workers, "threads_per_worker": threads_per_worker}
    with (
        rankmesh.LocalCluster(**shape, **spilling) as cluster,
        rankmesh.Client(cluster) as client,
        WorkerMemoryWatch(cluster) as watch,
    ):
        persisted = client.persist(x)
        rankmesh.wait(persisted)
        info = client.scheduler_info()["workers"]
        assert sum(w["spilled_bytes"] for w in info.values()) > 0, info
        spill_folders = glob.glob(str(tmp_path / "rankmesh-spill-*"))
        assert len(spill_folders) == n_workers, spill_folders
        assert client.compute(persisted.sum(), sync=True) == pytest.approx(expected_sum)
        mean = client.compute((persisted + persisted.T).mean(), sync=True)
        assert mean == pytest.approx(expected_mean)
        info = client.scheduler_info()["workers"]
        assert sum(w["unspilled_total"] for w in info.values()) > 0, info
        del persisted
    print(f"peak worker PSS {watch.peak / MIB:.0f} MiB of a {limit / MIB:.0f} MiB limit")
    print(f"made of (MiB): {watch.peak_parts}")
    # Without spilling each worker would hold at least 768 MiB (2.56x). A (x + x.T) task
    # alone maps two 64 MiB inputs and makes a third: the worker starts it only once the
    # rest of its results are on disk and no input is on its way, and fetches an input
    # only when there is room for it (docs/memory.md).
    assert watch.peak <= 1.15 * limit, f"{watch.peak / MIB:.0f} MiB: {watch.peak_parts}"
    assert glob.glob(str(tmp_path / "rankmesh-spill-*")) == [], "spill folders removed"


def test_persisted_ones_hold_their_distinct_values_not_512_mb():
    """A chunk of `da.ones` is a scalar broadcast to the chunk's shape: stored as that
    (as `distributed` ships it), not written out whole (256 MB on each worker before)."""
    ones = da.ones((8000, 8000), chunks=2000)
    with (
        rankmesh.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB") as cluster,
        rankmesh.Client(cluster) as client,
    ):
        persisted = client.persist(ones)
        rankmesh.wait(persisted)
        deadline = time.monotonic() + 10
        while not all(w["process_bytes"] for w in client.scheduler_info()["workers"].values()):
            assert time.monotonic() < deadline, "no memory report from the workers"
            time.sleep(0.1)
        info = client.scheduler_info()["workers"]
        assert sum(w["managed_bytes"] for w in info.values()) < MIB, info
        assert client.compute(persisted.sum(), sync=True) == 8000 * 8000
        doubled = client.compute((persisted * 2)[::3, 1::2], sync=True)
        np.testing.assert_array_equal(doubled, (ones * 2)[::3, 1::2].compute(scheduler="threads"))


def test_a_worker_killed_leaves_no_spill_folder_for_long(tmp_path):
    """A worker killed outright cannot clean up: the next worker there sweeps its folder."""
    spilling = {"memory_limit": "200MiB", "local_directory": tmp_path}
    with (
        rankmesh.LocalCluster(n_workers=1, **spilling) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        x = client.persist(da.ones((4_096, 4_096), chunks=1_024) + 0)  # 128 MiB: some spill
        rankmesh.wait(x)
        (worker,) = cluster_workers(cluster)
        folder = glob.glob(str(tmp_path / f"rankmesh-spill-{worker.pid}-*"))
        assert folder, os.listdir(tmp_path)
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 30
        while os.path.exists(folder[0]):  # the replacement swept it
            assert time.monotonic() < deadline, os.listdir(tmp_path)
            time.sleep(0.1)
        assert float(client.compute(x.sum(), sync=True)) == 4_096 * 4_096


def sum_when_told(marker: str, array) -> float:
    """Holds its input until `marker` exists."""
    while not os.path.exists(marker):
        time.sleep(0.01)
    return float(array.sum())


def files_in_two_spill_folders(local) -> list[set[str]]:
    """Spill files that are one file in two workers' spill folders (a hard link)."""
    folders_of: dict[int, set[str]] = {}
    for path in glob.glob(f"{local}/rankmesh-spill-*/*"):
        with contextlib.suppress(FileNotFoundError):
            folders_of.setdefault(os.stat(path).st_ino, set()).add(os.path.dirname(path))
    return [folders for folders in folders_of.values() if len(folders) == 2]


def test_a_result_spilled_by_one_worker_is_linked_by_another_on_its_node(tmp_path):
    """A peer on the node takes a spilled result by a hard link to its file: no bytes over
    a socket into its memory, no second write to disk."""
    local, marker = tmp_path / "local", tmp_path / "go"
    local.mkdir()
    spilling = {"memory_limit": "300MiB", "local_directory": local}
    with (
        rankmesh.LocalCluster(n_workers=2, threads_per_worker=1, **spilling) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        a, b = client.scheduler_info()["workers"]
        # Five 48 MiB results on a, over its target (180 MiB): the least recently used, the
        # first, go to disk first.
        parts = []
        for i in range(5):
            parts.append(client.submit(np.full, 6 * MIB, float(i + 1), workers=[a]))
            rankmesh.wait(parts[-1])
        deadline = time.monotonic() + 30
        while client.scheduler_info()["workers"][a]["spilled_bytes"] < 48 * MIB:
            assert time.monotonic() < deadline, client.scheduler_info()["workers"][a]
            time.sleep(0.05)
        total = client.submit(sum_when_told, str(marker), parts[0], workers=[b])
        while not files_in_two_spill_folders(local):
            assert time.monotonic() < deadline, glob.glob(f"{local}/*/*")
            time.sleep(0.05)
        marker.touch()
        assert total.result(timeout=60) == np.full(6 * MIB, 1.0).sum()
        assert client.scheduler_info()["workers"][b]["spilled_total"] == 0
        del total, parts
        client.scheduler_info()  # the releases go out with the client's next call
        # Released: b's link goes with its copy, a's file with the result.
        deadline = time.monotonic() + 30
        while glob.glob(f"{local}/*/*"):
            assert time.monotonic() < deadline, glob.glob(f"{local}/*/*")
            time.sleep(0.05)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs: spilling into it runs out of room."""
    with tmpfs(tmp_path / "tiny", "size=16m,mode=0700") as mount:
        yield mount


def test_a_full_local_directory_is_a_clear_task_error_and_no_crash(tiny_disk):
    spilling = {"memory_limit": "200MiB", "local_directory": tiny_disk}
    with (
        rankmesh.LocalCluster(n_workers=1, **spilling) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        pids = {p.pid for p in cluster_processes(cluster)}
        # 512 MiB in 8 MiB chunks (`+ 0`: `da.ones` alone is a broadcast scalar, stored as one)
        big = client.persist(da.ones((8_192, 8_192), chunks=1_024) + 0)
        with pytest.raises(Exception, match="No space left on device"):
            big.sum().compute()
        # Nothing crashed, and once the data is let go the worker computes again.
        assert pids == {p.pid for p in cluster_processes(cluster)}
        del big
        gc.collect()  # the failure's traceback held the graph, and with it the futures
        deadline = time.monotonic() + 30
        released = False
        while not released:  # its results are dropped once the release reaches the worker
            workers = client.scheduler_info()["workers"].values()
            released = all(w["managed_bytes"] == w["spilled_bytes"] == 0 for w in workers)
            assert time.monotonic() < deadline, list(workers)
            time.sleep(0.1)
        small = da.ones((1_000, 1_000), chunks=500)
        assert float(client.compute(small.sum(), sync=True)) == 1e6
        np.testing.assert_array_equal(client.compute(small[:2, :2], sync=True), np.ones((2, 2)))


def resident_bytes() -> int:
    """This process's resident memory (in a task: its executor's)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


HEAP_ARRAY = 48 * MIB  # over the 32 MiB up to which glibc would keep it by itself


def freed_array_stays_resident() -> int:
    """Makes and frees an array of HEAP_ARRAY bytes; the bytes it left resident."""
    before = resident_bytes()
    array = np.ones(HEAP_ARRAY // 8)
    del array
    return resident_bytes() - before


def holes_in_the_heap(count: int) -> int:
    """Frees `count` arrays of HEAP_ARRAY bytes, each below a buffer kept (in a global)
    after it, so that none is at the heap's top; the bytes left resident. Each buffer is
    larger than all the heap free at the time, so it cannot fill a hole lower down and
    leave its array at the top."""
    from rankmesh._rankmesh import heap_free_bytes

    before = resident_bytes()
    arrays, kept = [], []
    for _ in range(count):
        arrays.append(np.ones(HEAP_ARRAY // 8))
        kept.append(np.ones(heap_free_bytes() // 8 + 1))
    holes_in_the_heap.kept = kept
    del arrays
    return resident_bytes() - before


def test_executors_keep_freed_heap_for_their_tasks_within_a_budget():
    # 1 GiB limit, one executor: it keeps up to a tenth (107 MB) of freed heap, arrays
    # up to half of that come from the heap.
    with (
        rankmesh.LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB") as cluster,
        rankmesh.Client(cluster) as client,
    ):
        kept = client.submit(freed_array_stays_resident, pure=False).result()
        assert kept >= HEAP_ARRAY - 4 * MIB, f"{kept / MIB:.1f} MiB kept"
        held = client.submit(holes_in_the_heap, 3, pure=False).result()
        assert held >= 2 * HEAP_ARRAY, f"{held / MIB:.1f} MiB held in holes"
        high = client.submit(resident_bytes, pure=False).result()
        time.sleep(1.2)  # past the executor's next look at its heap, after a batch
        client.submit(int, 0, pure=False).result()
        low = client.submit(resident_bytes, pure=False).result()
        assert high - low >= 2 * HEAP_ARRAY, f"{high / MIB:.0f} -> {low / MIB:.0f} MiB"


def hold_and_keep_freed(mib: int) -> int:
    """Holds `mib` MiB in a global, then frees an array of HEAP_ARRAY bytes (kept as freed
    heap); this process's resident bytes then."""
    hold_and_keep_freed.held = np.ones(mib * MIB // 8)
    freed_array_stays_resident()
    return resident_bytes()


def let_go() -> None:
    hold_and_keep_freed.held = None


def test_over_the_spill_threshold_executors_give_back_their_kept_heap():
    # Spill threshold 307 MiB: holding 320 MiB takes the worker over it; the 48 MiB of
    # freed heap the executor kept (under its 107 MB budget) must then go back.
    thresholds = {"memory_spill": 0.3, "memory_pause": False, "memory_terminate": False}
    with (
        rankmesh.LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit="1GiB", **thresholds
        ) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        high = client.submit(hold_and_keep_freed, 320, pure=False).result()
        time.sleep(0.5)  # samples every 50 ms; the executor is idle
        low = client.submit(resident_bytes, pure=False).result()
        client.submit(let_go, pure=False).result()
        assert high - low >= HEAP_ARRAY - 8 * MIB, f"{high / MIB:.0f} -> {low / MIB:.0f} MiB"
