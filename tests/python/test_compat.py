"""What a script written for `distributed` relies on, on rankmesh: the calls, their
semantics and the Dask and xarray features underneath (issue 15)."""

import time
from pathlib import Path

import dask
import dask.array as da
import distributed
import numpy as np
import pytest
import zarr

import rankmesh


@pytest.fixture(scope="module")
def one_thread():
    """A client of a one-worker, one-thread cluster: the order tasks run in is observable."""
    with rankmesh.LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        with rankmesh.Client(cluster) as client:
            yield client


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


def test_resources_and_actors_are_refused_rather_than_ignored(client):
    with pytest.raises(NotImplementedError, match="resources"):
        client.submit(where_am_i, resources={"GPU": 1})
    with pytest.raises(NotImplementedError, match="actors"):
        client.submit(where_am_i, actor=True)
    with dask.annotate(resources={"GPU": 1}):
        x = dask.delayed(where_am_i)()
    with pytest.raises(NotImplementedError, match="resources"):
        x.compute(scheduler=client.get)


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
