"""Payloads, results and errors round-trip through rankmesh.payloads, rankmesh.serialize
and the executor's task runner, without a cluster."""

import fcntl
import operator
import os
import pickle
import threading
import traceback
import weakref

import numpy as np
import pytest
from rankmesh import TaskError, executor
from rankmesh._layout import ALIGN, INLINE_MAX, object_offsets
from rankmesh.executor import KEEP_FROM, TaskRunner, decode_input
from rankmesh.payloads import FunctionRegistry, PayloadEncoder
from rankmesh.serialize import (
    dumps_error,
    dumps_result,
    join_frames,
    loads_error,
    loads_payload,
    loads_result,
    run_payload,
    storable,
)


class FakeFuture:
    """Stands in for rankmesh.Future where only its type and task id matter."""


@pytest.fixture
def encoder(monkeypatch):
    # reducer_override compares the exact type; point it at a Future that needs no client.
    import rankmesh.payloads

    monkeypatch.setattr(rankmesh.payloads, "Future", FakeFuture)
    return PayloadEncoder(FunctionRegistry())


def future(task_id):
    f = FakeFuture()
    f.task_id = task_id
    return f


def submitted(encoder, funcs, task_id=1, held=True):
    """What a client ships with the submit of one task that uses `funcs`."""
    return encoder.registry.submitted([(task_id, [], funcs, b"", 0)], [task_id] if held else [])


def executor_functions(encoder, funcs):
    runner = TaskRunner("/nonexistent", "test")
    runner.add_functions(submitted(encoder, funcs))
    return runner.functions


def roundtrip_call(encoder, func, args, kwargs, inputs=()):
    payload, deps, funcs = encoder.call(func, args, kwargs)
    functions = executor_functions(encoder, funcs)
    assert set(funcs) <= set(functions)
    return run_payload(loads_payload(payload, functions, list(inputs)), list(inputs)), deps


def test_lambda_travels_as_a_function_id(encoder):
    offset = 5
    result, deps = roundtrip_call(encoder, lambda x, y=0: x * 2 + y + offset, (10,), {"y": 1})
    assert result == 26
    assert deps == []


def test_local_function_and_class_travel_by_value(encoder):
    class Point:
        def __init__(self, x):
            self.x = x

    def norm(point):
        return abs(point.x)

    result, _ = roundtrip_call(encoder, norm, (Point(-3),), {})
    assert result == 3


def test_a_function_ships_once_while_a_held_task_uses_it(encoder):
    def double(x):
        return 2 * x

    _, _, funcs = encoder.call(double, (1,), {})
    assert [func_id for func_id, _ in submitted(encoder, funcs, task_id=1)] == funcs
    _, _, again = encoder.call(double, (2,), {})
    assert again == funcs
    assert submitted(encoder, funcs, task_id=2) == [], "the scheduler still has it"
    encoder.registry.released([1])
    assert encoder.registry.take_unused() == [], "task 2 still uses it"
    encoder.registry.released([2])
    # Encoded again before the release went out: kept, so the next submit may use it.
    encoder.call(double, (3,), {})
    assert encoder.registry.take_unused() == []
    assert submitted(encoder, funcs, task_id=3, held=False) == []
    # Used by no held task: released, then shipped again when used again.
    assert encoder.registry.take_unused() == funcs
    _, _, later = encoder.call(double, (4,), {})
    assert later == funcs
    assert [func_id for func_id, _ in submitted(encoder, funcs, task_id=4)] == funcs


def test_graph_chunks_share_functions_until_the_graph_is_submitted(encoder):
    def double(x):
        return 2 * x

    _, _, funcs = encoder.call(double, (1,), {})
    with encoder.registry.deferring_releases():
        assert submitted(encoder, funcs, task_id=1, held=False) != []
        assert encoder.registry.take_unused() == [], "a later chunk may use it"
        assert submitted(encoder, funcs, task_id=2, held=False) == []
    assert encoder.registry.take_unused() == funcs


def test_importable_functions_travel_by_name(encoder):
    _, _, funcs = encoder.call(np.add, (1, 2), {})
    payload, _, funcs2 = encoder.call(traceback.format_exc, (), {})
    assert funcs == funcs2 == []
    assert submitted(encoder, funcs) == []


