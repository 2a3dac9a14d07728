"""Bytes in and out of tasks, as executors see them: task payloads unpickled and run,
results, errors. Clients pickle payloads with rankmesh.payloads.

Results use pickle protocol 5 with out-of-band buffers so array data is never copied into
the pickle stream. Executors import this module at start-up, so what only some tasks need
(cloudpickle, tblib) is imported when first needed.
"""

from __future__ import annotations

import pickle
import sys
import threading
import traceback
from collections.abc import Sequence

from ._layout import object_offsets
from .errors import KilledWorker, TaskError
from .fused import call, call_node

# Anything with the buffer protocol (bytes, bytearray, memoryview, mmap).
Buffer = bytes | bytearray | memoryview

# Payload kinds: the first item of every unpickled payload tuple.
CALL = 0  # (CALL, func, args, kwargs): func(*args, **kwargs), futures replaced by values
NODE = 1  # (NODE, node, dep_keys): a Dask graph node run as node(dict(zip(dep_keys, inputs)))
DATA = 2  # (DATA, value): scattered data

RESULT_PROTOCOL = 5

# Errors plain pickle raises for objects that cloudpickle may still handle.
PICKLE_FAILURES = (pickle.PicklingError, AttributeError, TypeError)


# What the payload being unpickled refers to; set around each load (executors run one
# task at a time, the thread-local only guards in-process use such as tests).
_loading = threading.local()


def _input(index: int) -> object:
    return _loading.inputs[index]


def _function(func_id: int) -> object:
    return _loading.functions[func_id]


