"""The executor process: runs task code for its worker (``python -m rankmesh.executor``).

The worker sends function blobs and batches of tasks over a Unix socket; inputs arrive
inline or as shared-memory files that are mapped copy-on-write, so arrays are read in
place and still writable. Results go back inline when small, else written once into a
shared-memory file that the worker then owns: a released segment of the same size that
the worker keeps free, when there is one (its pages exist), else a new file.

Where the worker can read this process's memory (it says so: `hold_results`), a large
result is not written at all: the executor keeps its pickled frames (`HeldResults`), and
reports where they are. Its own later tasks read it as it is; the worker copies it into
shared memory (or a spill file) only when something else needs the bytes, or at once when
it is large and other workers may read it. Tasks of
this executor then share a kept result's arrays, as tasks on one worker share objects in
Dask distributed: a task that changes an input in place changes what later readers get.

Input files stay mapped from task to task while they exist (`MappedInputs`), so the
tasks that read one chunk fault its pages in once. Unlike a fresh mapping per task, this
means tasks on one executor share an input's pages: a task that changes an input array in
place changes it for later tasks of that executor that read the same input, as tasks on
one worker share objects in Dask distributed. The stored object itself never changes.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from . import in_memory_targets, serialize
from ._layout import INLINE_MAX, object_offsets
from ._rankmesh import (
    MappedView,
    frame_spans,
    heap_free_bytes,
    keep_freed_heap,
    read_lent_frames,
    trim_heap,
)

# Input files kept mapped between tasks, at most (the most recently used); a worker with
# a memory limit also caps their bytes (RANKMESH_KEEP_MAPPED_BYTES).
MAX_KEPT_MAPPINGS = 16

# Mappings of files whose object is gone kept for the next object the same file carries
# (MappedInputs), at most, the most recently used; the memory cap above covers them too.
MAX_IDLE_MAPPINGS = 16

# Bytes of idle mappings, at most: a worker's pool keeps no more than this of released
# files for reuse (`MAX_FREE_BYTES` in src/store/pool.rs), so more would seldom be met again.
MAX_IDLE_BYTES = 1 << 30

# How often, at most, the executor looks for freed heap past its budget to give back.
HEAP_CHECK_INTERVAL_S = 1.0

# How often, at most, kept input files are looked for before a batch of tasks (a stat
# each). The worker's notices cover what it releases; this finds files removed after their
# notice (a peer was still reading one then). Looking before every batch took 4% of a busy
# executor's time on the anomaly pipeline.
GONE_CHECK_INTERVAL_S = 0.1

# Where the worker keeps released segments for reuse, by size (src/store/pool.rs).
FREE_FOLDER = "free"

# A kept result does not keep alive an array this many times larger than itself (a slice
# of a chunk): such a result is copied out of it instead.
MAX_KEPT_BASE_RATIO = 2

# Results from this size up stay in an executor that keeps results (`HeldResults`); smaller
# ones, and all where it does not, go to the worker inline up to INLINE_MAX. An inline
# result crosses the executor link twice when a task here reads it (to the worker, back as
# an input) and is unpickled anew by each reader: the anomaly pipeline's 17,500 results of
# 16-64 KiB (1.1 GB a rep) did, and kept here it ran 25% faster (docs/performance.md).
KEEP_FROM = 4 * 1024

# A kept result's value is kept beside its frames only where its pickle stream, which the
# value copies, is at most this share of the bytes (HeldResults).
MAX_IN_BAND_SHARE = 0.25

# Frames of the runtime itself, left out of the tracebacks tasks send back.
_RUNTIME_FILES = (__file__, serialize.__file__)


def decode_input(obj: tuple[str, object, list[int]]) -> object:
    """An ObjectTuple as the value it holds, its buffers read in place."""
    kind, data, layout = obj
    if kind == "inline":
        if len(layout) > 1:
            # Out-of-band buffers: a private copy (at most INLINE_MAX) keeps arrays writable.
            data = bytearray(data)
        return serialize.loads_result(data, layout)
    if kind == "shm":
        fd = _open_locked(data)
        try:
            return serialize.loads_result(_map(fd), layout)
        finally:
            os.close(fd)
    raise ValueError(f"unknown object kind {kind!r}")


def _open_locked(path: str) -> int:
    """The file, locked shared: while the lock holds (a mapping keeps a duplicate of the
    descriptor, and with it the lock), the worker will not reuse its pages for another
    object."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int) -> mmap.mmap:
    # MAP_PRIVATE: writes land in private pages, the stored object stays intact.
    # (Not MAP_POPULATE: on a private writable mapping it copies every page.)
    return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class MappedInputs:
    """Shared-memory input files kept mapped between tasks, by path: the tasks that read
    one chunk (a rechunk's slices of it) fault its pages in once, and nothing is unmapped in
    between. Only files in the worker's shared-memory folder, whose memory the worker
    counts whether mapped or not: a spilled result mapped back from disk is unmapped after
    each task, so that its pages leave memory.

    A file is locked shared while a task reads it and while anything built on its bytes
    lives on after the task (an array a task kept in a global, say): each mapping is lent
    through a `MappedView`, which counts the buffers still out. The worker may recycle a
    file only when no executor holds that lock (the pages of a received array carry the
    next one of its size), so bytes a task still sees are never overwritten. Once it lets
    the object go, the worker removes or renames the file, and `forget_gone` (on the
    worker's notice, and before a batch at most every GONE_CHECK_INTERVAL_S) drops
    whatever no longer exists. Object file
    names are never used twice, so a mapping found by path is of that same object.

    The worker recycles an object's file for the next object of its size (the pages of a
    received or written array carry the next one). A mapping of a file whose object is
    gone is kept idle, unlocked, by inode, and serves the file's next object with its page
    tables filled: mapping 64 MiB afresh and faulting it in cost 6-7 ms here, most of one
    same-node transfer. Pages tasks wrote (private copies) are dropped first, so the
    mapping shows only the file's bytes; the mapping goes once the file has no name left
    (it would hold the pages the worker freed), and all of them when the worker is short of
    memory (`drop_idle`). Where the system does not show a process its own page map, no
    mapping is kept idle.
    """

    def __init__(self, shm_dir: str, max_bytes: int | None) -> None:
        self._shm_dir = os.path.join(shm_dir, "")
        self._max_bytes = max_bytes
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._kept_bytes = 0
        self._looked_for_gone = time.monotonic()
        # Locked by the running task, and locked for what earlier tasks left behind.
        self._locked: list[str] = []
        self._held: set[str] = set()
        # Mappings of files whose object is gone, by (device, inode); unlocked.
        self._idle: OrderedDict[tuple[int, int], _Kept] = OrderedDict()
        self._idle_bytes = 0
        self._keep_idle = True

    def value(self, obj: tuple[str, object, list[int]]) -> object:
        kind, path, layout = obj
        if kind != "shm" or not path.startswith(self._shm_dir):
            return decode_input(obj)
        kept = self._kept.get(path)
        if kept is None:
            fd = _open_locked(path)
            try:
                kept = self._idle_mapping(fd)
                if kept is None:
                    kept = _Kept(fd, MappedView(_map(fd)))
                else:
                    os.close(fd)  # the idle mapping's own descriptor holds the lock now
            except BaseException:
                os.close(fd)
                raise
            self._kept[path] = kept
            self._kept_bytes += len(kept.view)
            while len(self._kept) > MAX_KEPT_MAPPINGS or (
                self._max_bytes is not None and self._kept_bytes > self._max_bytes
            ):
                self._forget(next(iter(self._kept)))
        else:
            self._kept.move_to_end(path)
            fcntl.flock(kept.fd, fcntl.LOCK_SH)
        self._locked.append(path)
        return serialize.loads_result(kept.view, layout)

    def task_done(self) -> None:
        """The task reads its inputs no more: each file is unlocked, so that the worker may
        recycle it, unless something built on its bytes is still alive; those are looked
        at again after each later task."""
        # One forgotten meanwhile keeps its lock through its mapping's own descriptor.
        self._held.update(path for path in self._locked if path in self._kept)
        self._locked.clear()
        for path in [path for path in self._held if self._kept[path].view.exports == 0]:
            fcntl.flock(self._kept[path].fd, fcntl.LOCK_UN)
            self._held.discard(path)

    def forget_gone_lately(self) -> None:
        """`forget_gone` if it last ran GONE_CHECK_INTERVAL_S ago or more."""
        if time.monotonic() - self._looked_for_gone >= GONE_CHECK_INTERVAL_S:
            self.forget_gone()

    def forget_gone(self) -> None:
        """Unmaps the files the worker removed or recycled."""
        self._looked_for_gone = time.monotonic()
        for path in [path for path in self._kept if not os.path.exists(path)]:
            self._forget(path)
        for key in [key for key, idle in self._idle.items() if _unnamed(idle.fd)]:
            self._drop_idle(key)

    def drop_idle(self) -> None:
        """Unmaps every idle mapping (the worker is short of memory)."""
        while self._idle:
            self._drop_idle(next(iter(self._idle)))

    def _forget(self, path: str) -> None:
        # The mapping goes with its last reference: at once, or when the last array built
        # on it goes. A file still locked stays locked until then: the mapping's duplicate
        # of the descriptor holds the lock.
        kept = self._kept.pop(path)
        self._kept_bytes -= len(kept.view)
        self._held.discard(path)
        if path not in self._locked and self._keep_idle_mapping(kept):
            return
        os.close(kept.fd)

    def _keep_idle_mapping(self, kept: _Kept) -> bool:
        """Keeps `kept`'s mapping idle for its file's next object; False where it is not
        worth keeping or cannot be (nothing may be built on it: tasks would see the next
        object's bytes)."""
        size = len(kept.view)
        if not self._keep_idle or kept.view.exports or size > self._idle_room():
            return False
        stat = os.fstat(kept.fd)
        if stat.st_nlink == 0:
            return False
        try:
            kept.view.drop_written_pages()
        except OSError:
            self._keep_idle = False  # no page map to read here: never again
            self.drop_idle()
            return False
        fcntl.flock(kept.fd, fcntl.LOCK_UN)
        key = (stat.st_dev, stat.st_ino)
        if key in self._idle:
            self._drop_idle(key)
        self._idle[key] = kept
        self._idle_bytes += size
        while len(self._idle) > MAX_IDLE_MAPPINGS or self._idle_room() < 0:
            self._drop_idle(next(iter(self._idle)))
        return True

    def _idle_room(self) -> int:
        """Bytes more that idle mappings may take (negative: over)."""
        room = MAX_IDLE_BYTES - self._idle_bytes
        if self._max_bytes is not None:
            room = min(room, self._max_bytes - self._kept_bytes - self._idle_bytes)
        return room

    def _idle_mapping(self, fd: int) -> _Kept | None:
        """The idle mapping of the file open (and locked) at `fd`, locked through its own
        descriptor, which the mapping shares: while anything built on the mapping lives,
        the lock does. None if no mapping of it is kept, or one of another size."""
        if not self._idle:
            return None
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        if key not in self._idle:
            return None
        if len(self._idle[key].view) != stat.st_size:
            self._drop_idle(key)
            return None
        idle = self._idle.pop(key)
        self._idle_bytes -= len(idle.view)
        try:
            fcntl.flock(idle.fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(idle.fd)
            raise
        return idle

    def _drop_idle(self, key: tuple[int, int]) -> None:
        idle = self._idle.pop(key)
        self._idle_bytes -= len(idle.view)
        os.close(idle.fd)


def _unnamed(fd: int) -> bool:
    """Whether the file open at `fd` has no name left: its pages go once it is closed."""
    return os.fstat(fd).st_nlink == 0


class _Kept(NamedTuple):
    """A kept input file: its descriptor (which holds the lock) and its counted view."""

    fd: int
    view: MappedView


class KeptHeap:
    """Freed heap the executor keeps for its tasks to reuse, up to a budget the worker sets
    from its memory limit (`RANKMESH_KEEP_HEAP_BYTES`): numpy's temporaries and the arrays
    of results being stored then come from pages already there, where each would be a
    fresh mapping, faulted in page by page and unmapped at the end of its task. The
    threaded scheduler's one process keeps its heap the same way. glibc gives back what is
    free past the budget at the heap's top by itself; free holes below it are given back
    here, looked for at most once a second after a batch of tasks, and all of it when the
    worker is over its spill threshold (`drop_reserves`)."""

    def __init__(self, budget: int | None) -> None:
        self._budget = budget
        self._next_check = 0.0
        # What was free when last given back: the same again means nothing came back in.
        self._free_when_trimmed = -1
        if budget is not None:
            keep_freed_heap(budget)

    def batch_done(self) -> None:
        if self._budget is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + HEAP_CHECK_INTERVAL_S
        self._give_back_over(self._budget)

    def drop_reserves(self) -> None:
        if self._budget is not None:
            self._give_back_over(0)

    def _give_back_over(self, kept: int) -> None:
        free = heap_free_bytes()
        if free > kept and free != self._free_when_trimmed:
            trim_heap()
            self._free_when_trimmed = free


class HeldResults:
    """Results kept in this process rather than sent or written (`ObjectRef::Held`), by key:
    their pickled frames, which must stay alive and unchanged until the worker says the
    result is released or copied out (it may be reading them meanwhile).

    Tasks here read a kept result as the value itself, as tasks of one `distributed`
    worker share the object in its memory, not a fresh unpickling for each: the 20
    slices a shuffle takes of one partition's groups each unpickled all of them. Only
    where the value holds little more than the frames do (its buffers are the frames, not
    copies): a value whose pickle carries its data in-band would double it."""

    def __init__(self) -> None:
        self.enabled = False
        self._frames: dict[int, list] = {}
        self._values: dict[int, object] = {}

    def keep(self, key: int, frames: list, value: object = None) -> list[tuple[int, int]] | None:
        """Keeps `frames` under `key`, and `value`, the object they were pickled from, where
        it shares their memory; their (address, length) spans, or None (nothing kept) when
        a frame is not contiguous."""
        kept = [frames[0], *(_detached(frame) for frame in frames[1:])]
        spans = frame_spans(kept)
        if spans is None:
            return None
        self._frames[key] = kept
        # A detached frame is a copy: the value would keep alive the larger array.
        shared = all(a is b for a, b in zip(kept, frames, strict=True))
        if value is not None and shared and _mostly_out_of_band(kept):
            self._values[key] = value
        return spans

    def value(self, key: int) -> object:
        value = self._values.get(key)
        if value is not None:
            return value
        frames = self._frames.get(key)
        if frames is None:
            raise RuntimeError(f"the result this executor kept under key {key} is gone")
        value = serialize.loads_frames(frames[0], frames[1:])
        if value is not None and _mostly_out_of_band(frames):
            self._values[key] = value
        return value

    def release(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._frames.pop(key, None)
            self._values.pop(key, None)


def _mostly_out_of_band(frames: list) -> bool:
    """Whether a value unpickled from `frames` holds little beyond them: its pickle stream
    (copied into the value) is at most MAX_IN_BAND_SHARE of their bytes."""
    total = sum(memoryview(frame).nbytes for frame in frames)
    return memoryview(frames[0]).nbytes <= MAX_IN_BAND_SHARE * total


def _detached(frame: object) -> object:
    """The frame, or a copy of it where it is a small view of a much larger array, which
    keeping the frame would keep alive whole."""
    raw = frame.raw() if isinstance(frame, pickle.PickleBuffer) else memoryview(frame)
    root = raw.obj
    while getattr(root, "base", None) is not None:
        root = root.base
    if root is raw.obj:
        return frame
    try:
        root_bytes = memoryview(root).nbytes
    except TypeError:
        root_bytes = None
    if root_bytes is None or root_bytes > MAX_KEPT_BASE_RATIO * raw.nbytes:
        return bytearray(raw)  # writable, as arrays read from shared memory are
    return frame


class TaskRunner:
    """Runs tasks and turns their results into ObjectTuples or ErrorTuples."""

    def __init__(
        self, shm_dir: str, executor_id: str, keep_mapped_bytes: int | None = None
    ) -> None:
        self._shm_dir = shm_dir
        self._executor_id = executor_id
        self._sequence = 0
        self.functions = serialize.Functions()
        self.inputs = MappedInputs(shm_dir, keep_mapped_bytes)
        self.held = HeldResults()

    def add_functions(self, blobs: Sequence[tuple[int, bytes]]) -> None:
        self.functions.add(blobs)

    def release_functions(self, func_ids: Sequence[int]) -> None:
        self.functions.release(func_ids)

    def run(self, task_id: int, payload: bytes, inputs: Sequence[tuple]) -> tuple:
        """(task_id, duration_us, "ok", ObjectTuple) or (..., "err", ErrorTuple)."""
        start = time.perf_counter_ns()
        try:
            status, stored = self._outcome(payload, inputs)
        finally:
            # After `_outcome` returned: what it held on the inputs (the values after an
            # error, a result's frames that are views of one) went with it.
            self.inputs.task_done()
        return task_id, (time.perf_counter_ns() - start) // 1000, status, stored

    def _outcome(self, payload: bytes, inputs: Sequence[tuple]) -> tuple[str, tuple]:
        """("ok", ObjectTuple) or ("err", ErrorTuple)."""
        try:
            values = [
                self.held.value(obj[1]) if obj[0] == "held" else self.inputs.value(obj)
                for obj in inputs
            ]
            task = serialize.loads_payload(payload, self.functions, values)
            result = serialize.storable(serialize.run_payload(task, values))
            name = serialize.payload_name(task)
            del task, values  # inputs go before the result is stored
            frames, layout = serialize.dumps_result(result, name)
            return "ok", self._store(frames, layout, result)
        except Exception as exc:  # noqa: BLE001 - every task error goes back to the client
            return "err", serialize.dumps_error(exc, _RUNTIME_FILES)

    def _store(
        self, frames: list, layout: list[int], result: object
    ) -> tuple[str, object, list[int]]:
        """Stores a result pickled as `frames`: `result` itself is kept too where it is
        kept here (`HeldResults`)."""
        _, total = object_offsets(layout)
        if self.held.enabled and total >= KEEP_FROM:
            self._sequence += 1
            spans = self.held.keep(self._sequence, frames, result)
            if spans is not None:
                return "held", (self._sequence, spans), layout
        if total <= INLINE_MAX:
            return "inline", serialize.join_frames(frames, layout), layout
        self._sequence += 1
        path = os.path.join(self._shm_dir, f"{self._executor_id}-{self._sequence}")
        if self._claim_free_segment(total, path):
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            # One gathered write: the kernel copies each frame once into the file's pages.
            written = os.pwritev(fd, serialize.padded_frames(frames, layout), 0)
        finally:
            os.close(fd)
        if written != total:
            raise OSError(f"wrote {written} of {total} bytes to {path}")
        return "shm", path, layout

    def borrow(self, pid: int, probe: int, spans: list, layout: list[int]) -> tuple[bool, tuple]:
        """Copies a result a peer's executor lends (`ToExecutor::Borrow`) and keeps it as a
        result of this executor: (True, ObjectTuple), or (False, (why, refused))."""
        try:
            frames = read_lent_frames(pid, probe, spans)
        except PermissionError as exc:
            return False, (str(exc), True)
        except OSError as exc:
            return False, (str(exc), False)
        self._sequence += 1
        kept = self.held.keep(self._sequence, frames)
        if kept is None:
            return False, ("its frames are not contiguous here", False)
        return True, ("held", (self._sequence, kept), layout)

    def _claim_free_segment(self, total: int, path: str) -> bool:
        """Renames a free segment of exactly `total` bytes that the worker keeps (in
        `free/<size>/`) to `path`: its pages exist, so writing the result allocates none.
        False when there is none (or others claimed them first)."""
        folder = os.path.join(self._shm_dir, FREE_FOLDER, str(total))
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return False
        for name in names:
            try:
                os.rename(os.path.join(folder, name), path)
            except FileNotFoundError:
                continue  # taken by the worker or another executor meanwhile
            return True
        return False


def serve(link, runner: TaskRunner, heap: KeptHeap) -> None:
    """Runs what the worker sends until it says shutdown or the link closes."""
    from ._rankmesh import ConnectionLost

    plugins = None

    while True:
        try:
            messages = link.recv()
        except (ConnectionLost, EOFError):
            return
        for message in messages:
            kind = message[0]
            if kind == "functions":
                runner.add_functions(message[1])
            elif kind == "release_functions":
                runner.release_functions(message[1])
            elif kind == "plugins":
                if plugins is None:
                    from .plugins import PluginHost

                    plugins = PluginHost()
                plugins.update(message[1], message[2])
            elif kind == "objects_released":
                runner.held.release(message[1])
                runner.inputs.forget_gone()
            elif kind == "hold_results":
                runner.held.enabled = message[1]
            elif kind == "drop_reserves":
                heap.drop_reserves()
                runner.inputs.drop_idle()
            elif kind == "borrow":
                request, pid, probe, spans, layout = message[1:]
                link.send_borrowed(request, *runner.borrow(pid, probe, spans, layout))
            elif kind == "run":
                runner.inputs.forget_gone_lately()
                tasks = message[1]
                for task_id, payload, inputs in tasks[:-1]:
                    link.keep_results([runner.run(task_id, payload, inputs)])
                # Results go together (see `keep_results`), but before the last task at
                # hand: the worker queues the next ones meanwhile.
                if tasks:
                    link.report_unless_input()
                    link.keep_results([runner.run(*tasks[-1])])
                heap.batch_done()
            elif kind == "shutdown":
                return


def report_fatal_signals(path: str) -> None:
    """On a fatal signal (SIGSEGV, SIGFPE, SIGABRT, SIGBUS, SIGILL) Python writes where it
    was to `path`, which the worker reads into the crashed task's error."""
    import faulthandler

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    faulthandler.enable(os.fdopen(os.open(path, flags, 0o600), "w"), all_threads=False)


def main() -> int:
    from ._rankmesh import ExecutorLink

    link = ExecutorLink(os.environ["RANKMESH_EXECUTOR_SOCKET"], os.environ["RANKMESH_TOKEN"])
    shm_dir, executor_id = os.environ["RANKMESH_SHM_DIR"], os.environ["RANKMESH_EXECUTOR_ID"]
    report_fatal_signals(os.path.join(shm_dir, f"{executor_id}.fault"))
    in_memory_targets.install()
    keep_mapped = os.environ.get("RANKMESH_KEEP_MAPPED_BYTES")
    keep_heap = os.environ.get("RANKMESH_KEEP_HEAP_BYTES")
    runner = TaskRunner(shm_dir, executor_id, None if keep_mapped is None else int(keep_mapped))
    serve(link, runner, KeptHeap(None if keep_heap is None else int(keep_heap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