def test_futures_become_inputs_in_payload_order(encoder):
    a, b = future(101), future(202)
    result, deps = roundtrip_call(
        encoder,
        lambda xs, d: (xs, d),
        ([b, (a, b)],),
        {"d": {"k": a}},
        inputs=["B", "A"],
    )
    assert deps == [202, 101]
    assert result == (["B", ("A", "B")], {"k": "A"})


def pack(*values):
    return values


def test_numpy_scalars_are_plain_data_that_skips_the_payload_pickler(encoder, monkeypatch):
    """A call of a Dask node or of client.map with numpy scalars among its arguments is
    pickled as a plain call (2.3x faster for client.map here) and runs the same; a
    structured scalar (np.void) still goes through the payload pickler."""
    from dask._task_spec import Task, TaskRef

    args = (np.float64(0.5), np.int32(-3), np.bool_(True), np.datetime64("2026-12-06"))
    node = Task("out", operator.add, TaskRef("x"), np.float64(0.25))
    encode_map = encoder.calls(pack, {})  # pickles one call itself, to check the function
    slow_calls = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: slow_calls.append(a) or encode(*a, **k))
    payload, _, funcs = encoder.node(node, ["x"])
    map_payloads, _, map_funcs = encode_map([args])
    assert slow_calls == [], "a numpy scalar sent a call through the payload pickler"
    functions = executor_functions(encoder, funcs)
    assert run_payload(loads_payload(payload, functions, [1.0]), [1.0]) == 1.25
    call = loads_payload(map_payloads[0], executor_functions(encoder, map_funcs[0]), [])
    assert run_payload(call, []) == args
    void = np.zeros(1, dtype=[("a", "i4")])[0]
    encoder.node(Task("out", operator.add, TaskRef("x"), void), ["x"])
    assert len(slow_calls) == 1


def test_what_plain_pickle_rejects_falls_back_to_cloudpickle(encoder):
    with pytest.raises(TypeError):
        pickle.dumps(property(abs))
    result, _ = roundtrip_call(encoder, lambda p: p.fget(-4), (property(abs),), {})
    assert result == 4


def test_result_layout_offsets_are_aligned():
    offsets, total = object_offsets([10, 64, 0, 65, 1])
    assert offsets == [0, 64, 128, 128, 256]
    assert total == 320
    assert all(offset % ALIGN == 0 for offset in offsets)


def test_numpy_result_buffers_are_out_of_band_and_zero_copy():
    array = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    frames, layout = dumps_result({"a": array, "n": 3})
    assert len(frames) == 2  # pickle stream + the array's buffer
    assert layout[1] == array.nbytes
    data = bytearray(join_frames(frames, layout))
    back = loads_result(data, layout)
    np.testing.assert_array_equal(back["a"], array)
    assert back["n"] == 3
    assert back["a"].flags.writeable
    # The array points into `data`: writing it shows in the buffer.
    back["a"][0, 0] = 42.0
    start = object_offsets(layout)[0][1]
    assert np.frombuffer(data, dtype=np.float64, count=1, offset=start)[0] == 42.0


def test_read_only_buffer_gives_read_only_arrays():
    frames, layout = dumps_result(np.ones(100))
    back = loads_result(join_frames(frames, layout), layout)
    assert not back.flags.writeable


def test_runner_stores_small_results_inline_and_large_ones_in_shared_memory(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "7")
    small = np.arange(10)
    large = np.arange(INLINE_MAX, dtype=np.int64)  # 8 x INLINE_MAX bytes
    for value, kind in ((small, "inline"), (large, "shm")):
        payload, _, funcs = encoder.data(value)
        task_id, duration_us, status, stored = runner.run(1, payload, [])
        assert status == "ok" and duration_us >= 0
        assert stored[0] == kind
        back = decode_input(stored)
        np.testing.assert_array_equal(back, value)
        assert back.flags.writeable
    assert stored[1] == str(tmp_path / "7-1")
    # Copy-on-write: writing the task's view leaves the stored object intact.
    back[0] = -1
    np.testing.assert_array_equal(decode_input(stored), large)


