"""Dask graphs and collections as rankmesh task tuples, and results back into Dask's shapes.

Aliases become no task at all: their key maps to their target's task id. Keys outside the
graph must be held by futures (a persisted collection's graph is ``{key: Future}``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.config
import dask.order
from dask._task_spec import Alias, GraphNode, convert_legacy_graph

from .futures import Future
from .serialize import PayloadEncoder

# Task-based methods: the P2P ones Dask picks otherwise only run on distributed workers.
DASK_CONFIG = {"array.rechunk.method": "tasks", "dataframe.shuffle.method": "tasks"}

# dask.order costs about 23 µs per task here (0.75 s for a 32,767-task tree); larger graphs
# take their priorities from the depth-first submission order instead.
ORDER_MAX_TASKS = 5000

Key = Hashable
# (id, dependency ids in payload order, function ids, payload, priority)
TaskTuple = tuple[int, list[int], list[int], bytes, int]


@dataclass
class GraphTasks:
    tasks: list[TaskTuple]
    # The task id behind every key the outputs need, aliases and futures' keys included.
    key_ids: dict[Key, int]


def materialize(dsk: Any) -> tuple[dict[Key, GraphNode], dict[Key, int]]:
    """Nodes of what `dask.compute` hands a scheduler (a Mapping or an expression), and the
    task ids of keys held by futures inside it."""
    if not isinstance(dsk, Mapping):
        dsk = _unculled_delayed_graph(dsk) or dsk.__dask_graph__()
    held = {value.key: value.task_id for value in dsk.values() if type(value) is Future}
    # convert_legacy_graph drops {key: Future(key)} entries: those keys become external.
    return convert_legacy_graph(dsk), held


def _unculled_delayed_graph(expr: Any) -> dict | None:
    """The graph of a dask.delayed computation as it stands, else None.

    Dask's only optimization of delayed graphs is a cull, which costs ~40 µs per task in
    HighLevelGraph.cull; graph_tasks submits only what the outputs reach, which is the
    same cull for a fraction of the cost."""
    import sys

    from dask._expr import HLGExpr, _HLGExprSequence

    delayed_optimize = sys.modules["dask.delayed"].optimize
    if type(expr) is not _HLGExprSequence or dask.config.get("optimization.fuse.delayed"):
        return None
    merged: dict = {}
    for operand in expr.operands:
        if type(operand) is not HLGExpr or operand.low_level_optimizer is not delayed_optimize:
            return None
        merged.update(operand.hlg.to_dict())
    return merged


def flatten_keys(keys: Any) -> list[Key]:
    """Keys of a (nested) list of keys, as Dask's `get` takes them; tuples are keys."""
    if not isinstance(keys, list):
        return [keys]
    flat: list[Key] = []
    for item in keys:
        flat.extend(flatten_keys(item))
    return flat


def repack(keys: Any, values: Mapping[Key, Any]) -> Any:
    """Values in the nesting of `keys` (lists nest; anything else is a key)."""
    if isinstance(keys, list):
        return [repack(item, values) for item in keys]
    return values[keys]


def graph_tasks(
    graph: Mapping[Key, GraphNode],
    outputs: Sequence[Key],
    external: Callable[[Key], int | None],
    next_task_id: Callable[[int], int],
    encoder: PayloadEncoder,
) -> GraphTasks:
    """Task tuples for what `outputs` need, in dependency order.

    `external(key)` gives the task id of a key outside the graph (held by a future) or None.
    """
    submission = _depth_first(graph, outputs, external)
    key_ids: dict[Key, int] = {}
    runnable = [key for key in submission if key in graph and type(graph[key]) is not Alias]
    next_id = next_task_id(len(runnable)) if runnable else 0
    if len(graph) <= ORDER_MAX_TASKS:
        priority = dask.order.order(graph)
    else:
        priority = {key: position for position, key in enumerate(submission)}
    tasks: list[TaskTuple] = []
    for key in submission:
        node = graph.get(key)
        if node is None:
            key_ids[key] = external(key)  # checked by _depth_first
            continue
        if type(node) is Alias:
            key_ids[key] = key_ids[node.target]
            continue
        dep_keys = list(node.dependencies)
        payload, _, funcs = encoder.node(node, dep_keys)
        task_id = key_ids[key] = next_id
        next_id += 1
        tasks.append((task_id, [key_ids[dep] for dep in dep_keys], funcs, payload, priority[key]))
    return GraphTasks(tasks, key_ids)


def _depth_first(
    graph: Mapping[Key, GraphNode], outputs: Sequence[Key], external: Callable[[Key], int | None]
) -> list[Key]:
    """Keys reachable from `outputs`, each after its dependencies, finishing one branch
    before starting the next (what keeps memory low without dask.order)."""
    order: list[Key] = []
    done: set[Key] = set()
    entered: set[Key] = set()
    stack: list[tuple[Key, bool]] = [(key, False) for key in reversed(outputs)]
    while stack:
        key, children_done = stack.pop()
        if children_done:
            done.add(key)
            order.append(key)
            continue
        if key in entered:
            continue
        entered.add(key)
        node = graph.get(key)
        if node is None:
            if external(key) is None:
                raise KeyError(f"{key!r} is neither in the graph nor held by a future")
            done.add(key)
            order.append(key)
            continue
        stack.append((key, True))
        stack.extend((dep, False) for dep in node.dependencies if dep not in entered)
    return order


# --------------------------------------------------------------------------- collections


def compute_expression(collections: Sequence[Any], optimize_graph: bool = True) -> tuple[Any, list]:
    """The expression computing each collection's final value, and one key per collection."""
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr

    expr = FinalizeCompute(collections_to_expr(collections, optimize_graph)).optimize()
    return expr, [flatten_keys(keys)[0] for keys in expr.__dask_keys__()]


def persist_expression(
    collections: Sequence[Any], optimize_graph: bool = True
) -> tuple[Any, list[list[Key]], Callable[[Mapping[Key, Any]], list]]:
    """The expression for `collections`, the keys of each, and a function rebuilding the
    collections from {key: value-or-future} (after dask.base.persist)."""
    from dask._expr import CompositeExpr, _ExprSequence
    from dask.base import _rebuild_composite_collection, collections_to_expr

    expr = collections_to_expr(collections, optimize_graph)
    composite = any(
        isinstance(operand, CompositeExpr)
        for operand in (expr.operands if isinstance(expr, _ExprSequence) else [expr])
    )
    expr = expr.optimize()
    optimized = list(expr.operands) if isinstance(expr, _ExprSequence) else [expr]
    if not composite or len(optimized) != len(collections):
        optimized = [None] * len(collections)
    keys = [flatten_keys(keys) for keys in expr.__dask_keys__()]

    def rebuild(values: Mapping[Key, Any]) -> list:
        rebuilt = []
        for collection, collection_expr, collection_keys in zip(
            collections, optimized, keys, strict=True
        ):
            if isinstance(collection_expr, CompositeExpr):
                rebuilt.append(
                    _rebuild_composite_collection(
                        collection, collection_expr, values, cull_to_child_keys=True
                    )
                )
            else:
                function, state = collection.__dask_postpersist__()
                rebuilt.append(function({key: values[key] for key in collection_keys}, *state))
        return rebuilt

    return expr, keys, rebuild
