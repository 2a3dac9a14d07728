"""Dask graphs become rankmesh tasks that, run by the executor's task runner in submission
order, give what Dask's threaded scheduler gives."""

import gc
import itertools
import operator
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask._task_spec import Alias, DataNode, Task, TaskRef
from rankmesh import graph
from rankmesh.executor import TaskRunner, decode_input
from rankmesh.futures import Future
from rankmesh.payloads import FunctionRegistry, PayloadEncoder
from rankmesh.serialize import loads_error


class HoldingNothing:
    """The part of a Client that a Future calls when it is made and dropped."""

    def _hold(self, future):
        pass

    def _drop(self, task_id, key):
        pass


class InProcessCluster:
    """Runs submitted tasks at once, in submission order, keeping results as ObjectTuples."""

    def __init__(self, shm_dir):
        self.encoder = PayloadEncoder(FunctionRegistry())
        self.runner = TaskRunner(str(shm_dir), "test")
        self.stored = {}
        self.ids = itertools.count(1000)
        self.last_tasks = []
        self.chunks = 0

    def next_task_id(self, count):
        first = next(self.ids)
        for _ in range(count - 1):
            next(self.ids)
        return first

    def check_submit(self, tasks, held, release, restrictions, options):
        """Runs a chunk as a scheduler would and keeps only what is held, so a task
        released too early fails a later chunk."""
        self.runner.add_functions(self.encoder.registry.submitted(tasks, held))
        self.chunks += 1
        self.last_tasks.extend(tasks)
        for task_id, deps, funcs, payload, _priority, prefix in tasks:
            assert prefix and isinstance(prefix, str)
            assert set(funcs) <= set(self.runner.functions)
            inputs = [self.stored[dep] for dep in deps]  # dependencies came first
            _, _, status, stored = self.runner.run(task_id, payload, inputs)
            if status == "err":
                raise loads_error(stored)
            self.stored[task_id] = stored
        for task_id, *_ in tasks:
            if task_id not in held:
                del self.stored[task_id]
        for task_id in release:
            del self.stored[task_id]

    def get(self, dsk, keys, **kwargs):
        nodes, held = graph.materialize(dsk)
        outputs = graph.flatten_keys(keys)
        self.chunks = 0
        self.last_tasks = []
        built = graph.graph_tasks(
            nodes, outputs, held.get, self.next_task_id, self.encoder, self.check_submit
        )
        assert [task[0] for task in self.last_tasks] == list(built.task_ids)
        values = {key: decode_input(self.stored[built.key_ids[key]]) for key in outputs}
        return graph.repack(keys, values)


@pytest.fixture
def cluster(tmp_path):
    return InProcessCluster(tmp_path)


def test_dask_array_with_rechunk_and_reductions(cluster):
    x = da.random.default_rng(0).random((400, 300), chunks=(100, 60))
    y = (x.rechunk((50, 150)) @ x.T).sum(axis=0) + x.mean()
    z = x[::3, 10:50].std(axis=1)
    expected = dask.compute(y, z, scheduler="threads")
    got = dask.compute(y, z, scheduler=cluster.get)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want)


def test_large_chunks_pass_through_shared_memory(cluster, tmp_path):
    x = da.arange(2_000_000, chunks=500_000, dtype=np.float64)
    expected = (x * 2).compute(scheduler="threads")
    np.testing.assert_array_equal((x * 2).compute(scheduler=cluster.get), expected)
    assert any(stored[0] == "shm" for stored in cluster.stored.values())


def test_delayed_with_lambdas_and_local_functions(cluster):
    def local_square(v):
        return v * v

    parts = [dask.delayed(local_square)(i) for i in range(20)]
    total = dask.delayed(lambda xs: sum(xs) + 1)(parts)
    pair = dask.delayed(lambda a, b: (a, b))(total, parts[3])
    assert dask.compute(pair, scheduler=cluster.get) == dask.compute(pair, scheduler="threads")


