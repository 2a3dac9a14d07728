"""Task payloads as clients pickle them, for executors to unpickle with rankmesh.serialize.

Payloads are pickled with the C pickler. Callables that the executor could not import by
name (lambdas, functions and classes from ``__main__`` or defined inside functions) are
cut out of the payload as references to a function id and shipped as cloudpickle blobs,
once while the client uses them (`FunctionRegistry`); futures in a call's arguments
become references to an input position.
"""

from __future__ import annotations

import io
import pickle
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from hashlib import blake2b

import cloudpickle
from dask._task_spec import GraphNode, Task, TaskRef

from .coordination import Lock
from .futures import DetachedFuture, Future
from .serialize import CALL, DATA, NODE, PICKLE_FAILURES, RESULT_PROTOCOL, _function, _input


def _importable(obj: object) -> bool:
    """Whether pickle-by-name will find this very object in another process."""
    module_name = getattr(obj, "__module__", None)
    if module_name is None or module_name == "__main__":
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    found: object = module
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is obj


class FunctionRegistry:
    """Content ids for callables that must travel by value, and how long the scheduler
    keeps each for this client.

    A function is shipped with the first submit that uses it, and the scheduler keeps it
    for this client until released (and while a task refers to it). The client releases
    it once none of the tasks it holds uses it any more, then ships it again if it is used
    again: closures do not pile up on the scheduler, the workers or here over a session.
    """

    def __init__(self) -> None:
        # id(obj) -> (obj, func_id or None when importable); holding obj keeps id() stable.
        self._known: dict[int, tuple[object, int | None]] = {}
        self._blobs: dict[int, bytes] = {}
        self._objects: dict[int, list[int]] = {}  # func_id -> its keys in _known
        self._shipped: set[int] = set()
        self._users: dict[int, int] = {}  # func_id -> held tasks that use it
        self._task_funcs: dict[int, list[int]] = {}  # held task id -> its func_ids
        self._unused: set[int] = set()  # shipped, no held task uses them: to release
        self._deferred = 0
        self._lock_names: dict[int, tuple[object, str]] = {}

    def func_id(self, obj: object) -> int | None:
        """The id to ship `obj` under, or None when pickle can name it."""
        entry = self._known.get(id(obj))
        if entry is not None:
            if self._unused:  # about to be used again: kept for the submit that uses it
                self._unused.discard(entry[1])
            return entry[1]
        func_id = None
        if not _importable(obj):
            blob = cloudpickle.dumps(obj, protocol=RESULT_PROTOCOL)
            func_id = int.from_bytes(blake2b(blob, digest_size=8).digest(), "little")
            self._blobs.setdefault(func_id, blob)
            self._objects.setdefault(func_id, []).append(id(obj))
        self._known[id(obj)] = (obj, func_id)
        return func_id

    def lock_name(self, lock: object) -> str:
        """The cluster-wide name a thread lock (or a `distributed.Lock`) in a graph takes:
        the same for the same object in every payload of this client."""
        name = getattr(lock, "name", None)
        if isinstance(name, str):  # distributed.Lock: its own name
            return name
        entry = self._lock_names.get(id(lock))
        if entry is None:  # holding the lock keeps its id() from being reused
            entry = self._lock_names[id(lock)] = (lock, f"thread-lock-{uuid.uuid4().hex}")
        return entry[1]

    def submitted(self, tasks: list, held: list[int]) -> list[tuple[int, bytes]]:
        """Notes a submit of `tasks` (tuples of id, deps, func_ids, ...) of which the client
        holds `held`; returns the blobs the scheduler does not have for this client yet."""
        with_funcs = [task for task in tasks if task[2]]
        if not with_funcs:
            return []
        ship = []
        used: set[int] = set()
        for task in with_funcs:
            used.update(task[2])
        for func_id in used - self._shipped:
            self._shipped.add(func_id)
            ship.append((func_id, self._blobs[func_id]))
        held_ids = set(held)
        users, task_funcs = self._users, self._task_funcs
        for task in with_funcs:
            task_id = task[0]
            if task_id in held_ids and task_id not in task_funcs:
                task_funcs[task_id] = funcs = task[2]
                for func_id in funcs:
                    users[func_id] = users.get(func_id, 0) + 1
        self._unused.update(f for f in used if f not in users)
        self._unused.difference_update(users)
        return ship

    def released(self, task_ids: list[int]) -> None:
        """The client released these tasks: their functions lose a user."""
        if not self._task_funcs:
            return
        for task_id in task_ids:
            for func_id in self._task_funcs.pop(task_id, ()):
                count = self._users[func_id] - 1
                if count:
                    self._users[func_id] = count
                else:
                    del self._users[func_id]
                    self._unused.add(func_id)

    def take_unused(self) -> list[int]:
        """Shipped functions no held task uses: forgotten here; the caller releases them on
        the scheduler. Nothing while a graph is being submitted (its chunks share them)."""
        if self._deferred or not self._unused:
            return []
        unused = [f for f in self._unused if f not in self._users]
        self._unused.clear()
        for func_id in unused:
            self._shipped.discard(func_id)
            self._blobs.pop(func_id, None)
            for key in self._objects.pop(func_id, ()):
                self._known.pop(key, None)
        return unused

    @contextmanager
    def deferring_releases(self) -> Iterator[None]:
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1


