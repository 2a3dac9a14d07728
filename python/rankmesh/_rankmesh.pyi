"""The native part of rankmesh (Rust, PyO3). Private: use the `rankmesh` package API."""

from collections.abc import Callable
from typing import Any, Literal

from typing_extensions import Buffer

# One task as submitted: (id, dependency ids in payload order, function ids, payload, priority)
TaskTuple = tuple[int, list[int], list[int], bytes, int, str]
# A stored object as an executor sees it:
#   ("inline", data: bytes, layout: list[int]) or ("shm", path: str, layout: list[int]);
#   a result the executor keeps: ("held", (key, spans), layout) from it, ("held", key,
#   layout) back to it as an input
# layout = lengths of the object's frames (pickle stream, then out-of-band buffers); where
# each frame starts is rankmesh._layout.object_offsets (mirrored by the Rust side).
ObjectTuple = tuple[str, object, list[int]]
# An error: (type_name, message, traceback_text, pickled_exception_or_empty)
ErrorTuple = tuple[str, str, str, bytes]

__version__: str

class RankmeshError(Exception): ...
class HandshakeRefused(RankmeshError): ...
class ConnectionLost(RankmeshError): ...

class ClientCore:
    """A connection to the scheduler, served by a background Rust thread."""

    client_id: int
    def __init__(self, address: str, token: str, timeout: float = 10.0) -> None:
        """address: "tcp://host:port" or "host:port". Raises HandshakeRefused, OSError."""
    def next_task_id(self, count: int) -> int:
        """Reserves `count` consecutive task ids in this client's namespace; returns the first."""
    def submit(
        self,
        functions: list[tuple[int, bytes]],
        tasks: list[TaskTuple],
        wanted: list[int],
        restrictions: dict[int, list[int]] | None = None,
        options: dict[int, tuple[int, bool, list[tuple[str, float]]]] | None = None,
    ) -> None:
        """tasks: (id, deps, function ids, payload, priority, prefix). restrictions: task id
        -> the only worker ids that may run it; options: task id ->
        (retries, allow_other_workers, resources as (name, amount) pairs)."""
    def register_plugin(self, name: str, plugin: bytes) -> None:
        """A pickled worker plugin every executor sets up, now and when it starts."""
    def unregister_plugin(self, name: str) -> None: ...
    def watch_progress(self, on: bool) -> None:
        """Whether the scheduler keeps computed() up to date."""
    def computed(self) -> int | None:
        """Tasks of this client computed since watch_progress(True); None before the
        scheduler's first answer to it."""
    def retire_workers(self, ids: list[int]) -> None:
        """These workers leave on purpose (work redone elsewhere) and are not replaced."""
    def restart(self) -> None:
        """Cancel every client's tasks; every worker restarts its executors."""
    def want(self, ids: list[int]) -> None:
        """Hold results of tasks submitted earlier again (e.g. a second future on them)."""
    def release(self, ids: list[int]) -> None:
        """The client no longer needs these results."""
    def release_functions(self, ids: list[int]) -> None:
        """The client will ship these functions again before a task uses them."""
    def cancel(self, ids: list[int]) -> None: ...
    def submit_calls(
        self,
        functions: list[tuple[int, bytes]],
        first_id: int,
        payloads: list[bytes],
        deps: list[list[int]],
        funcs: list[list[int]],
        first_priority: int,
        prefix: str,
        restriction: list[int] | None = None,
        options: tuple[int, bool, list[tuple[str, float]]] | None = None,
    ) -> None:
        """Many calls at once, all held (`client.map`): task first_id + i has payloads[i],
        deps[i], funcs[i] (one list object may stand for many tasks) and priority
        first_priority + i; all share prefix, restriction and options."""
    def wait(
        self,
        ids: list[int],
        timeout: float | None = None,
        return_when: Literal["ALL", "ANY"] = "ALL",
    ) -> list[int]:
        """Blocks (GIL released, Ctrl-C honoured) until all / any of `ids` ended (finished,
        erred or cancelled) or the timeout passed; returns the ids that have ended."""
    def state(self, id: int) -> Literal["pending", "finished", "error", "cancelled", "lost"]: ...
    def unfinished(self, ids: list[int]) -> list[int]:
        """Those of ids without a result (erred, cancelled or pending), in order."""
    def error(self, id: int) -> ErrorTuple | None: ...
    def location(self, id: int) -> int | None:
        """The worker id holding a finished task's result (as last announced)."""
    def fetch(self, ids: list[int]) -> list[tuple[bytes, tuple[bytearray, ...]] | str]:
        """Results straight from the workers holding them: per id, (pickle stream,
        out-of-band buffers), or why it could not be fetched (its worker is gone,
        unreachable or no longer holds it). Raises RankmeshError for a task that has not
        finished."""
    def fetch_loaded(
        self, ids: list[int], loads: Callable[[bytes, tuple[bytearray, ...]], Any]
    ) -> tuple[list[Any], dict[int, str]]:
        """fetch, each result turned into loads(stream, buffers) as it is read: (values in
        order, None for those not fetched; {id: why} for those)."""
    def coordinate(
        self,
        op: str,
        name: str,
        value: bytes | None = None,
        number: int = 0,
        timeout: float | None = None,
    ) -> tuple[str, object, int]:
        """One request on a named lock, semaphore, event, variable or queue (op: acquire,
        release, leases, event_set, event_clear, event_wait, event_is_set, variable_set,
        variable_get, variable_delete, queue_put, queue_get, queue_size). Blocks until
        answered; past `timeout` the request is withdrawn. Returns (kind, value, request
        number); kind: granted, done, value, count, flag, withdrawn or refused."""
    def dataset(
        self,
        op: str,
        name: str = "",
        value: bytes | None = None,
        tasks: list[int] = ...,
        overwrite: bool = False,
    ) -> tuple[str, object, int]:
        """One request on the published datasets (op: publish, unpublish, get, list),
        answered at once: (kind, value, request number); kind: done, value, names or
        refused."""
    def workers(self) -> list[dict[str, object]]:
        """id, data_address, host, nthreads, memory_limit of each connected worker."""
    def close(self) -> None: ...