def test_runner_writes_a_large_result_into_a_free_segment_of_its_size(tmp_path, encoder):
    """The worker keeps released segments in free/<size>/; a result of that size takes
    one (renamed to the executor's name, its pages reused), others get new files."""
    runner = TaskRunner(str(tmp_path), "7")
    value = np.arange(INLINE_MAX, dtype=np.int64)
    payload, _, _ = encoder.data(value)
    stored = runner.run(1, payload, [])[3]
    size = os.path.getsize(stored[1])
    free = tmp_path / "free" / str(size)
    free.mkdir(parents=True)
    segment = free / "1"
    segment.write_bytes(b"\xff" * size)
    inode = segment.stat().st_ino
    other = tmp_path / "free" / str(size + 64)
    other.mkdir()
    (other / "2").write_bytes(b"\xff" * (size + 64))
    stored = runner.run(2, payload, [])[3]
    assert stored[1] == str(tmp_path / "7-2")
    assert os.stat(stored[1]).st_ino == inode and not segment.exists()
    np.testing.assert_array_equal(decode_input(stored), value)
    # None of that size left: a new file; the other size's segment is untouched.
    stored = runner.run(3, payload, [])[3]
    assert os.stat(stored[1]).st_ino != inode
    np.testing.assert_array_equal(decode_input(stored), value)
    assert (other / "2").exists()


def test_runner_passes_inputs_to_calls(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "1")
    frames, layout = dumps_result(np.arange(5))
    stored = ("inline", join_frames(frames, layout), layout)
    payload, deps, funcs = encoder.call(np.sum, (future(9),), {})
    runner.add_functions(submitted(encoder, funcs))
    _, _, status, result = runner.run(2, payload, [stored])
    assert status == "ok"
    assert decode_input(result) == 10


def locked_by_other(path):
    """Whether an exclusive lock on the file at `path` is refused (as the worker's pool
    asks before it reuses a segment)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also gives up the lock just taken
    return False


def locked_by_another(array):
    """Whether an exclusive lock on the file behind `array`'s memory is refused."""
    return locked_by_other(
        next(line.split()[-1] for line in open("/proc/self/maps") if "/7-1" in line)
    )


def add_in_place(array):
    array += 1
    return float(array[0])


def mapped_paths():
    """Files of this test's objects mapped here (a removed one still, while mapped)."""
    fields = (line.rstrip("\n").split(maxsplit=5) for line in open("/proc/self/maps"))
    return {f[5].removesuffix(" (deleted)") for f in fields if len(f) == 6 and "/7-" in f[5]}


def test_inputs_stay_mapped_between_tasks_locked_only_while_one_runs(
    tmp_path, encoder, monkeypatch
):
    runner = TaskRunner(str(tmp_path), "7")
    payload, _, _ = encoder.data(np.zeros(INLINE_MAX))  # 8 x INLINE_MAX bytes
    _, _, _, stored = runner.run(1, payload, [])
    path = stored[1]
    assert path == str(tmp_path / "7-1") and path not in mapped_paths()

    def call(func):
        payload, _, funcs = encoder.call(func, (future(1),), {})
        runner.add_functions(submitted(encoder, funcs))
        status, value = runner.run(2, payload, [stored])[2:]
        assert status == "ok", value
        return decode_input(value)

    assert call(locked_by_another) is True, "locked while a task reads it"
    assert path in mapped_paths(), "kept mapped after the task"
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not locked between tasks
    os.close(fd)
    # Tasks on this executor share the kept pages (as tasks of a Dask worker share an
    # object); the stored object stays as it was.
    assert call(add_in_place) == 1.0
    assert call(add_in_place) == 2.0
    assert np.all(decode_input(stored) == 0)
    # The worker lets the object go (its file removed or recycled): unmapped on its notice.
    runner.inputs.forget_gone()
    assert path in mapped_paths()
    os.unlink(path)
    # Before a batch it looks only if it has not looked lately (a stat per kept file).
    monkeypatch.setattr(executor, "GONE_CHECK_INTERVAL_S", 3600.0)
    runner.inputs.forget_gone_lately()
    assert path in mapped_paths()
    monkeypatch.setattr(executor, "GONE_CHECK_INTERVAL_S", 0.0)
    runner.inputs.forget_gone_lately()
    assert path not in mapped_paths()


