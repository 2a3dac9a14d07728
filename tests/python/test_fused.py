"""Dask's fused tasks as an executor runs them (rankmesh.fused): the values Dask's own
`execute_graph` gives, without ordering the inner graph again, and inner results dropped
after their last reader. Payloads go through the client's encoder and the executor's
loader, as on a cluster."""

import gc
import operator
import sys
import weakref
from pathlib import Path

import dask
import dask.order
import numpy as np
import pytest
from dask._task_spec import DataNode, Task, TaskRef
from dask.base import collections_to_expr
from rankmesh.executor import TaskRunner
from rankmesh.payloads import FunctionRegistry, PayloadEncoder
from rankmesh.serialize import loads_payload, run_payload

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from xarray_anomaly import anomaly_pipeline, synthetic_dataset  # noqa: E402


@pytest.fixture
def run_on_executor():
    """Runs a Dask node as an executor would: encoded by the client, loaded and run."""
    encoder = PayloadEncoder(FunctionRegistry())

    def run(node, values: dict):
        dep_keys = sorted(node.dependencies, key=str)
        payload, _, funcs = encoder.node(node, dep_keys)
        runner = TaskRunner("/nonexistent", "test")
        runner.add_functions(encoder.registry.submitted([(1, [], funcs, b"", 0)], [1]))
        inputs = [values[key] for key in dep_keys]
        return run_payload(loads_payload(payload, runner.functions, inputs), inputs)

    return run


def refused(*args, **kwargs):
    raise AssertionError("dask.order called")


@pytest.fixture
def dask_order_refused(monkeypatch):
    """dask.order raises while set: what runs fused tasks here must not call it."""
    monkeypatch.setattr(dask.order, "order", refused)


def same(a, b) -> bool:
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return bool(a == b)


def test_the_anomaly_pipelines_fused_tasks_give_what_dask_gives(run_on_executor, monkeypatch):
    ds = synthetic_dataset(days=60, chunk_days=10, seed=3)
    expr = collections_to_expr([anomaly_pipeline(ds)]).finalize_compute().optimize()
    graph = dict(expr.__dask_graph__())
    fused = [key for key, node in graph.items() if isinstance(node, Task) and node.has_subgraph()]
    assert len(fused) > 20, "the pipeline's graph fuses its blockwise layers"
    needed = list({dep for key in fused for dep in graph[key].dependencies})
    inputs = dict(zip(needed, dask.get(graph, needed), strict=True))
    for key in fused:
        node = graph[key]
        here = {dep: inputs[dep] for dep in node.dependencies}
        inner_before = list(node.args[0].items())
        expected = node(here)  # Dask's execute_graph, dask.order included
        with monkeypatch.context() as patch:
            patch.setattr(dask.order, "order", refused)
            got = run_on_executor(node, here)
        assert same(got, expected), key
        assert list(node.args[0].items()) == inner_before, "the inner graph is left as it was"


def test_a_fused_task_inside_a_fused_task_runs_here_too(run_on_executor, dask_order_refused):
    plus_one = Task("a", operator.add, TaskRef("x"), 1)
    doubled = Task("b", operator.mul, TaskRef("a"), 2)
    inner = Task.fuse(plus_one, doubled)
    outer = Task.fuse(inner, Task("c", operator.sub, TaskRef("b"), TaskRef("x")))
    assert outer.has_subgraph() and outer.args[0]["b"].has_subgraph()
    assert run_on_executor(outer, {"x": 5}) == (5 + 1) * 2 - 5


class Held:
    pass


def check_gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def test_an_inner_result_is_dropped_after_its_last_reader(run_on_executor, monkeypatch):
    made = Task("made", Held)
    watched = Task("watched", weakref.ref, TaskRef("made"))
    checked = Task("checked", check_gone, TaskRef("watched"))
    node = Task.fuse(made, watched, checked)
    assert node({}) is True, "Dask's execute_graph drops it"
    monkeypatch.setattr(dask.order, "order", refused)
    assert run_on_executor(node, {}) is True, "`made` was still held when `checked` ran"


def test_an_inner_tasks_error_is_the_tasks_error(run_on_executor, dask_order_refused):
    bad = Task("bad", operator.truediv, TaskRef("x"), 0)
    node = Task.fuse(bad, Task("out", operator.neg, TaskRef("bad")))
    with pytest.raises(ZeroDivisionError):
        run_on_executor(node, {"x": 1})


def test_an_inner_task_missing_an_input_fails_as_under_dask(run_on_executor, dask_order_refused):
    """An inner graph that names a key it neither makes nor gets: Dask's own error."""
    node = Task.fuse(
        Task("a", operator.add, TaskRef("x"), 1),
        Task("out", operator.add, TaskRef("a"), 1),
    )
    inner = dict(node.args[0])
    inner["a"] = Task("a", operator.add, TaskRef("x"), TaskRef("nowhere"))
    broken = Task(node.key, node.func, inner, *node.args[1:])
    with pytest.raises(RuntimeError, match="missing keys"):
        run_on_executor(broken, {"x": 1})


def test_a_data_node_inside_a_fused_task_is_its_value(run_on_executor, dask_order_refused):
    node = Task.fuse(DataNode("d", 40), Task("out", operator.add, TaskRef("d"), 2))
    assert run_on_executor(node, {}) == 42