class _Input:
    """Stands for the value of the task's input at `index` while a payload is pickled."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_DASK_ARRAY = ("dask.array.core", "Array")
_THREAD_LOCKS = (type(threading.Lock()), type(threading.RLock()))
_DISTRIBUTED_LOCK = ("distributed.lock", "Lock")
_P2P_MODULES = ("distributed.shuffle",)


class _PayloadReducer:
    """reducer_override shared by the plain and the cloudpickle payload picklers: functions
    that must travel by value and inputs become calls of `_function` / `_input`. Unlike
    persistent_id it is not called for lists, tuples, dicts, strings and numbers."""

    registry: FunctionRegistry
    futures_as_inputs: bool
    graphless_arrays: bool
    deps: list[int]
    funcs: list[int]
    _dep_index: dict[int, int]

    def reducer_override(self, obj: object) -> object:
        cls = type(obj)
        if cls is _Input:
            return _input, (obj.index,)
        if cls is Future:
            if not self.futures_as_inputs:
                return DetachedFuture, (obj.key,)
            index = self._dep_index.get(obj.task_id)
            if index is None:
                index = self._dep_index[obj.task_id] = len(self.deps)
                self.deps.append(obj.task_id)
            return _input, (index,)
        if cls in _THREAD_LOCKS or (
            cls.__name__ == "Lock" and (cls.__module__, cls.__name__) == _DISTRIBUTED_LOCK
        ):
            # One lock for the whole cluster: the same name wherever it is unpickled.
            return Lock, (self.registry.lock_name(obj),)
        if self.graphless_arrays and (cls.__module__, cls.__name__) == _DASK_ARRAY:
            # What a node holds as an object (xarray's finalize step holds the whole
            # collection) needs its metadata, never its graph: a 500,000-task pipeline
            # made a 30 MB payload that took hundreds of MB to unpickle in the executor.
            return cls, ({}, obj.name, obj.chunks, None, obj._meta)
        if cls is types.FunctionType or isinstance(obj, type):
            if (obj.__module__ or "").startswith(_P2P_MODULES):
                raise NotImplementedError(
                    f"{obj.__module__}.{obj.__qualname__} is part of distributed's P2P "
                    "rechunk/shuffle, which needs distributed's workers: use "
                    "method='tasks' (rankmesh's default for rechunk and shuffle)"
                )
            func_id = self.registry.func_id(obj)
            if func_id is not None:
                if func_id not in self.funcs:
                    self.funcs.append(func_id)
                return _function, (func_id,)
        return self._fallback_reduce(obj)

    def _fallback_reduce(self, obj: object) -> object:
        return NotImplemented


class _PlainPayloadPickler(_PayloadReducer, pickle.Pickler):
    pass


class _CloudPayloadPickler(_PayloadReducer, cloudpickle.Pickler):
    def _fallback_reduce(self, obj: object) -> object:
        return cloudpickle.Pickler.reducer_override(self, obj)


def _simple_call(node: object, dep_keys: list) -> tuple | None:
    """A Dask Task whose arguments are plain values and references to its inputs, as a call
    with those references replaced by input placeholders; None for anything else (nested
    tasks, containers of references, data nodes), which travels as the node itself."""
    if type(node) is not Task:
        return None
    index = {key: position for position, key in enumerate(dep_keys)}

    def plain(value: object) -> object:
        if isinstance(value, TaskRef):
            return _Input(index[value.key])
        if isinstance(value, GraphNode):
            raise LookupError
        return value

    try:
        args = tuple(plain(arg) for arg in node.args)
        kwargs = {name: plain(value) for name, value in node.kwargs.items()}
    except LookupError:
        return None
    return (CALL, node.func, args, kwargs)


class PayloadEncoder:
    """Pickles task payloads; collects each payload's input task ids and function ids."""

    def __init__(self, registry: FunctionRegistry) -> None:
        self.registry = registry

    def encode(
        self, payload: tuple, futures_as_inputs: bool, graphless_arrays: bool = False
    ) -> tuple[bytes, list[int], list[int]]:
        """(payload bytes, input task ids in payload order, function ids it refers to).
        With graphless_arrays, dask arrays inside travel without their graphs."""
        options = (futures_as_inputs, graphless_arrays)
        try:
            return self._encode_with(_PlainPayloadPickler, payload, *options)
        except PICKLE_FAILURES:
            return self._encode_with(_CloudPayloadPickler, payload, *options)

    def _encode_with(
        self, pickler_class: type, payload: tuple, futures_as_inputs: bool, graphless_arrays: bool
    ) -> tuple[bytes, list[int], list[int]]:
        buffer = io.BytesIO()
        pickler = pickler_class(buffer, protocol=RESULT_PROTOCOL)
        pickler.registry = self.registry
        pickler.futures_as_inputs = futures_as_inputs
        pickler.graphless_arrays = graphless_arrays
        pickler.deps = []
        pickler.funcs = []
        pickler._dep_index = {}
        pickler.dump(payload)
        return buffer.getvalue(), pickler.deps, pickler.funcs

    def call(self, func: Callable, args: tuple, kwargs: dict) -> tuple[bytes, list[int], list[int]]:
        return self.encode((CALL, func, args, kwargs), futures_as_inputs=True)

    def node(self, node: object, dep_keys: list) -> tuple[bytes, list[int], list[int]]:
        # A Dask node names its inputs by key itself; futures in it stay TaskRefs. Most
        # nodes are plain calls, which are cheaper to pickle and to run as such.
        payload = _simple_call(node, dep_keys) or (NODE, node, dep_keys)
        return self.encode(payload, futures_as_inputs=False, graphless_arrays=True)

    def data(self, value: object) -> tuple[bytes, list[int], list[int]]:
        return self.encode((DATA, value), futures_as_inputs=False)
