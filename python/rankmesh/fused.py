"""Dask's fused tasks, run without ordering their inner graph again on every call.

A fused task (`dask._task_spec.Task.fuse`: blockwise and linear fusion make them) runs
its inner graph through `dask._task_spec.execute_graph`, which orders it with `dask.order`
each time it runs; on the anomaly pipeline of examples/ that is 12-15% of the compute
time under Dask's own schedulers. An executor runs the same inner tasks depth first from
the fused task's output instead: every inner task of a fused task leads to its one
output, so the same tasks run and give the same values, and each inner result is dropped
after its last reader, as Dask drops it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping

from ._graph_walk import depth_first


def call(func: object, args: tuple, kwargs: dict) -> object:
    """`func(*args, **kwargs)`; a fused task's inner graph is run here."""
    spec = sys.modules.get("dask._task_spec")  # loaded by the payload if it calls Dask
    if spec is None or func is not spec._execute_subgraph or kwargs or not _fused_arguments(args):
        return func(*args, **kwargs)
    inner, outkey, inkeys, *inputs = args
    return _run_inner(inner, outkey, dict(zip(inkeys, inputs, strict=True)))


def call_node(node: object, values: Mapping) -> object:
    """`node(values)` for a Dask graph node; a fused task's inner graph is run here."""
    spec = sys.modules.get("dask._task_spec")
    if spec is None or not _is_fused(spec, node):
        return node(values)
    inner, outkey, inkeys, *refs = node.args
    known = {key: values[ref.key] for key, ref in zip(inkeys, refs, strict=True)}
    return _run_inner(inner, outkey, known)


def _is_fused(spec, node: object) -> bool:
    """A task made by `Task.fuse`, nested in another fused task's inner graph."""
    if type(node) is not spec.Task or node.func is not spec._execute_subgraph or node.kwargs:
        return False
    return _fused_arguments(node.args) and all(type(ref) is spec.TaskRef for ref in node.args[3:])


def _fused_arguments(args: tuple) -> bool:
    """`_execute_subgraph`'s arguments: the inner graph, its output key, the input keys,
    then one input (or a reference to one) for each."""
    return (
        len(args) >= 3
        and type(args[0]) is dict
        and isinstance(args[2], tuple | list)
        and len(args) - 3 == len(args[2])
    )


def _run_inner(inner: dict, outkey: object, known: dict) -> object:
    order = depth_first(
        [outkey], lambda key: [dep for dep in inner[key].dependencies if dep in inner]
    )
    readers = Counter(dep for key in order for dep in inner[key].dependencies)
    results = known
    for key in order:
        node = inner[key]
        deps = node.dependencies
        # A dependency found nowhere is left out: the node then raises Dask's own error.
        results[key] = call_node(node, {dep: results[dep] for dep in deps if dep in results})
        for dep in deps:
            readers[dep] -= 1
            if readers[dep] == 0:
                results.pop(dep, None)
    return results[outkey]