def mappings_of(path):
    """Start addresses of this process's mappings of the file at `path` (by inode)."""
    inode = str(os.stat(path).st_ino)
    fields = (line.split() for line in open("/proc/self/maps"))
    return [f[0].split("-")[0] for f in fields if len(f) >= 6 and f[4] == inode]


def test_a_recycled_file_is_read_through_its_kept_mapping_without_the_pages_tasks_wrote(
    tmp_path, encoder
):
    runner = TaskRunner(str(tmp_path), "7")
    payload, _, _ = encoder.data(np.zeros(INLINE_MAX))  # 8 x INLINE_MAX bytes
    _, _, _, stored = runner.run(1, payload, [])
    payload, _, funcs = encoder.call(add_in_place, (future(1),), {})
    runner.add_functions(submitted(encoder, funcs))
    assert decode_input(runner.run(2, payload, [stored])[3]) == 1.0  # every page written
    mapped_at = mappings_of(stored[1])
    assert len(mapped_at) == 1

    def recycle(old_path, new_name, value):
        """What the worker and an executor do: the file, its object gone, renamed for
        the next object of its size, which is written into it (`_claim_free_segment`)."""
        path = str(tmp_path / new_name)
        os.rename(old_path, path)
        runner.inputs.forget_gone()
        assert mappings_of(path) == mapped_at, "kept, idle, for the file's next object"
        assert not locked_by_other(path), "idle: the pool may take the file"
        frames, layout = dumps_result(np.full(INLINE_MAX, value))
        fd = os.open(path, os.O_WRONLY)
        assert os.pwritev(fd, [join_frames(frames, layout)], 0) == os.stat(path).st_size
        os.close(fd)
        return ("shm", path, layout)

    def run(func, task_id, obj):
        payload, _, funcs = encoder.call(func, (future(1),), {})
        runner.add_functions(submitted(encoder, funcs))
        status, value = runner.run(task_id, payload, [obj])[2:]
        assert status == "ok", value
        return value

    second = recycle(stored[1], "7-9", 5.0)
    total = decode_input(run(np.sum, 3, second))
    assert total == 5.0 * INLINE_MAX, "the next object's bytes, none of the copies tasks wrote"
    assert mappings_of(second[1]) == mapped_at, "through the same mapping"
    # Locked while an array built on it lives, past its object too.
    third = recycle(second[1], "7-10", 6.0)
    run(keep_input, 4, third)
    os.rename(third[1], str(tmp_path / "7-11"))
    runner.inputs.forget_gone()
    assert locked_by_other(str(tmp_path / "7-11")), "an array built on it lives"
    assert float(_kept_by_task[-1][0]) == 6.0
    _kept_by_task.clear()
    assert not locked_by_other(str(tmp_path / "7-11"))
    assert mappings_of(str(tmp_path / "7-11")) == [], "not kept idle: it was lent out"
    # A file with no name left is not kept mapped: it would hold the pages the worker freed.
    fourth = ("shm", str(tmp_path / "7-11"), third[2])
    assert decode_input(run(np.sum, 5, fourth)) == 6.0 * INLINE_MAX
    mapped_at = mappings_of(fourth[1])
    recycle(fourth[1], "7-12", 7.0)
    os.unlink(str(tmp_path / "7-12"))
    runner.inputs.forget_gone()
    assert not [p for p in mapped_paths() if p.startswith(str(tmp_path))]


def test_idle_mappings_go_when_the_worker_is_short_of_memory(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "7")
    payload, _, _ = encoder.data(np.zeros(INLINE_MAX))
    _, _, _, stored = runner.run(1, payload, [])
    payload, _, funcs = encoder.call(np.sum, (future(1),), {})
    runner.add_functions(submitted(encoder, funcs))
    assert decode_input(runner.run(2, payload, [stored])[3]) == 0
    recycled = str(tmp_path / "free-1")
    os.rename(stored[1], recycled)
    runner.inputs.forget_gone()
    assert len(mappings_of(recycled)) == 1
    runner.inputs.drop_idle()
    assert mappings_of(recycled) == []


def count_reader(groups):
    """Marks the input object itself: each reader of one object sees the marks before."""
    groups["readers"] = groups.get("readers", 0) + 1
    return groups["readers"]


