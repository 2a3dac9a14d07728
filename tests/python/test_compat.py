"""What a script written for `distributed` relies on, on rankmesh: the calls, their
semantics and the Dask and xarray features underneath (issue 15)."""

import os
import subprocess
import time
from pathlib import Path

import dask
import dask.array as da
import distributed
import numpy as np
import pytest
import rankmesh
import zarr


@pytest.fixture(scope="module")
def one_thread_cluster():
    """One worker with one thread: the order tasks run in is observable, and a task that
    does not end blocks everything after it."""
    with rankmesh.LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        yield cluster


def _not_default(client):
    """A client that is not Dask's default scheduler: a module-wide default would be in the
    dask config that `distributed` pickles into its worker processes."""
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def one_thread(one_thread_cluster):
    yield from _not_default(rankmesh.Client(one_thread_cluster))


@pytest.fixture(scope="module")
def dask_client():
    """`distributed` on the same shape, to compare with."""
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster, set_as_default=False) as client:
            yield client


def flaky(counter: str, succeed_on: int) -> int:
    """Raises until its `succeed_on`th call (counted in a file, across processes)."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls < succeed_on:
        raise ValueError(f"call {calls}")
    return calls


def logged(log: str, name: str, seconds: float = 0.0) -> str:
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(name + "\n")
    return name


def where_am_i() -> int:
    return rankmesh.get_worker().id


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_retries_succeed_on_the_third_try_as_in_distributed(system, client, dask_client, tmp_path):
    c = client if system == "rankmesh" else dask_client
    assert c.submit(flaky, str(tmp_path / "a"), 3, retries=2, pure=False).result() == 3
    with pytest.raises(ValueError, match="call 2"):
        c.submit(flaky, str(tmp_path / "b"), 3, retries=1, pure=False).result()
    # The keyword goes to the scheduler, never to the function.
    assert c.submit(lambda **kw: kw, retries=0, priority=1, pure=False).result() == {}


def test_retries_through_dask_annotate_and_compute(client, tmp_path):
    with dask.annotate(retries=2):
        flaky_result = dask.delayed(flaky)(str(tmp_path / "a"), 3)
    assert dask.compute(flaky_result, scheduler=client.get)[0] == 3
    later = dask.delayed(flaky)(str(tmp_path / "b"), 2)
    assert client.compute(later, retries=1).result() == 2
    with pytest.raises(ValueError, match="call 1"):
        dask.compute(dask.delayed(flaky)(str(tmp_path / "c"), 2), scheduler=client.get)


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_priorities_reorder_waiting_tasks_as_in_distributed(
    system, one_thread, dask_client, tmp_path
):
    c = one_thread if system == "rankmesh" else dask_client
    log = str(tmp_path / "log")
    blocker = c.submit(logged, log, "blocker", 1.5, pure=False)
    time.sleep(0.3)  # the blocker runs; what follows waits behind it
    low = [c.submit(logged, log, f"low{i}", priority=-1, pure=False) for i in range(3)]
    high = [c.submit(logged, log, f"high{i}", priority=10, pure=False) for i in range(3)]
    c.gather([blocker, *low, *high])
    order = Path(log).read_text().split()
    assert order[0] == "blocker"
    # Both run the high ones before the low ones submitted before them; `distributed` may
    # already have sent one low task to the worker (it ran low0 first here).
    last_high = max(order.index(f"high{i}") for i in range(3))
    assert last_high < order.index("low2"), order
    if system == "rankmesh":  # it holds back what the worker cannot start yet
        assert sorted(order[1:4]) == ["high0", "high1", "high2"], order


def test_workers_and_allow_other_workers(client):
    ids = sorted(w["id"] for w in client.workers())
    for wanted in ids:
        assert client.submit(where_am_i, workers=[wanted], pure=False).result() == wanted
        loose = client.submit(where_am_i, workers=wanted, allow_other_workers=True, pure=False)
        assert loose.result() == wanted  # a preference, kept while the worker is there
    with dask.annotate(workers=[ids[-1]]):
        placed = [dask.delayed(where_am_i)(dask_key_name=f"w-{i}") for i in range(4)]
    assert set(dask.compute(*placed, scheduler=client.get)) == {ids[-1]}


def test_actors_are_refused_rather_than_ignored(client):
    with pytest.raises(NotImplementedError, match="actors"):
        client.submit(where_am_i, actor=True)


def hold_resource(log: str, name: str) -> str:
    return logged(log, f"start {name}") and logged(log, f"end {name}", 0.3)


@pytest.fixture(scope="module")
def gpu_clusters():
    """Two workers of two threads offering one GPU each, on both systems."""
    with rankmesh.LocalCluster(n_workers=2, threads_per_worker=2, resources={"GPU": 1}) as ours:
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=None
        ) as theirs:
            with distributed.Client(theirs, set_as_default=False) as b:
                for a in _not_default(rankmesh.Client(ours)):
                    yield {"rankmesh": a, "distributed": b}


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_resources_confine_tasks_as_in_distributed(system, gpu_clusters, tmp_path):
    c = gpu_clusters[system]
    assert set(c.nthreads().values()) == {2}
    log = str(tmp_path / "log")
    futures = [
        c.submit(hold_resource, log, str(i), resources={"GPU": 1}, pure=False) for i in range(6)
    ]
    c.gather(futures)
    # Two GPUs in the cluster: never more than two tasks hold one at a time, though four
    # threads could run them.
    running = peak = 0
    for line in Path(log).read_text().split("\n")[:-1]:
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2


def test_resources_no_worker_has_fail_at_once(gpu_clusters):
    c = gpu_clusters["rankmesh"]
    with pytest.raises(rankmesh.TaskError, match="NoWorkerError.*GPU=2"):
        c.submit(where_am_i, resources={"GPU": 2}, pure=False).result(timeout=30)
    with dask.annotate(resources={"TPU": 1}):
        x = dask.delayed(where_am_i)()
    with pytest.raises(rankmesh.TaskError, match="NoWorkerError.*TPU=1"):
        x.compute(scheduler=c.get)
    assert all(w["resources"] == {"GPU": 1.0} for w in c.workers())


def test_store_into_a_numpy_array_is_refused_not_silently_lost(client):
    x = da.arange(100, chunks=10) + 1
    target = np.zeros(100)
    with pytest.raises(RuntimeError, match="cannot write into a numpy.ndarray"):
        da.store(x, target, scheduler=client.get)
    assert not target.any()  # nothing was written, and the error said so
    # The threaded scheduler, for contrast, fills it.
    da.store(x, target, scheduler="threads")
    np.testing.assert_array_equal(target, np.arange(100) + 1)


def test_store_into_an_in_memory_zarr_array_is_refused(client):
    x = da.ones((40, 40), chunks=10)
    target = zarr.zeros((40, 40), chunks=(10, 10), store=zarr.storage.MemoryStore())
    with pytest.raises(RuntimeError, match="zarr array in a MemoryStore"):
        with dask.config.set(scheduler=client.get):
            x.to_zarr(target)
    assert not target[:].any()


def test_store_into_a_zarr_array_on_disk_matches_threads(client, tmp_path):
    x = da.random.RandomState(0).random((40, 40), chunks=10)
    on_rankmesh = zarr.open_array(tmp_path / "r.zarr", mode="w", shape=(40, 40), chunks=(10, 10))
    on_threads = zarr.open_array(tmp_path / "t.zarr", mode="w", shape=(40, 40), chunks=(10, 10))
    da.store(x, on_rankmesh, scheduler=client.get)
    da.store(x, on_threads, scheduler="threads")
    np.testing.assert_array_equal(on_rankmesh[:], on_threads[:])
    assert on_rankmesh[:].any()


# ----------------------------------------------------------------------- client calls


def test_dask_config_deep_copies_while_a_client_is_the_default(cluster):
    import copy

    with rankmesh.Client(cluster) as client:  # as_default: client.get in dask.config
        copied = copy.deepcopy(dask.config.config)
        assert copied["scheduler"].__self__ is client
        assert copy.copy(client) is client


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_wait_for_workers_nthreads_and_run_as_in_distributed(system, client, dask_client):
    import os

    c = client if system == "rankmesh" else dask_client
    n = len(c.nthreads())
    c.wait_for_workers(n, timeout=10)
    with pytest.raises(TimeoutError):
        c.wait_for_workers(n + 1, timeout=0.2)
    assert all(k.startswith("tcp://") and v == 1 for k, v in c.nthreads().items())
    pids = c.run(os.getpid)
    assert set(pids) == set(c.nthreads()) and len(set(pids.values())) == n
    assert os.getpid() not in pids.values()


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_scheduler_info_keys_workers_by_the_address_workers_takes(system, client, dask_client):
    c = client if system == "rankmesh" else dask_client
    workers = c.scheduler_info()["workers"]
    assert set(workers) == set(c.nthreads())
    for address, worker in workers.items():
        assert worker["nthreads"] == 1 and worker["memory_limit"] >= 0
        there = c.submit(os.getpid, workers=[address], allow_other_workers=False, pure=False)
        assert there.result(timeout=30) == c.run(os.getpid, workers=[address])[address]


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_who_has_and_has_what_name_the_holding_worker(system, client, dask_client):
    c = client if system == "rankmesh" else dask_client
    futures = c.map(lambda i: i, range(6), pure=False)
    c.gather(futures)
    located = c.who_has(futures)
    assert set(located) == {f.key for f in futures}
    addresses = set(c.nthreads())
    assert all(len(holders) >= 1 and set(holders) <= addresses for holders in located.values())
    what = c.has_what()
    for future in futures:
        assert any(future.key in keys for keys in what.values())


def test_a_future_dropped_then_unpickled_keeps_its_result(client):
    """The task of a future dropped and unpickled again before its release was sent stays
    held. (`distributed` 2024.x loses it here: its release, queued on the client's loop by
    the dropped future, runs after the new future's hold, and `result()` waits forever.)"""
    import pickle

    for n in range(5):
        made = client.submit(abs, -n, pure=False)
        assert made.result(timeout=60) == n
        pickled = pickle.dumps(made)
        del made  # its last future: the task is released unless a new one holds it
        again = pickle.loads(pickled)  # bound to get_client()
        time.sleep(0.2)  # past the releasing thread's interval
        assert again.result(timeout=60) == n
    # Loaded only after the release was sent, it says so rather than waiting.
    made = client.submit(abs, -7, pure=False)
    pickled = pickle.dumps(made)
    del made
    time.sleep(0.5)
    with pytest.raises(rankmesh.TaskError, match="not a live task"):
        pickle.loads(pickled).result(timeout=60)


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_done_callbacks_and_fire_and_forget(system, client, dask_client, tmp_path):
    import threading

    c = client if system == "rankmesh" else dask_client
    forget = rankmesh.fire_and_forget if system == "rankmesh" else distributed.fire_and_forget
    called = threading.Event()
    seen = []
    future = c.submit(time.sleep, 0.2, pure=False)
    future.add_done_callback(lambda f: (seen.append(f.status), called.set()))
    assert called.wait(30) and seen == ["finished"]
    log = str(tmp_path / "log")
    forget(c.submit(logged, log, "forgotten", 0.3, pure=False))  # no future kept
    # The file appears before its line does: wait for the line.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if Path(log).exists() and Path(log).read_text().endswith("\n"):
            break
        time.sleep(0.05)
    assert Path(log).read_text() == "forgotten\n"


def test_cancelling_a_running_task_frees_a_one_thread_worker(one_thread):
    sleeper = one_thread.submit(time.sleep, 3600, pure=False)
    time.sleep(1)  # it is running
    sleeper.cancel()
    assert sleeper.status == "cancelled"
    started = time.monotonic()
    assert one_thread.submit(sum, [1, 2, 3], pure=False).result(timeout=60) == 6
    assert time.monotonic() - started < 30


def test_closing_a_client_stops_its_running_tasks(one_thread_cluster, one_thread):
    other = rankmesh.Client(one_thread_cluster)
    other.submit(time.sleep, 3600, pure=False)
    time.sleep(1)
    other.close()
    assert one_thread.submit(sum, [4, 5], pure=False).result(timeout=60) == 9


def remember(value):
    import builtins

    builtins._rankmesh_remembered = value
    return value


def recall():
    import builtins

    return getattr(builtins, "_rankmesh_remembered", None)


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_restart_gives_fresh_worker_processes_as_in_distributed(system, one_thread, dask_client):
    import os

    c = one_thread if system == "rankmesh" else dask_client
    assert c.submit(remember, 7, pure=False).result(timeout=60) == 7
    assert c.submit(recall, pure=False).result(timeout=60) == 7
    before = set(c.run(os.getpid).values())
    # On rankmesh, also with a task running at the time (on distributed, the next task
    # then did not finish within 60 s here; not looked into).
    held = c.submit(time.sleep, 3600, pure=False) if system == "rankmesh" else None
    c.restart()
    assert c.submit(recall, pure=False).result(timeout=60) is None
    assert set(c.run(os.getpid).values()).isdisjoint(before)
    if held is not None:
        assert held.status == "cancelled"


def test_retired_workers_leave_for_good_and_their_work_is_redone(tmp_path):
    import numpy as np

    with rankmesh.LocalCluster(n_workers=3, allowed_failures=1) as cluster:
        client = rankmesh.Client(cluster)
        client.wait_for_workers(3, timeout=30)
        x = client.persist(da.random.RandomState(5).random((400, 400), chunks=50))
        rankmesh.wait(x)
        leaving = sorted(client.nthreads())[:2]
        retired = client.retire_workers(leaving)
        assert sorted(retired) == leaving
        assert set(client.nthreads()).isdisjoint(leaving)
        # Results held only there are recomputed; nothing counted against a task.
        expected = da.random.RandomState(5).random((400, 400), chunks=50).sum()
        assert np.isclose(x.sum().compute(scheduler=client.get), expected.compute())
        time.sleep(3)  # not replaced (a worker that dies is, within a second here)
        assert len(client.nthreads()) == 1
        client.close()


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_retire_workers_returns_them_by_address_as_in_distributed(system):
    if system == "rankmesh":
        cluster = rankmesh.LocalCluster(n_workers=2)
        client = rankmesh.Client(cluster)
    else:
        cluster = distributed.LocalCluster(n_workers=2, dashboard_address=None)
        client = distributed.Client(cluster, set_as_default=False)
    try:
        client.wait_for_workers(2, timeout=30)
        first = sorted(client.nthreads())[0]
        assert list(client.retire_workers([first])) == [first]
        deadline = time.monotonic() + 30
        while len(client.nthreads()) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(client.nthreads()) != [first] and len(client.nthreads()) == 1
    finally:
        client.close()
        cluster.close()


class MarkProcess(distributed.WorkerPlugin):
    """Leaves a file named after each process that sets it up: a plugin written for
    `distributed`, which rankmesh runs too (rankmesh.WorkerPlugin is the same shape)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, worker) -> None:
        import os

        Path(self.folder, str(os.getpid())).touch()


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_a_worker_plugin_is_set_up_on_every_worker_as_in_distributed(
    system, client, dask_client, tmp_path
):
    import os

    c = client if system == "rankmesh" else dask_client
    c.register_plugin(MarkProcess(str(tmp_path)), name=f"mark-{tmp_path.name}")
    workers = set(c.run(os.getpid).values())
    deadline = time.monotonic() + 30  # rankmesh's executors set plugins up as they come
    while {int(p.name) for p in tmp_path.iterdir()} != workers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {int(p.name) for p in tmp_path.iterdir()} == workers
    c.unregister_worker_plugin(f"mark-{tmp_path.name}")


def call_uploaded(module: str) -> int:
    import importlib

    return importlib.import_module(module).answer()


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_upload_file_puts_a_module_on_every_worker(system, client, dask_client, tmp_path):
    import uuid

    c = client if system == "rankmesh" else dask_client
    module = f"uploaded_{uuid.uuid4().hex}"
    source = tmp_path / f"{module}.py"
    source.write_text("def answer():\n    return 42\n")
    with pytest.raises(ModuleNotFoundError):
        c.submit(call_uploaded, module, pure=False).result(timeout=60)
    c.upload_file(str(source))
    ids = sorted(c.nthreads())
    for worker in ids:  # each worker has it
        assert c.submit(call_uploaded, module, workers=[worker], pure=False).result(60) == 42


# ----------------------------------------------------------------- locks and friends


def hold_lock(lock, log: str, name: str) -> None:
    """Appends enter/exit lines around a pause, holding the lock: overlapping holders
    would interleave their lines."""
    with lock:
        with open(log, "a") as f:
            f.write(f"enter {name}\n")
        time.sleep(0.2)
        with open(log, "a") as f:
            f.write(f"exit {name}\n")


def assert_not_interleaved(log: str, count: int) -> None:
    lines = Path(log).read_text().split("\n")[:-1]
    assert len(lines) == 2 * count
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.split()[0] == "enter" and leave == "exit " + enter.split()[1], lines


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_a_lock_in_tasks_excludes_across_worker_processes(system, client, dask_client, tmp_path):
    c = client if system == "rankmesh" else dask_client
    lock = (rankmesh.Lock if system == "rankmesh" else distributed.Lock)("shared-file")
    log = str(tmp_path / "log")
    futures = [c.submit(hold_lock, lock, log, str(i), pure=False) for i in range(4)]
    c.gather(futures)
    assert_not_interleaved(log, 4)


def test_a_thread_lock_in_a_graph_becomes_one_cluster_lock(client, tmp_path):
    import threading

    lock = threading.Lock()
    log = str(tmp_path / "log")
    calls = [dask.delayed(hold_lock)(lock, log, str(i)) for i in range(4)]
    dask.compute(*calls, scheduler=client.get)
    assert_not_interleaved(log, 4)
    workers = {w["id"] for w in client.workers()}
    assert len(workers) == 2  # so the four calls did run in two processes


def test_lock_timeouts_and_release_errors_as_in_distributed(client):
    lock = rankmesh.Lock("timeouts")
    other = rankmesh.Lock("timeouts")
    assert lock.acquire(timeout=1)
    assert lock.locked()
    started = time.monotonic()
    assert not other.acquire(timeout=0.3)
    assert 0.25 < time.monotonic() - started < 5
    assert not other.acquire(blocking=False)
    lock.release()
    assert other.acquire(blocking=False)
    other.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="released more often"):
        lock.release()


def lock_then_die(lock) -> None:
    import os

    lock.acquire()
    os._exit(1)  # the executor dies holding the lock


def test_a_lock_held_by_a_task_whose_process_died_is_given_back(client):
    lock = rankmesh.Lock("dies-holding")
    future = client.submit(lock_then_die, lock, pure=False, retries=0)
    with pytest.raises(Exception):  # noqa: B017 - the executor's crash, whatever its form
        future.result(timeout=60)
    assert lock.acquire(timeout=30), "the dead executor's lease was never given back"
    lock.release()


def wait_and_report(event_name: str, queue_name: str) -> str:
    event = rankmesh.Event(event_name)
    assert event.wait(timeout=60)
    rankmesh.Queue(queue_name).put("seen")
    return rankmesh.Variable("shared").get(timeout=60)


def test_events_queues_and_variables_between_tasks_and_the_client(client):
    future = client.submit(wait_and_report, "go", "reports", pure=False)
    queue = rankmesh.Queue("reports")
    with pytest.raises(TimeoutError):
        queue.get(timeout=0.3)
    assert future.status == "pending"
    variable = rankmesh.Variable("shared")
    variable.set({"answer": 42})
    rankmesh.Event("go").set()
    assert queue.get(timeout=60) == "seen"
    assert future.result(timeout=60) == {"answer": 42}
    assert rankmesh.Event("go").is_set() and queue.qsize() == 0
    variable.delete()
    with pytest.raises(TimeoutError):
        variable.get(timeout=0.2)


def submit_from_a_task(n: int, worker: int) -> int:
    inner = rankmesh.get_client()
    return sum(inner.gather(inner.map(lambda i: i * i, range(n), workers=worker)))


def through_worker_client(n: int, worker: int) -> int:
    with rankmesh.worker_client() as inner:
        return sum(inner.gather(inner.map(lambda i: i + 1, range(n), workers=worker)))


def test_worker_client_works_and_secede_is_refused_clearly(client):
    first, second = (w["id"] for w in client.workers())
    outer = client.submit(through_worker_client, 10, second, workers=first, pure=False)
    assert outer.result(timeout=120) == 55
    with pytest.raises(NotImplementedError, match="no secede"):
        client.submit(rankmesh.secede, pure=False).result(timeout=60)


def test_a_task_submits_tasks_through_get_client(client):
    # The inner tasks go to the other worker: a task waiting for tasks queued behind it on
    # its own executor would wait forever (rankmesh has no secede() yet).
    first, second = (w["id"] for w in client.workers())
    outer = client.submit(submit_from_a_task, 10, second, workers=first, pure=False)
    assert outer.result(timeout=120) == 285


# ------------------------------------------------------------------------------ netCDF


def _dataset():
    import xarray as xr

    rng = np.random.default_rng(0)
    data = rng.standard_normal((40, 30, 20)).astype("float32")
    ds = xr.Dataset(
        {"t": (("time", "lat", "lon"), data), "p": (("time", "lat"), data[..., 0] * 2)},
        coords={"time": np.arange(40), "lat": np.linspace(-60, 60, 30)},
    )
    return ds.chunk({"time": 5})


@pytest.mark.parametrize("engine", ["h5netcdf", "netcdf4"])
def test_to_netcdf_matches_the_threaded_scheduler(client, tmp_path, engine):
    import xarray as xr

    ds = _dataset()
    with dask.config.set(scheduler="threads"):
        ds.to_netcdf(tmp_path / "threads.nc", engine=engine)
    with dask.config.set(scheduler=client.get):
        ds.to_netcdf(tmp_path / "rankmesh.nc", engine=engine)
    with (
        xr.open_dataset(tmp_path / "threads.nc", engine=engine) as expected,
        xr.open_dataset(tmp_path / "rankmesh.nc", engine=engine) as written,
    ):
        xr.testing.assert_identical(written.load(), expected.load())
        assert float(abs(written.t).sum()) > 0


@pytest.mark.parametrize("engine", ["h5netcdf", "netcdf4"])
def test_save_mfdataset_and_open_mfdataset_parallel(client, tmp_path, engine):
    import xarray as xr

    ds = _dataset()
    pieces = [ds.isel(time=slice(i, i + 10)) for i in range(0, 40, 10)]
    paths = [tmp_path / f"part{i}.nc" for i in range(4)]
    with dask.config.set(scheduler=client.get):
        xr.save_mfdataset(pieces, paths, engine=engine)
        with xr.open_mfdataset(paths, parallel=True, engine=engine) as reopened:
            on_rankmesh = reopened.load()
    with xr.open_mfdataset(paths, engine=engine) as reopened:
        with dask.config.set(scheduler="threads"):
            on_threads = reopened.load()
    xr.testing.assert_identical(on_rankmesh, on_threads)
    xr.testing.assert_allclose(on_rankmesh, ds.load())


# ------------------------------------------------------------- what rankmesh refuses


def numbers():
    yield from range(3)


def test_a_result_that_cannot_be_pickled_names_the_task_and_the_type(client):
    with pytest.raises(TypeError, match=r"result of numbers is a builtins\.generator"):
        client.submit(numbers, pure=False).result(timeout=60)
    delayed = dask.delayed(numbers, pure=False)(dask_key_name="my-numbers")
    with pytest.raises(TypeError, match="result of numbers is a builtins.generator"):
        dask.compute(delayed, scheduler=client.get)


def test_a_p2p_rechunk_is_refused_at_once_naming_method_tasks(client):
    x = da.ones((100, 100), chunks=10).rechunk((100, 5), method="p2p")
    with pytest.raises(NotImplementedError, match="method='tasks'"):
        x.sum().compute(scheduler=client.get)
    # The default (tasks) gives the same answer as the threaded scheduler.
    y = da.ones((100, 100), chunks=10).rechunk((100, 5))
    assert y.sum().compute(scheduler=client.get) == y.sum().compute(scheduler="threads")


def test_submit_command_returns_exit_code_and_output(client):
    done = client.submit_command(
        ["sh", "-c", 'echo "out $GREETING"; echo err >&2; exit 3'],
        env={"GREETING": "hello"},
        check=False,
    ).result(timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out hello\n", b"err\n")
    assert client.submit_command("tr a-z A-Z", stdin=b"abc").result(timeout=60).stdout == b"ABC"
    failing = client.submit_command(["sh", "-c", "echo why >&2; exit 2"])
    with pytest.raises(subprocess.CalledProcessError) as raised:
        failing.result(timeout=60)
    assert (raised.value.returncode, raised.value.stderr) == (2, b"why\n")


def test_submit_command_holds_resources(gpu_clusters, tmp_path):
    c = gpu_clusters["rankmesh"]
    log = tmp_path / "log"
    script = f"echo start >> {log}; sleep 0.3; echo end >> {log}"
    c.gather([c.submit_command(script, resources={"GPU": 1}) for _ in range(6)])
    running = peak = 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # two GPUs, four threads


def test_cancelling_a_command_kills_its_program(one_thread, tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = one_thread.submit_command(f"echo $$ > {pid_file}; exec sleep 3600")
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    sleeper.cancel()
    assert one_thread.submit(sum, [1, 2], pure=False).result(timeout=60) == 3
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and _state_of(pid) != "Z":
        assert time.monotonic() < deadline, f"sleep {pid} outlived its cancelled task"
        time.sleep(0.1)


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


@pytest.mark.parametrize("system", ["rankmesh", "distributed"])
def test_published_datasets_outlive_their_client_as_in_distributed(system, cluster, dask_client):
    def connect():
        if system == "rankmesh":
            return rankmesh.Client(cluster)
        return distributed.Client(dask_client.scheduler.address, set_as_default=False)

    name = f"published-{system}-{time.monotonic_ns()}"
    expected = (da.arange(1000, chunks=100) ** 2).sum().compute(scheduler="threads")
    with connect() as publisher:
        persisted = publisher.persist(da.arange(1000, chunks=100) ** 2)
        total = publisher.submit(sum, [1, 2, 3], pure=False)
        publisher.publish_dataset(persisted, name=name)
        publisher.publish_dataset(**{f"{name}-total": total})
        with pytest.raises(KeyError, match="already exists"):
            publisher.publish_dataset(total, name=name)
        assert name in publisher.list_datasets()
    # The publisher is gone; the results it published are not.
    with connect() as reader:
        found = reader.get_dataset(name)
        assert found.sum().compute(scheduler=reader.get) == expected
        assert reader.datasets[f"{name}-total"].result(timeout=60) == 6
        assert reader.get_dataset("nothing", default=None) is None
        with pytest.raises(KeyError):
            reader.get_dataset("nothing")
        del reader.datasets[f"{name}-total"]
        reader.unpublish_dataset(name)
        assert not {name, f"{name}-total"} & set(reader.list_datasets())
        reader.unpublish_dataset(name)  # gone already: nothing to do, no error
        # The reader's own future keeps its result after the dataset is gone.
        assert found.sum().compute(scheduler=reader.get) == expected


def test_a_variable_refuses_a_future_and_says_what_to_use(client):
    base = client.submit(sum, [1, 2], pure=False)
    with pytest.raises(TypeError, match="publish_dataset"):
        rankmesh.Variable(client=client).set(base)
