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
import pickletools
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from hashlib import blake2b
from itertools import repeat

import cloudpickle
from dask._task_spec import DataNode, GraphNode, Task, TaskRef

from .coordination import Lock
from .futures import DetachedFuture, Future
from .serialize import (
    CALL,
    DATA,
    NODE,
    PICKLE_FAILURES,
    RESULT_PROTOCOL,
    _function,
    _input,
    compact,
)


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

    def shared(self, blob: bytes) -> int:
        """The id to ship a `SharedObjects` blob under (its content's hash, as a function's):
        the executor unpickles it once and payloads refer to it as to a function."""
        func_id = int.from_bytes(blake2b(blob, digest_size=8).digest(), "little")
        self._blobs.setdefault(func_id, blob)
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

    def calls_submitted(
        self, ids: Sequence[int], funcs_of: list[list[int]]
    ) -> list[tuple[int, bytes]]:
        """`submitted` for new tasks the client holds, task `ids[i]` using `funcs_of[i]`;
        runs of tasks sharing one list object (a `map`'s calls) are noted in bulk."""
        users, task_funcs = self._users, self._task_funcs
        used: set[int] = set()
        start, count = 0, len(funcs_of)
        while start < count:
            funcs = funcs_of[start]
            stop = start + 1
            while stop < count and funcs_of[stop] is funcs:
                stop += 1
            if funcs:
                used.update(funcs)
                task_funcs.update(zip(ids[start:stop], repeat(funcs)))
                for func_id in funcs:
                    users[func_id] = users.get(func_id, 0) + stop - start
            start = stop
        ship = [(func_id, self._blobs[func_id]) for func_id in used - self._shipped]
        self._shipped.update(used)
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

    def __reduce__(self) -> tuple:  # what the payload picklers write, for plain pickle
        return _input, (self.index,)


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
        if cls.__name__ == "ndarray":
            # A broadcast array (scattered, or a graph's literal) travels by its distinct
            # values, as results are stored: `np.broadcast_to(1.0, (8000, 8000))` pickled
            # as it is made a 512 MB payload.
            compacted = compact(obj)
            if compacted is not obj:
                return compacted.__reduce__()
        return self._fallback_reduce(obj)

    def _fallback_reduce(self, obj: object) -> object:
        return NotImplemented


class _PlainPayloadPickler(_PayloadReducer, pickle.Pickler):
    pass


class _CloudPayloadPickler(_PayloadReducer, cloudpickle.Pickler):
    def _fallback_reduce(self, obj: object) -> object:
        return cloudpickle.Pickler.reducer_override(self, obj)


def _simple_call(node: object, dep_keys: list) -> tuple | None:
    """A Dask Task whose arguments are plain values, data nodes and references to its
    inputs, as a call with the references replaced by input placeholders and data nodes by
    their values (what Task.__call__ passes); None for anything else (nested tasks,
    containers of references, data nodes themselves), which travels as the node itself."""
    if type(node) is not Task:
        return None
    index = {key: position for position, key in enumerate(dep_keys)}

    def plain(value: object) -> object:
        if isinstance(value, TaskRef):
            return _Input(index[value.key])
        if type(value) is DataNode:
            return value.value
        if isinstance(value, GraphNode):
            raise LookupError
        return value

    try:
        args = tuple(plain(arg) for arg in node.args)
        kwargs = {name: plain(value) for name, value in node.kwargs.items()}
    except LookupError:
        return None
    return (CALL, node.func, args, kwargs)


# Types plain pickle writes as the payload picklers do (reducer_override never sees the
# builtins; the placeholders reduce as the picklers would write them).
_ATOMIC = frozenset({int, float, complex, str, bytes, bool, type(None), _Input})
_CONTAINERS = frozenset({tuple, list, dict})
# Callables plain pickle writes by name, or that `_FunctionRef` stands for.
_PLAIN_CALLABLES = (types.FunctionType, types.BuiltinFunctionType)
# Callables the payload picklers write by name or ship by id already.
_PLAIN_OBJECTS = (types.FunctionType, types.BuiltinFunctionType, type)
_PLAIN_DEPTH = 4


def _plain_data(value: object, depth: int = 0) -> bool:
    """Whether `value` is builtin data (numbers, strings, bytes, None, numpy's scalars;
    tuples, lists and dicts of them, a few levels deep), which plain pickle writes exactly
    as the payload picklers would: no future, function or lock can be inside."""
    cls = type(value)
    if cls in _ATOMIC or _numpy_scalar(cls):
        return True
    if cls not in _CONTAINERS or depth >= _PLAIN_DEPTH:
        return False
    if cls is dict:
        return all(type(k) in _ATOMIC and _plain_data(v, depth + 1) for k, v in value.items())
    return all(type(v) in _ATOMIC or _plain_data(v, depth + 1) for v in value)


