"""The client's bulk paths at a modest scale: `client.map` in chunks with plain arguments
pickled without the payload pickler and futures made in bulk, and graph submissions whose
fused layers ship their shared subgraph once. Correctness, not timing."""

import gc
import operator

import dask
import dask.array as da
import numpy as np
import pytest
from dask import delayed
from rankmesh import client as client_module
from rankmesh.payloads import FunctionRegistry, PayloadEncoder
from rankmesh.serialize import Functions, loads_payload, run_payload

N = 30_000  # five chunks of client.map: 1,024, 2,048, 4,096, 8,192, then the rest


def scaled(x, factor=1, offset=0):
    return x * factor + offset


def pair(x, y=0):
    return (x, y)


def fails_at(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def test_map_payloads_are_those_of_single_calls():
    """The fast path (plain data, no payload pickler) gives the payloads `call` gives."""
    encoder = PayloadEncoder(FunctionRegistry())
    local = lambda x, y=0: (x, y)  # noqa: E731 - shipped by id, as __main__ functions are
    calls = [(1,), ("a",), ((1, [2.5, None]),), ({"k": b"v"},), (np.int64(3),)]
    for func, kwargs in ((pair, {"y": 1}), (local, {"y": 2}), (local, {}), (repr, {})):
        payloads, deps, funcs = encoder.calls(func, kwargs)(calls)
        for args, payload, call_deps, call_funcs in zip(calls, payloads, deps, funcs, strict=True):
            expected, expected_deps, expected_funcs = encoder.call(func, args, kwargs)
            assert (call_deps, call_funcs) == (expected_deps, expected_funcs)
            functions = Functions()
            functions.add([(f, encoder.registry._blobs[f]) for f in call_funcs])
            ours = loads_payload(payload, functions, [])
            theirs = loads_payload(expected, functions, [])
            assert ours[0] == theirs[0] and ours[1] is theirs[1]
            assert ours[2:] == theirs[2:]
            assert run_payload(ours, []) == run_payload(theirs, [])


def test_map_of_many_plain_calls(client):
    futures = client.map(scaled, range(N), factor=3, offset=1)
    assert len({future.key for future in futures}) == N
    assert len({future.task_id for future in futures}) == N
    assert client.gather(futures) == [3 * x + 1 for x in range(N)]
    # A future of the map inside a Dask graph: found by its key, as in distributed.
    assert client.compute(delayed(operator.add)(futures[N - 5], 1)).result() == 3 * (N - 5) + 2


def test_map_mixes_plain_and_other_arguments(client):
    """Futures, arrays and functions among the arguments take the payload pickler; the
    rest of the same map does not."""
    base = client.submit(scaled, 10)
    args = []
    for i in range(5_000):
        kind = i % 500
        args.append(base if kind == 1 else np.float64(i) if kind == 2 else (i,) if kind == 3 else i)

    def total(x):
        return x[0] if isinstance(x, tuple) else float(x)

    expected = [10.0 if i % 500 == 1 else float(i) for i in range(5_000)]
    assert client.gather(client.map(total, args)) == expected
    assert client.gather(client.map(operator.call, [lambda: 4] * 3)) == [4, 4, 4]


def test_map_errors_keys_and_release(client):
    futures = client.map(fails_at, range(N), bad=N - 7, key=[f"item-{i}" for i in range(N)])
    assert [f.key for f in futures[:2]] == ["item-0", "item-1"]
    with pytest.raises(ValueError, match=f"bad item {N - 7}"):
        client.gather(futures)
    assert futures[N - 7].status == "error"
    assert futures[N - 8].result() == N - 8
    held = len(client._holds)
    del futures
    gc.collect()  # the error's traceback held the list
    client._flush_releases()
    assert len(client._holds) == held - N
    assert not any(str(key).startswith("item-") for key in client._by_key)
    with pytest.raises(ValueError):
        client.map(scaled, range(3), key=["a", "b"])


def test_map_chunks_and_priorities(client, monkeypatch):
    sent = []
    submit_calls = client._core.submit_calls

    def recording(functions, first, payloads, deps, funcs, priority, *rest):
        sent.append((first, len(payloads), priority, len(functions)))
        return submit_calls(functions, first, payloads, deps, funcs, priority, *rest)

    monkeypatch.setattr(client_module, "MAP_MAX_CHUNK", 4096)
    monkeypatch.setattr(client, "_core", _Wrapped(client._core, submit_calls=recording))
    futures = client.map(scaled, range(10_000), priority=2)
    assert [count for _, count, _, _ in sent] == [1024, 2048, 4096, 2832]
    assert [f.task_id for f in futures] == [
        i for first, n, _, _ in sent for i in range(first, first + n)
    ]
    offsets = [priority - sent[0][2] for _, _, priority, _ in sent]
    assert offsets == [0, 1024, 3072, 7168]
    assert sent[0][2] == -2 * (1 << 32)
    assert client.gather(futures)[-1] == 9_999


def test_fused_array_graph_ships_its_subgraph_once(client):
    """20,000 one-element blocks, fused: every task of the layer runs one shared subgraph,
    here with a function the executors can only get by value."""
    offset = 0.5
    x = da.ones(20_000, chunks=1).map_blocks(lambda b: b * 2 + offset, dtype=float)
    total = x.sum(split_every=16)
    ours = client.compute(total).result()
    assert ours == total.compute(scheduler="threads") == 20_000 * 2.5


def test_graph_payloads_refer_to_shared_subgraphs():
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    from rankmesh import graph

    x = da.ones(300, chunks=1).map_blocks(lambda b: b + 1, dtype=float).sum(split_every=16)
    expr = FinalizeCompute(collections_to_expr([x])).optimize()
    nodes, _ = graph.materialize(expr)
    outputs = [graph.flatten_keys(keys)[0] for keys in expr.__dask_keys__()]
    encoder = PayloadEncoder(FunctionRegistry())
    chunks = []

    def submit(tasks, *rest):
        chunks.append(tasks)

    built = graph.graph_tasks(nodes, outputs, lambda key: None, lambda count: 1, encoder, submit)
    tasks = [task for chunk in chunks for task in chunk]
    assert [task[0] for task in tasks] == list(built.task_ids) == list(range(1, len(nodes)))
    # The first leaf carries the subgraph; the other 299 refer to it and its function.
    leaves = sorted((len(task[3]), task[2]) for task in tasks if task[5] == "sum")
    assert len(leaves) == 300
    assert leaves[-2][0] < 400 < leaves[-1][0]
    lambda_id, shared_id = leaves[-1][1][0], leaves[0][1][0]
    assert leaves[-1][1] == [lambda_id]
    assert all(funcs == [shared_id, lambda_id] for _, funcs in leaves[:-1])


class _Wrapped:
    """An object's attributes, with some replaced."""

    def __init__(self, inner, **replaced):
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_dask_array_results_match_threads_at_20000_tasks(client):
    rng = da.random.RandomState(5)
    x = rng.random(20_000, chunks=1)
    y = (x.map_blocks(np.sqrt) + 1).sum(split_every=16)
    with dask.config.set(scheduler=client.get):
        ours = y.compute()
    assert ours == pytest.approx(y.compute(scheduler="threads"), rel=1e-12)


def test_a_dict_many_tasks_take_stays_each_tasks_own(client):
    """A data argument many tasks share travels in each payload (as in distributed): a
    task that changes its copy does not change the next task's."""
    config = {"values": list(range(100))}

    def take(cfg, i):
        cfg["values"].append(i)
        return len(cfg["values"])

    parts = [delayed(take)(config, i) for i in range(50)]
    assert dask.compute(parts, scheduler=client.get)[0] == [101] * 50
