"""Dask graphs and collections as rankmesh task tuples, and results back into Dask's shapes.

Aliases become no task at all: their key maps to their target's task id. Keys outside the
graph must be held by futures (a persisted collection's graph is ``{key: Future}``).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.config
import dask.order
from dask._task_spec import Alias, GraphNode, convert_legacy_graph
from dask.utils import key_split

from ._graph_walk import depth_first
from .futures import Future
from .payloads import PayloadEncoder, SharedObjects
from .task_options import Options, TaskAnnotations

# Task-based methods: the P2P ones Dask picks otherwise only run on distributed workers.
DASK_CONFIG = {"array.rechunk.method": "tasks", "dataframe.shuffle.method": "tasks"}

# dask.order costs about 23 µs per task here (0.75 s for a 32,767-task tree); larger graphs
# take their priorities from the depth-first submission order instead.
ORDER_MAX_TASKS = 5000

Key = Hashable
# (id, dependency ids in payload order, function ids, payload, priority, prefix: its kind,
# as the dashboard and progress bars group tasks)
TaskTuple = tuple[int, list[int], list[int], bytes, int, str]


@dataclass
class GraphTasks:
    # The ids of the tasks submitted (consecutive).
    task_ids: range
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


# Streamed submission: the first chunk is small so workers start at once; later ones grow.
FIRST_CHUNK_TASKS = 256
MAX_CHUNK_TASKS = 8192

# (tasks, held ids, ids to release, restrictions by id, task options by id)
Submit = Callable[
    [list[TaskTuple], list[int], list[int], dict[int, list[int]], dict[int, Options]],
    None,
]


def graph_tasks(
    graph: Mapping[Key, GraphNode],
    outputs: Sequence[Key],
    external: Callable[[Key], int | None],
    next_task_id: Callable[[int], int],
    encoder: PayloadEncoder,
    submit: Submit,
    annotations: TaskAnnotations | None = None,
) -> GraphTasks:
    """Encodes what `outputs` need, in dependency order, and hands it to
    `submit(tasks, wanted, release)` in chunks while the rest is still being encoded, so
    the cluster starts working early.

    A submitted task whose dependents are not all submitted yet is held (`wanted`) so the
    scheduler keeps its result; once its last dependent goes out, it is listed in that
    chunk's `release` (unless it is an output). `external(key)` gives the task id of a key
    outside the graph (held by a future) or None. `annotations` give tasks their user
    priority, worker restrictions and retries.
    """
    submission = _depth_first(graph, outputs, external)
    use_order = len(graph) <= ORDER_MAX_TASKS
    priority = dask.order.order(graph) if use_order else None
    output_keys = {_task_key(graph, key) for key in outputs}
    # Dependents of each task not submitted yet (counted down as they go out).
    unsubmitted_dependents: dict[Key, int] = {}
    for key in submission:
        node = graph.get(key)
        if node is None or type(node) is Alias:
            continue
        unsubmitted_dependents[key] = 0
        for dep in _inputs(graph, node):
            if dep in unsubmitted_dependents:  # submitted before: its dependents come after
                unsubmitted_dependents[dep] += 1
    first_id = next_task_id(len(unsubmitted_dependents)) if unsubmitted_dependents else 0
    next_id = first_id
    shared = SharedObjects(encoder)
    split_names: dict[str, str] = {}  # key_split of tuple keys' names, worked out once each

    key_ids: dict[Key, int] = {}
    tasks: list[TaskTuple] = []
    chunk_keys: list[Key] = []
    chunk_first_id = first_id  # earlier ids went out with earlier chunks
    release: list[int] = []
    restrictions: dict[int, list[int]] = {}
    options: dict[int, Options] = {}
    chunk_size = FIRST_CHUNK_TASKS

    def flush() -> None:
        held = [
            key_ids[key]
            for key in chunk_keys
            if key in output_keys or unsubmitted_dependents[key] > 0
        ]
        submit(tasks[:], held, release[:], restrictions, options)
        tasks.clear()
        chunk_keys.clear()
        release.clear()
        restrictions.clear()
        options.clear()

    for position, key in enumerate(submission):
        node = graph.get(key)
        if node is None:
            key_ids[key] = external(key)  # checked by _depth_first
            continue
        if type(node) is Alias:
            key_ids[key] = key_ids[node.target]
            continue
        dep_keys = list(node.dependencies)
        payload, _, funcs = encoder.node(node, dep_keys, shared)
        task_id = key_ids[key] = next_id
        next_id += 1
        task_priority = priority[key] if use_order else position
        if annotations:
            task_priority = annotations.priority(key, task_priority)
            workers = annotations.restriction(key)
            if workers is not None:
                restrictions[task_id] = workers
            task_options = annotations.options(key)
            if task_options is not None:
                options[task_id] = task_options
        dep_ids = [key_ids[dep] for dep in dep_keys]
        if type(key) is tuple and type(key[0]) is str:
            prefix = split_names.get(key[0])
            if prefix is None:
                prefix = split_names[key[0]] = key_split(key)
        else:
            prefix = key_split(key)
        tasks.append((task_id, dep_ids, funcs, payload, task_priority, prefix))
        chunk_keys.append(key)
        for dep in _inputs(graph, node):
            if dep in unsubmitted_dependents:
                unsubmitted_dependents[dep] -= 1
                if unsubmitted_dependents[dep] == 0 and dep not in output_keys:
                    if key_ids[dep] < chunk_first_id:  # held by an earlier chunk
                        release.append(key_ids[dep])
        if len(chunk_keys) >= chunk_size:
            flush()
            chunk_first_id = next_id
            chunk_size = min(2 * chunk_size, MAX_CHUNK_TASKS)
    if chunk_keys or release:
        flush()
    return GraphTasks(range(first_id, next_id), key_ids)


def _inputs(graph: Mapping[Key, GraphNode], node: GraphNode) -> frozenset[Key] | set[Key]:
    """The keys of the tasks whose results `node` reads: its dependencies, aliases followed
    (the node's own set when none is an alias, as for nearly every node)."""
    deps = node.dependencies
    for dep in deps:
        if type(graph.get(dep)) is Alias:
            return {_task_key(graph, dep) for dep in deps}
    return deps


def _task_key(graph: Mapping[Key, GraphNode], key: Key) -> Key:
    """The key of the task behind `key`, following aliases."""
    node = graph.get(key)
    while type(node) is Alias:
        key = node.target
        node = graph.get(key)
    return key


def _depth_first(
    graph: Mapping[Key, GraphNode], outputs: Sequence[Key], external: Callable[[Key], int | None]
) -> list[Key]:
    """Keys reachable from `outputs`, each after its dependencies; a key outside the graph
    must be held by a future (`external`)."""

    def dependencies(key: Key) -> Iterable[Key]:
        node = graph.get(key)
        if node is not None:
            return node.dependencies
        if external(key) is None:
            raise KeyError(f"{key!r} is neither in the graph nor held by a future")
        return ()

    return depth_first(outputs, dependencies)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a submission builds millions of objects
    that stay alive (Dask's graph, the client's futures), back as it was afterwards, once
    the last of the submissions running at once (in several threads) ends. Each full
    collection walks every object alive: with it on, half of the CPU time of building a
    200,000-task Dask graph went to collections that found nothing to free. Objects that
    become cyclic garbage meanwhile (in any thread) wait for the next collection."""
    _gc_pauses.enter()
    try:
        yield
    finally:
        _gc_pauses.leave()


@dataclass
class _GcPauses:
    """The submissions running now, and whether the collector was on before the first."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    enabled_before: bool = False

    def enter(self) -> None:
        with self.lock:
            if self.running == 0:
                self.enabled_before = gc.isenabled()
                gc.disable()
            self.running += 1

    def leave(self) -> None:
        with self.lock:
            self.running -= 1
            if self.running == 0 and self.enabled_before:
                gc.enable()


_gc_pauses = _GcPauses()


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