def _numpy_scalar(cls: type) -> bool:
    """A numpy scalar type (np.float64, np.int32, np.datetime64...), which pickles by its
    own reduce, that no payload pickler overrides: `client.map(f, np.arange(30_000))` made
    its payloads in 0.18 s this way, 0.42 s through the payload pickler (and 729 fused
    tasks of the anomaly pipeline take a np.float64). Not np.void, whose fields may hold
    objects."""
    if cls.__module__ != "numpy":
        return False
    numpy = sys.modules["numpy"]
    return issubclass(cls, numpy.generic) and not issubclass(cls, numpy.void)


# Pickle opcodes for payloads put together from pieces (`PayloadEncoder.calls`).
_PROTO_MARK = b"\x80\x05("  # PROTO 5, MARK
_EMPTY_DICT_TUPLE_STOP = b"}t."  # EMPTY_DICT, TUPLE (since MARK), STOP
_FRAME = 0x95


def _pickle_body(pickled: bytes) -> bytes:
    """A protocol-5 pickle without its PROTO, leading FRAME and STOP opcodes, and without
    memo opcodes (none is read back in what this is used for), to go inside another."""
    body = pickletools.optimize(pickled)[2:-1]
    return body[9:] if body[0] == _FRAME else body


class _FunctionRef:
    """Pickles as what the payload picklers write for a function shipped by id (or a
    `SharedObjects` object)."""

    __slots__ = ("_reduced",)

    def __init__(self, func_id: int) -> None:
        self._reduced = (_function, (func_id,))

    def __reduce__(self) -> tuple:
        return self._reduced


_ATOMIC_OR_REF = _ATOMIC | {_FunctionRef}


# A shared object's blob shorter than this is pickled into each payload instead.
SHARED_MIN_BYTES = 200
_SEEN_ONCE = object()
_INLINE = object()


# Callables that only wrap others (never changed once made), which SharedObjects may
# ship once: (module, name) of their types.
_WRAPPERS = {("functools", "partial"), ("toolz.functoolz", "curry"), ("toolz.functoolz", "Compose")}


def _is_subgraph(obj: object) -> bool:
    """A dict of Dask graph nodes (what `_execute_subgraph` runs; it copies, never changes
    it), not data a task might change."""
    return type(obj) is dict and all(isinstance(node, GraphNode) for node in obj.values())


def _is_wrapper(obj: object) -> bool:
    cls = type(obj)
    return (cls.__module__, cls.__qualname__) in _WRAPPERS


class SharedObjects:
    """Objects that many nodes of one graph hold, shipped once and referred to by id (as
    functions are) instead of pickled into every payload: the subgraph that every task of
    a fused blockwise layer runs (`_execute_subgraph`'s first argument, one dict for the
    whole layer: 2.5 KB of each payload of `da.ones(n, chunks=1).map_blocks(f).sum()`),
    and a layer's partial, curry or Compose as the function called.

    An object goes by reference from its second use in one graph submission on (the first
    payload carries it as it is), if its blob has SHARED_MIN_BYTES or more and nothing in
    it is an input of the task. An executor unpickles it once and hands the same object
    to each task, which is why only objects nothing changes go this way (not a dict of
    data, which a task could change for the next one). Its blob may refer to functions
    shipped by id; a payload that uses it lists those too. One per submission: objects
    are known by identity, which holds while the graph holds them."""

    def __init__(self, encoder: PayloadEncoder) -> None:
        self._encoder = encoder
        self._seen: dict[int, object] = {}

    def substitute(self, call: tuple) -> tuple[tuple, list[int]]:
        """The call (CALL, func, args, kwargs) with shared objects by reference, and the
        function ids those references need."""
        kind, func, args, kwargs = call
        needed: list[int] = []
        if not isinstance(func, _PLAIN_OBJECTS):
            func = self._reference(func, needed, _is_wrapper)
        if any(type(arg) is dict for arg in args):
            args = tuple(
                self._reference(arg, needed, _is_subgraph) if type(arg) is dict else arg
                for arg in args
            )
        return (kind, func, args, kwargs), needed

    def _reference(
        self, obj: object, needed: list[int], shareable: Callable[[object], bool]
    ) -> object:
        seen = self._seen.get(id(obj))
        if seen is None:
            self._seen[id(obj)] = _SEEN_ONCE
            return obj
        if seen is _SEEN_ONCE:
            if not shareable(obj):
                self._seen[id(obj)] = seen = _INLINE
                return obj
            blob, deps, funcs = self._encoder.encode(
                obj, futures_as_inputs=False, graphless_arrays=True
            )
            if deps or len(blob) < SHARED_MIN_BYTES:
                seen = _INLINE
            else:
                func_id = self._encoder.registry.shared(blob)
                seen = (_FunctionRef(func_id), [func_id, *funcs])
            self._seen[id(obj)] = seen
        if seen is _INLINE:
            return obj
        reference, func_ids = seen
        needed.extend(func_ids)
        return reference