def test_xarray_dataset(cluster):
    ds = xr.Dataset(
        {"t": (("time", "x"), np.random.default_rng(1).random((48, 30)))},
        coords={"time": np.arange(48), "x": np.arange(30)},
    ).chunk({"time": 12, "x": 10})
    ds = ds.assign_coords(month=("time", np.arange(48) % 12))  # in memory: groupby needs it
    anomalies = (ds.t - ds.t.mean("time")).std("x")
    climatology = ds.t.groupby("month").mean("time").sum("x")
    expected = dask.compute(anomalies, climatology, scheduler="threads")
    got = dask.compute(anomalies, climatology, scheduler=cluster.get)
    for want, have in zip(expected, got, strict=True):
        xr.testing.assert_allclose(have, want)


def test_nested_keys_come_back_in_their_nesting(cluster):
    dsk = {"a": 1, "b": (operator.add, "a", 10), ("c", 0): (operator.mul, "b", 2)}
    assert cluster.get(dsk, [["b"], [("c", 0), "a"]]) == [[11], [22, 1]]
    assert cluster.get(dsk, ("c", 0)) == 22


def test_aliases_become_no_task(cluster):
    nodes = {
        "a": DataNode("a", 5),
        "b": Alias("b", "a"),
        "c": Task("c", operator.add, TaskRef("b"), 1),
    }
    assert cluster.get(nodes, ["c", "b"]) == [6, 5]
    assert len(cluster.last_tasks) == 2


def test_only_what_the_outputs_need_runs(cluster):
    dsk = {"a": 1, "b": (operator.add, "a", 1), "unused": (operator.truediv, 1, 0)}
    assert cluster.get(dsk, ["b"]) == [2]
    assert len(cluster.last_tasks) == 2


def test_task_errors_reach_the_caller_with_their_type(cluster):
    def fails(v):
        raise KeyError(f"missing {v}")

    with pytest.raises(KeyError, match="missing 3"):
        dask.compute(dask.delayed(fails)(3), scheduler=cluster.get)


def test_keys_held_by_futures_are_inputs_not_tasks(cluster):
    # A persisted collection's graph is {key: Future(key)}; the task behind it exists already.
    cluster.stored[7] = cluster.runner.run(7, cluster.encoder.data(np.arange(4))[0], [])[3]
    dsk = {"x": Future(HoldingNothing(), 7, "x"), "y": (np.sum, "x")}
    assert cluster.get(dsk, ["y"]) == [6]
    assert [task[1] for task in cluster.last_tasks] == [[7]]
    with pytest.raises(KeyError, match="neither in the graph"):
        cluster.get({"y": Task("y", np.sum, TaskRef("x"))}, ["y"])


def test_tasks_follow_dependencies_and_priorities_in_large_graphs(cluster, monkeypatch):
    # Above ORDER_MAX_TASKS priorities come from the depth-first submission order.
    monkeypatch.setattr(graph, "ORDER_MAX_TASKS", 100)
    leaves = [dask.delayed(operator.add)(i, 1) for i in range(256)]
    while len(leaves) > 1:
        pairs = zip(leaves[::2], leaves[1::2], strict=True)
        leaves = [dask.delayed(operator.add)(a, b) for a, b in pairs]
    assert dask.compute(leaves[0], scheduler=cluster.get) == dask.compute(
        leaves[0], scheduler="sync"
    )
    priorities = [task[4] for task in cluster.last_tasks]
    assert priorities == sorted(priorities)
    assert len(cluster.last_tasks) == 511


def test_large_graphs_stream_in_chunks_holding_only_what_later_chunks_need(cluster):
    level = [dask.delayed(operator.add)(i, 1) for i in range(2048)]
    while len(level) > 1:
        level = [
            dask.delayed(operator.add)(a, b) for a, b in zip(level[::2], level[1::2], strict=True)
        ]
    (total,) = dask.compute(level[0], scheduler=cluster.get)
    assert total == sum(range(2048)) + 2048
    assert cluster.chunks > 2
    # Every intermediate was released once its dependents were submitted.
    assert len(cluster.stored) == 1


# ------------------------------------------------------------ the collector around submits


def test_submissions_that_overlap_in_threads_leave_the_collector_on():
    """The second to start must not restore the "off" the first one set."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with graph.gc_paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with graph.gc_paused():
            second_in.set()
            first_out.wait(10)
            seen.append(gc.isenabled())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [False], "off while the second still runs"
    assert gc.isenabled()