class ExecutorLink:
    """An executor's connection to its worker (a Unix socket)."""

    def __init__(self, path: str, token: str) -> None: ...
    def recv(self) -> list[tuple]:
        """Blocks (GIL released) for the next messages, after sending the results kept
        for a report unless a message is here already:
        ("functions", [(func_id, bytes), ...])
        ("run", [(task_id, payload: bytes, inputs: list[ObjectTuple]), ...])
        ("objects_released", [held key, ...])
        ("hold_results", keep: bool)
        ("borrow", request: int, pid: int, probe: int, spans: list[(address, length)],
         layout: list[int])
        ("shutdown",)"""
    def keep_results(self, results: list[tuple]) -> None:
        """Keeps results for the next report, which goes within 10 ms (a thread of the
        link sends it while a task runs), or sooner (`report_unless_input`, `recv`).
        Each result: (task_id, duration_us, "ok", ObjectTuple) or
        (task_id, duration_us, "err", ErrorTuple)."""
    def report_unless_input(self) -> None:
        """Sends the results kept for a report, unless a message is here already."""
    def send_borrowed(self, request: int, ok: bool, value: tuple) -> None:
        """A lent result copied and kept (ok: its ObjectTuple), or why not (message,
        refused)."""

class MappedView:
    """A mapping's bytes (any buffer: an mmap) lent as a buffer, writable where the
    mapping is, with a count of the buffers lent and not given back."""

    def __init__(self, mapping: Buffer) -> None: ...
    @property
    def exports(self) -> int: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

def runtime_base() -> str:
    """Where this user's runtime folders go: $XDG_RUNTIME_DIR, else $TMPDIR, else /tmp."""

def read_scheduler_file(path: str) -> tuple[str, str, str | None]:
    """(address, token, dashboard address or None) of a scheduler file that is ours and
    writable by nobody else; PermissionError otherwise."""

def write_private(path: str, data: bytes) -> None:
    """Writes data to path readable by its owner only, as a whole; a link or another
    user's file at path is refused (PermissionError)."""

def keep_freed_heap(bytes: int) -> None:
    """Lets this process keep up to `bytes` of freed heap for reuse (glibc)."""

def heap_free_bytes() -> int:
    """Bytes the allocator holds free, their pages resident or given back (glibc)."""

def trim_heap() -> None:
    """Gives the pages of every free chunk of the heap back to the system (glibc)."""

def frame_spans(frames: list[Buffer]) -> list[tuple[int, int]] | None:
    """(address, length) of each frame's bytes in this process, for the worker to copy a
    result the executor keeps; None when a frame is not contiguous."""

def read_lent_frames(pid: int, probe: int, spans: list[tuple[int, int]]) -> list[bytearray]:
    """Copies the frames a peer's executor lends, checking its probe at `probe` before and
    after; PermissionError where this process may not read that one."""