class PayloadEncoder:
    """Pickles task payloads; collects each payload's input task ids and function ids."""

    def __init__(self, registry: FunctionRegistry) -> None:
        self.registry = registry
        self._function_refs: dict[int, _FunctionRef] = {}

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

    def calls(
        self, func: Callable, kwargs: dict
    ) -> Callable[[list[tuple]], tuple[list[bytes], list[list[int]], list[list[int]]]]:
        """An encoder of many calls func(*args, **kwargs) (`client.map`): takes a list of
        args tuples, returns their payloads, input ids and function ids (one list object
        shared by the calls that have the same). The payloads are those `call` makes; calls
        whose arguments are plain data (`_plain_data`) of a plain function skip the payload
        pickler, about 2 µs instead of 15-20 µs a call."""
        _, deps, funcs = self.call(func, (), kwargs)  # its checks, and func registered
        ref: object = None
        if not deps and isinstance(func, _PLAIN_CALLABLES) and _plain_data(kwargs):
            func_id = self.registry.func_id(func)
            if func_id is None and not funcs:
                ref = func
            elif funcs == [func_id]:
                ref = _FunctionRef(func_id)
        no_deps: list[int] = []
        call = self.call
        dumps = pickle.dumps
        # Without keywords: the payload's pickle is its fixed head, the args' pickle
        # without its protocol, frame and stop opcodes, and a fixed tail: one pickle of a
        # small tuple (0.4 µs) where pickling the whole call writes the function by name
        # again each time (2 µs).
        head = tail = b""
        if ref is not None and not kwargs:
            head = _PROTO_MARK + _pickle_body(dumps(CALL, RESULT_PROTOCOL))
            head += _pickle_body(dumps(ref, RESULT_PROTOCOL))
            tail = _EMPTY_DICT_TUPLE_STOP

        def encode(calls: list[tuple]) -> tuple[list[bytes], list[list[int]], list[list[int]]]:
            payloads: list[bytes] = []
            all_deps: list[list[int]] = []
            all_funcs: list[list[int]] = []
            for args in calls:
                if ref is not None and all(
                    type(arg) in _ATOMIC or _plain_data(arg) for arg in args
                ):
                    if head:
                        pickled = dumps(args, RESULT_PROTOCOL)
                        body = pickled[11:-1] if pickled[2] == _FRAME else pickled[2:-1]
                        payloads.append(b"".join((head, body, tail)))
                    else:
                        payloads.append(dumps((CALL, ref, args, kwargs), RESULT_PROTOCOL))
                    all_deps.append(no_deps)
                    all_funcs.append(funcs)
                else:
                    payload, call_deps, call_funcs = call(func, args, kwargs)
                    payloads.append(payload)
                    all_deps.append(call_deps)
                    all_funcs.append(call_funcs)
            return payloads, all_deps, all_funcs

        return encode

    def node(
        self, node: object, dep_keys: list, shared: SharedObjects | None = None
    ) -> tuple[bytes, list[int], list[int]]:
        # A Dask node names its inputs by key itself; futures in it stay TaskRefs. Most
        # nodes are plain calls, which are cheaper to pickle and to run as such.
        call = _simple_call(node, dep_keys)
        if call is None:
            payload = (NODE, node, dep_keys)
            return self.encode(payload, futures_as_inputs=False, graphless_arrays=True)
        needed: list[int] = []
        if shared is not None:
            call, needed = shared.substitute(call)
        plain = self._plain_call(call)
        if plain is not None:
            payload, funcs = plain
        else:
            payload, _, funcs = self.encode(call, futures_as_inputs=False, graphless_arrays=True)
        for func_id in needed:
            if func_id not in funcs:
                funcs.append(func_id)
        return payload, [], funcs

    def _plain_call(self, call: tuple) -> tuple[bytes, list[int]] | None:
        """(payload, function ids) of a call that plain pickle writes as the payload
        picklers would (a function by name or by id; plain data, input placeholders and
        shared objects' references as arguments), pickled without them: a few µs where the
        pickler costs 10-15. None for any other call."""
        kind, func, args, kwargs = call
        funcs: list[int] = []
        if not isinstance(func, _PLAIN_CALLABLES):
            if type(func) is not _FunctionRef:
                return None
        elif (func.__module__ or "").startswith(_P2P_MODULES):
            return None  # the payload pickler refuses it
        else:
            func_id = self.registry.func_id(func)
            if func_id is not None:
                funcs.append(func_id)
                func = self._function_refs.get(func_id)
                if func is None:
                    func = self._function_refs[func_id] = _FunctionRef(func_id)
        for arg in args:
            if type(arg) not in _ATOMIC_OR_REF and not _plain_data(arg):
                return None
        if kwargs and not _plain_data(kwargs):
            return None
        return pickle.dumps((kind, func, args, kwargs), RESULT_PROTOCOL), funcs

    def data(self, value: object) -> tuple[bytes, list[int], list[int]]:
        return self.encode((DATA, value), futures_as_inputs=False)