class Functions(dict):
    """An executor's callables (and shared objects) by function id. A blob is unpickled
    when it arrives, or, where it refers to one not here yet (a shared subgraph calling a
    function shipped with it), when a payload or another blob first uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.blobs: dict[int, bytes] = {}

    def add(self, blobs: Sequence[tuple[int, bytes]]) -> None:
        for func_id, blob in blobs:
            if func_id not in self:
                self.blobs[func_id] = blob
        for func_id, _ in blobs:
            if func_id in self.blobs:
                try:
                    self[func_id]
                except Exception:  # noqa: BLE001 - tried again, and reported, when used
                    pass

    def release(self, func_ids: Sequence[int]) -> None:
        for func_id in func_ids:
            self.pop(func_id, None)
            self.blobs.pop(func_id, None)

    def __missing__(self, func_id: int) -> object:
        blob = self.blobs[func_id]
        previous = getattr(_loading, "functions", None)
        _loading.functions = self
        try:
            value = pickle.loads(blob)
        finally:
            _loading.functions = previous
        del self.blobs[func_id]
        self[func_id] = value
        return value


def loads_payload(payload: Buffer, functions: dict[int, object], inputs: Sequence[object]):
    """Unpickles a payload, resolving function ids and input placeholders."""
    _loading.functions = functions
    _loading.inputs = inputs
    try:
        return pickle.loads(payload)
    finally:
        _loading.inputs = ()


def run_payload(payload: tuple, inputs: Sequence[object]) -> object:
    """Runs an unpickled payload; `inputs` are the values of its dependencies in order."""
    kind = payload[0]
    if kind == CALL:
        _, func, args, kwargs = payload
        return call(func, args, kwargs)
    if kind == NODE:
        _, node, dep_keys = payload
        return call_node(node, dict(zip(dep_keys, inputs, strict=True)))
    if kind == DATA:
        return payload[1]
    raise ValueError(f"unknown payload kind {kind!r}")


# ------------------------------------------------------------------------------ results


def payload_name(payload: tuple) -> str:
    """What a payload runs, for messages: the Dask key of a graph node, else the function."""
    if payload[0] == NODE:
        return repr(payload[1].key)
    if payload[0] == CALL:
        return getattr(payload[1], "__qualname__", type(payload[1]).__name__)
    return "scattered data"


def storable(value: object) -> object:
    """`value` as a result is stored: itself, or where it is a numpy array laid out in
    neither C nor Fortran order an equal array that pickles its data out of band:
    - a strided view (a slice across the fast axes, a transpose's chunk): a C-ordered
      copy. numpy pickles such a view's data into the pickle stream, copied twice on the
      way in and unpickled into a new copy by every task that reads it, where a
      contiguous array's data leaves out of band and the executor's own readers share
      the object (0.89 and 0.13 ms for a 1.75 MB view against one 0.25 ms copy). The view
      no longer keeps the array it was cut from alive. `distributed` makes the same copy.
    - a broadcast array (zero strides: a chunk of `da.zeros`, `ones` or `full` is a scalar
      broadcast to the chunk's shape): its distinct values, broadcast again, which
      `dumps_result` stores alone (`_Broadcast`), as `distributed` ships them. Pickled as
      it was, it was written out whole. Readers get a read-only view, as under the
      threaded scheduler."""
    if not _numbers_array(value):
        return value
    import numpy

    if _broadcast(value):
        return numpy.broadcast_to(_distinct_values(value), value.shape)
    if value.flags.c_contiguous or value.flags.f_contiguous:
        return value
    return numpy.ascontiguousarray(value)


def _numbers_array(value: object) -> bool:
    """Whether `value` is a numpy array (not a subclass) of plain values, not objects;
    numpy is not imported for the question."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(value) is numpy.ndarray and not value.dtype.hasobject


def _broadcast(array: object) -> bool:
    """Whether an axis of more than one element repeats one (its stride is 0); numpy
    gives an axis of one element any stride, 0 too."""
    return any(
        stride == 0 and length > 1
        for stride, length in zip(array.strides, array.shape, strict=True)
    )


def _distinct_values(array: object) -> object:
    """The values of a broadcast array along its broadcast axes' first index, contiguous
    (a view where they already are)."""
    import numpy

    first = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in array.strides)
    return numpy.ascontiguousarray(array[first])


class _Broadcast:
    """Pickles as `numpy.broadcast_to(values, shape)`."""

    __slots__ = ("values", "shape")

    def __init__(self, values: object, shape: tuple[int, ...]) -> None:
        self.values = values
        self.shape = shape

    def __reduce__(self) -> tuple:
        import numpy

        return numpy.broadcast_to, (self.values, self.shape)


def compact(obj: object) -> object:
    """`obj`, or a `_Broadcast` of it where it is a numpy array broadcast along an axis:
    numpy pickles such a view by copying out every element it shows."""
    if _numbers_array(obj) and _broadcast(obj):
        return _Broadcast(_distinct_values(obj), obj.shape)
    return obj


def dumps_result(obj: object, task: str = "the task") -> tuple[list[Buffer], list[int]]:
    """Frames (pickle stream, then out-of-band buffers) and their lengths. A result that
    cannot be pickled raises TypeError naming `task` and the result's type."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps(
            compact(obj), protocol=RESULT_PROTOCOL, buffer_callback=buffers.append
        )
    except PICKLE_FAILURES:
        import cloudpickle

        buffers = []
        try:
            stream = cloudpickle.dumps(
                obj, protocol=RESULT_PROTOCOL, buffer_callback=buffers.append
            )
        except PICKLE_FAILURES as e:
            kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
            raise TypeError(
                f"the result of {task} is a {kind}, which cannot leave the executor process "
                f"that made it ({e}); every rankmesh result is pickled. Return a picklable "
                "value instead (a list rather than a generator, data rather than an open file)"
            ) from e
    frames: list[Buffer] = [stream]
    frames.extend(buffer.raw() for buffer in buffers)
    return frames, [memoryview(frame).nbytes for frame in frames]


def padded_frames(frames: list[Buffer], layout: list[int]) -> list[Buffer]:
    """The frames with the zero padding between them that object_offsets lays out."""
    offsets, total = object_offsets(layout)
    pieces: list[Buffer] = []
    end = 0
    for frame, start, length in zip(frames, offsets, layout, strict=True):
        if start > end:
            pieces.append(bytes(start - end))
        pieces.append(frame)
        end = start + length
    if total > end:
        pieces.append(bytes(total - end))
    return pieces


def join_frames(frames: list[Buffer], layout: list[int]) -> bytes:
    """The frames as one aligned block, for results that travel inline."""
    return b"".join(padded_frames(frames, layout))


def loads_frames(stream: Buffer, buffers: Sequence[Buffer]) -> object:
    return pickle.loads(stream, buffers=buffers)


def loads_result(data: Buffer, layout: list[int]) -> object:
    """Reads an object laid out by object_offsets without copying its buffers: arrays
    point into `data` (and are writable where `data` is)."""
    offsets, _ = object_offsets(layout)
    view = memoryview(data)
    frames = [view[start : start + length] for start, length in zip(offsets, layout, strict=True)]
    return pickle.loads(frames[0], buffers=frames[1:])


# ------------------------------------------------------------------------------- errors


def dumps_error(exc: BaseException, skip_files: Sequence[str] = ()) -> tuple[str, str, str, bytes]:
    """(type name, message, traceback text, pickled (exception, frames) or b"").

    Frames from `skip_files` (the executor's own) are left out of the traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in skip_files:
        tb = tb.tb_next
    exc = exc.with_traceback(tb)
    cls = type(exc)
    type_name = cls.__qualname__
    if cls.__module__ != "builtins":
        type_name = f"{cls.__module__}.{type_name}"
    text = "".join(traceback.format_exception(exc))
    try:
        import cloudpickle
        import tblib

        tb_dict = tblib.Traceback(tb).to_dict() if tb is not None else None
        # cloudpickle: classes the task itself received by value go back the same way
        # and resolve to the client's own class there.
        pickled = cloudpickle.dumps((exc, tb_dict), protocol=RESULT_PROTOCOL)
        pickle.loads(pickled)  # an exception whose __init__ does not match its args fails here
    except Exception:
        pickled = b""
    return type_name, str(exc), text, pickled


def loads_error(error: tuple[str, str, str, bytes]) -> BaseException:
    """The task's exception with the task's frames as its traceback, else a TaskError."""
    type_name, message, text, pickled = error
    if pickled:
        try:
            exc, tb_dict = pickle.loads(pickled)
        except Exception:
            pass
        else:
            if tb_dict is not None:
                import tblib

                exc = exc.with_traceback(tblib.Traceback.from_dict(tb_dict).as_traceback())
            return exc
    if type_name == "KilledWorker":  # raised by the scheduler, not by task code
        return KilledWorker(message)
    return TaskError(type_name, message, text)
