"""The executor process: runs task code for its worker (``python -m rankmesh.executor``).

The worker sends function blobs and batches of tasks over a Unix socket; inputs arrive
inline or as shared-memory files that are mapped copy-on-write, so arrays are read in
place and still writable. Results go back inline when small, else written once into a
new shared-memory file that the worker then owns.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import time
from collections.abc import Sequence

from . import in_memory_targets, serialize
from ._layout import INLINE_MAX, object_offsets

# Finished results wait at most this long for others to share a message with.
SEND_INTERVAL_S = 0.001

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
        fd = os.open(data, os.O_RDONLY)
        try:
            # While the mapping lives (it keeps a duplicate of fd, and with it this lock),
            # the worker will not reuse the file's pages for another object.
            fcntl.flock(fd, fcntl.LOCK_SH)
            # MAP_PRIVATE: writes land in private pages, the stored object stays intact.
            # (Not MAP_POPULATE: on a private writable mapping it copies every page.)
            mapped = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return serialize.loads_result(mapped, layout)
    raise ValueError(f"unknown object kind {kind!r}")


class TaskRunner:
    """Runs tasks and turns their results into ObjectTuples or ErrorTuples."""

    def __init__(self, shm_dir: str, executor_id: str) -> None:
        self._shm_dir = shm_dir
        self._executor_id = executor_id
        self._sequence = 0
        self.functions = serialize.Functions()

    def add_functions(self, blobs: Sequence[tuple[int, bytes]]) -> None:
        self.functions.add(blobs)

    def release_functions(self, func_ids: Sequence[int]) -> None:
        self.functions.release(func_ids)

    def run(self, task_id: int, payload: bytes, inputs: Sequence[tuple]) -> tuple:
        """(task_id, duration_us, "ok", ObjectTuple) or (..., "err", ErrorTuple)."""
        start = time.perf_counter_ns()
        try:
            values = [decode_input(obj) for obj in inputs]
            task = serialize.loads_payload(payload, self.functions, values)
            result = serialize.run_payload(task, values)
            name = serialize.payload_name(task)
            del task, values  # inputs (and their mappings) go before the result is stored
            frames, layout = serialize.dumps_result(result, name)
            del result
            stored = self._store(frames, layout)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - every task error goes back to the client
            stored = serialize.dumps_error(exc, _RUNTIME_FILES)
            status = "err"
        return task_id, (time.perf_counter_ns() - start) // 1000, status, stored

    def _store(self, frames: list, layout: list[int]) -> tuple[str, object, list[int]]:
        _, total = object_offsets(layout)
        if total <= INLINE_MAX:
            return "inline", serialize.join_frames(frames, layout), layout
        self._sequence += 1
        path = os.path.join(self._shm_dir, f"{self._executor_id}-{self._sequence}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            # One gathered write: the kernel copies each frame once into the file's pages.
            written = os.writev(fd, serialize.padded_frames(frames, layout))
        finally:
            os.close(fd)
        if written != total:
            raise OSError(f"wrote {written} of {total} bytes to {path}")
        return "shm", path, layout


def serve(link, runner: TaskRunner) -> None:
    """Runs what the worker sends until it says shutdown or the link closes."""
    from ._rankmesh import ConnectionLost

    plugins = None

    pending: list[tuple] = []
    last_send = time.monotonic()
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
            elif kind == "run":
                for task_id, payload, inputs in message[1]:
                    # Before each task, not after: a long task must not hold back results.
                    if pending and time.monotonic() - last_send > SEND_INTERVAL_S:
                        link.send_results(pending)
                        pending = []
                        last_send = time.monotonic()
                    pending.append(runner.run(task_id, payload, inputs))
                link.send_results(pending)
                pending = []
                last_send = time.monotonic()
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
    runner = TaskRunner(shm_dir, executor_id)
    serve(link, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