def run_on(runner, encoder, func, task_id, inputs):
    """Runs func on the input objects (ObjectTuples) on `runner`: its status and result."""
    payload, _, funcs = encoder.call(func, tuple(future(i) for i in range(len(inputs))), {})
    runner.add_functions(submitted(encoder, funcs))
    status, stored = runner.run(task_id, payload, inputs)[2:]
    assert status == "ok", stored
    return stored


def held_input(stored):
    """A result the runner kept, as the worker hands it back to that executor."""
    kind, (key, _spans), layout = stored
    assert kind == "held"
    return ("held", key, layout)


def test_results_from_a_few_kib_stay_in_an_executor_that_keeps_results(tmp_path, encoder):
    """Sent inline, a result a task here reads crosses the executor link twice and is
    unpickled anew by each reader."""
    runner = TaskRunner(str(tmp_path), "7")
    small, kept = np.zeros(KEEP_FROM // 16), np.arange(KEEP_FROM // 8, dtype=np.float64)
    for enabled, value, kind in (
        (True, small, "inline"),
        (True, kept, "held"),
        (False, kept, "inline"),
    ):
        runner.held.enabled = enabled
        payload, _, _ = encoder.data(value)
        stored = runner.run(1, payload, [])[3]
        assert stored[0] == kind, (enabled, value.nbytes)
        if kind == "held":
            np.testing.assert_array_equal(runner.held.value(held_input(stored)[1]), kept)


def test_tasks_here_read_a_kept_result_as_the_object_itself(tmp_path, encoder):
    """As tasks of one `distributed` worker share the objects in its memory: a kept
    result is not unpickled again for each task that reads it (a shuffle's 20 slices of
    one partition's groups each unpickled all of them)."""
    runner = TaskRunner(str(tmp_path), "7")
    runner.held.enabled = True
    groups = {i: np.full(INLINE_MAX // 8, float(i)) for i in range(4)}  # out-of-band
    payload, _, _ = encoder.data(groups)
    kept = held_input(runner.run(1, payload, [])[3])
    assert decode_input(run_on(runner, encoder, count_reader, 2, [kept])) == 1
    assert decode_input(run_on(runner, encoder, count_reader, 3, [kept])) == 2
    assert runner.held.value(kept[1]) is runner.held.value(kept[1])
    np.testing.assert_array_equal(runner.held.value(kept[1])[3], groups[3])
    runner.held.release([kept[1]])
    with pytest.raises(RuntimeError, match="is gone"):
        runner.held.value(kept[1])


_larger_arrays = []


def slice_of_a_larger_array(n):
    larger = np.arange(8 * n, dtype=np.int64)
    _larger_arrays.append(weakref.ref(larger))
    return larger[:n]


def test_a_kept_result_is_not_kept_as_an_object_that_would_hold_more_than_its_frames(
    tmp_path, encoder
):
    runner = TaskRunner(str(tmp_path), "7")
    runner.held.enabled = True
    # Strings pickle in-band: the object would hold a second copy of the frames' bytes.
    words = [f"word {i}" for i in range(INLINE_MAX // 4)]
    payload, _, _ = encoder.data(words)
    key = held_input(runner.run(1, payload, [])[3])[1]
    first = runner.held.value(key)
    assert first == words and first is not runner.held.value(key)
    # A slice of a larger array is copied out of it when kept, and the larger array is
    # not kept alive by the slice's object.
    payload, _, funcs = encoder.call(slice_of_a_larger_array, (INLINE_MAX,), {})
    runner.add_functions(submitted(encoder, funcs))
    key = held_input(runner.run(2, payload, [])[3])[1]
    assert _larger_arrays[-1]() is None, "the larger array went"
    np.testing.assert_array_equal(runner.held.value(key), np.arange(INLINE_MAX))
    # One copied from a peer's executor (its frames only) is unpickled once, then kept.
    frames, _ = dumps_result({"a": np.ones(INLINE_MAX)})
    assert runner.held.keep(99, [bytes(frames[0]), bytearray(frames[1])]) is not None
    assert runner.held.value(99) is runner.held.value(99)


def test_only_arrays_in_neither_order_are_stored_as_contiguous_copies():
    cube = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    for kept_as_is in (cube, cube[1:3], np.asfortranarray(cube), cube.T, "text", [cube[:, ::2]]):
        assert storable(kept_as_is) is kept_as_is
    objects = np.array([object()] * 8).reshape(2, 4)[:, ::2]
    assert storable(objects) is objects  # pickled element by element either way
    split = cube[:, 2:4, 2:6]  # a rechunk's split: strided on the two fast axes
    copy = storable(split)
    assert copy.flags.c_contiguous and copy.base is None
    np.testing.assert_array_equal(copy, split)
    # Its data leaves the pickle stream, where the view's is copied into it.
    assert len(dumps_result(split)[1]) == 1
    stream, data = dumps_result(copy)[1]
    assert data == copy.nbytes and stream < copy.nbytes


def strided_view_of_a_larger_array(n):
    larger = np.arange(4 * n, dtype=np.int64).reshape(n, 4)
    _larger_arrays.append(weakref.ref(larger))
    return larger[:, ::2]


def test_a_strided_view_result_is_kept_as_one_contiguous_object_tasks_here_share(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "7")
    runner.held.enabled = True
    payload, _, funcs = encoder.call(strided_view_of_a_larger_array, (INLINE_MAX,), {})
    runner.add_functions(submitted(encoder, funcs))
    key = held_input(runner.run(1, payload, [])[3])[1]
    assert _larger_arrays[-1]() is None, "the larger array went"
    value = runner.held.value(key)
    assert value is runner.held.value(key), "readers share it, none unpickles its own"
    expected = np.arange(4 * INLINE_MAX, dtype=np.int64).reshape(INLINE_MAX, 4)[:, ::2]
    np.testing.assert_array_equal(value, expected)


def broadcast_rows(n, row):
    return np.broadcast_to(row, (n, len(row)))


def test_a_broadcast_result_is_stored_by_its_distinct_values(tmp_path, encoder):
    """As `distributed` ships it: a chunk of `da.zeros` (a scalar broadcast to the chunk's
    shape) is not written out whole."""
    runner = TaskRunner(str(tmp_path), "7")
    runner.held.enabled = True
    for row in (np.full(64, 2.5), np.arange(64.0)):  # 32 MB broadcast, 512 bytes distinct
        payload, _, funcs = encoder.call(broadcast_rows, (INLINE_MAX, row), {})
        runner.add_functions(submitted(encoder, funcs))
        stored = runner.run(1, payload, [])[3]
        assert stored[0] == "inline"
        back = decode_input(stored)
        np.testing.assert_array_equal(back, broadcast_rows(INLINE_MAX, row))
        assert back.strides[0] == 0 and not back.flags.writeable
    assert storable(np.broadcast_to(7, (3, 4))).strides == (0, 0)


def test_a_broadcast_array_in_a_payload_travels_by_its_distinct_values(encoder):
    """A scattered broadcast array (or one a graph holds) is not pickled whole."""
    row = np.arange(64.0)
    whole = np.broadcast_to(row, (100_000, 64))  # 51 MB as numpy pickles it
    payload, _, _ = encoder.data(whole)
    assert len(payload) < 2_000
    value = run_payload(loads_payload(payload, {}, []), [])
    np.testing.assert_array_equal(value, whole)
    assert value.strides[0] == 0 and not value.flags.writeable
    plain = np.arange(12.0).reshape(3, 4)
    payload, _, _ = encoder.data(plain)
    value = run_payload(loads_payload(payload, {}, []), [])
    np.testing.assert_array_equal(value, plain)
    assert value.flags.writeable, "an ordinary array stays as it was"


_kept_by_task = []


def keep_input(array):
    _kept_by_task.append(array)  # a task that holds on to its input after it returns
    return float(array[0])


def test_an_input_kept_past_its_task_stays_locked_until_nothing_reads_it(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "7")
    payload, _, _ = encoder.data(np.zeros(INLINE_MAX))
    stored = runner.run(1, payload, [])[3]

    def locked():
        return locked_by_other(stored[1])

    payload, _, funcs = encoder.call(keep_input, (future(1),), {})
    runner.add_functions(submitted(encoder, funcs))
    assert runner.run(2, payload, [stored])[2] == "ok"
    assert locked(), "an array built on the file outlives the task"
    assert runner.run(3, encoder.data(1)[0], [])[2] == "ok"
    assert locked(), "looked at again after a later task: still read"
    _kept_by_task.clear()
    assert runner.run(4, encoder.data(2)[0], [])[2] == "ok"
    assert not locked(), "nothing reads it any more: the worker may recycle it"
    # A task that fails leaves nothing reading its input either.
    payload, _, funcs = encoder.call(raise_value_error, (future(1),), {})
    runner.add_functions(submitted(encoder, funcs))
    assert runner.run(5, payload, [stored])[2] == "err"
    assert not locked()


def test_a_worker_with_a_memory_limit_caps_the_bytes_kept_mapped(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "7", keep_mapped_bytes=INLINE_MAX)
    payload, _, _ = encoder.data(np.zeros(INLINE_MAX))  # 8 x INLINE_MAX bytes
    stored = runner.run(1, payload, [])[3]
    payload, _, funcs = encoder.call(np.sum, (future(1),), {})
    runner.add_functions(submitted(encoder, funcs))
    assert decode_input(runner.run(2, payload, [stored])[3]) == 0
    assert stored[1] not in mapped_paths(), "over the cap: unmapped after the task"


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def test_error_keeps_type_message_and_task_frames(tmp_path, encoder):
    runner = TaskRunner(str(tmp_path), "1")
    payload, _, _ = encoder.call(raise_value_error, (3,), {})
    _, _, status, error = runner.run(1, payload, [])
    assert status == "err"
    type_name, message, text, pickled = error
    assert (type_name, message) == ("ValueError", "bad value 3")
    assert "raise_value_error" in text and pickled
    exc = loads_error(error)
    assert type(exc) is ValueError and str(exc) == "bad value 3"
    names = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    assert names[-1] == "raise_value_error"
    assert "run" not in names  # the executor's own frames are left out


class HoldsALock(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()  # no pickler takes a lock


def test_unpicklable_exception_becomes_task_error():
    try:
        raise HoldsALock("x")
    except HoldsALock as caught:
        error = dumps_error(caught)
    type_name, message, text, pickled = error
    assert pickled == b""
    assert type_name.endswith("HoldsALock") and message == "x"
    exc = loads_error(error)
    assert isinstance(exc, TaskError)
    assert "HoldsALock" in str(exc) and "x" in str(exc)
    assert exc.traceback_text == text


def test_unknown_payload_kind_is_refused():
    with pytest.raises(ValueError, match="unknown payload kind"):
        run_payload((9, None), [])


def test_executors_start_without_the_client_or_dask():
    # An executor imports rankmesh.executor at start-up: the client and Dask (~0.1 s of
    # every executor start) come only with tasks that need them.
    import subprocess
    import sys

    check = (
        "import sys, rankmesh.executor, rankmesh._rankmesh\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'cloudpickle')\n"
        "             or m in ('rankmesh.client', 'rankmesh.payloads')))\n"
        "print(rankmesh.Client.__module__, 'Client' in dir(rankmesh))\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "rankmesh.client True"]


def test_a_node_holding_a_collection_ships_its_metadata_not_its_graph(encoder):
    """xarray's finalize node holds the whole Dataset: its payload must not grow with the
    graph (a 500,000-task pipeline made it 30 MB, hundreds of MB once unpickled)."""
    import sys
    from pathlib import Path

    import cloudpickle
    from dask.base import collections_to_expr

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from xarray_anomaly import anomaly_pipeline, synthetic_dataset

    ds = synthetic_dataset(days=400, chunk_days=25, seed=1)
    graph = collections_to_expr([anomaly_pipeline(ds)]).finalize_compute().optimize()
    graph = graph.__dask_graph__()
    (key,) = [key for key in graph if str(key).startswith("finalize")]
    payload, _, _ = encoder.node(graph[key], list(graph[key].dependencies))
    with_graph = len(cloudpickle.dumps(graph[key]))
    assert len(graph) > 10_000
    assert len(payload) * 20 < with_graph, (len(payload), with_graph)
    # That it still finalizes right: test_pipelines' xarray tests run it on a cluster.
