"""Futures on task results, and waiting on several of them."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION
from typing import TYPE_CHECKING, Any, NamedTuple

from dask._task_spec import TaskRef

from .helper_threads import start_helper_thread

if TYPE_CHECKING:
    from .client import Client

# What futures ask of their client (named, so the client's insides can change): _hold,
# _hold_new and _drop as futures come and go, _task_state, _wait_ids, _error_of, gather and
# cancel.

__all__ = ["DoneAndNotDone", "Future", "as_completed", "fire_and_forget", "futures_of", "wait"]


class DoneAndNotDone(NamedTuple):
    done: set[Future]
    not_done: set[Future]


class Future(TaskRef):
    """A task's result, held on the cluster while any Future on it is alive.

    A TaskRef to Dask, so a Future inside a Dask graph is a dependency on its task.
    Pickled, as in `distributed`, it becomes a future of the client where it is unpickled
    (`get_client()` there), which then holds the result too."""

    __slots__ = ("task_id", "_client", "__weakref__")

    def __init__(self, client: Client, task_id: int, key: Any) -> None:
        super().__init__(key)
        self.task_id = task_id
        self._client = client
        client._hold(self)

    @classmethod
    def _many(cls, client: Client, ids: list[int], keys: list[Any]) -> list[Future]:
        """Futures on new tasks (ids no future of `client` holds yet), one per id, made
        without a call per future (`client.map` makes 10^6 of them)."""
        new = cls.__new__
        made = []
        append = made.append
        for task_id, key in zip(ids, keys, strict=True):
            future = new(cls)
            future.key = key
            future.task_id = task_id
            future._client = client
            append(future)
        client._hold_new(ids, keys)
        return made

    def __del__(self) -> None:
        self._client._drop(self.task_id, self.key)

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key!r}>"

    def __reduce__(self):
        return _adopt_future, (self.task_id, self.key)

    @property
    def client(self) -> Client:
        return self._client

    @property
    def status(self) -> str:
        """pending, finished, error, cancelled or lost."""
        return self._client._task_state(self.task_id)

    def done(self) -> bool:
        return self.status != "pending"

    def result(self, timeout: float | None = None) -> Any:
        """The task's value; raises the task's exception as it was raised."""
        return self._client.gather(self, timeout=timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._client._wait_ids([self.task_id], timeout, "ALL")
        return self._client._error_of(self)

    def cancel(self) -> None:
        self._client.cancel([self])

    def add_done_callback(self, callback: Callable[[Future], Any]) -> None:
        """Calls callback(self) once the task ended (finished, erred or cancelled), in a
        thread of its own, as `distributed` calls it off the caller's thread; an exception
        it raises is logged."""

        def wait_then_call() -> None:
            try:
                self._client._wait_ids([self.task_id], None, "ALL")
                callback(self)
            except Exception:  # noqa: BLE001 - a callback's failure must not pass silently
                logging.getLogger("rankmesh").exception("done callback of %r failed", self)

        start_helper_thread(wait_then_call, "rankmesh-done-callback")


class DetachedFuture(TaskRef):
    """What a Future becomes when a task's payload holds it other than as an input (a
    persisted collection inside the function that finalizes a result, as xarray's are):
    its key, for the structure to stay intact, and no value. Unlike `distributed`, a task
    cannot wait on it: pass the future as an argument to have its value."""

    __slots__ = ()

    def __reduce__(self):
        return DetachedFuture, (self.key,)

    def result(self, timeout: float | None = None) -> Any:
        raise RuntimeError(
            f"the future on {self.key!r} was shipped inside a task, where it has no client: "
            "pass it as an argument of the task to have its value"
        )


_adopting = threading.local()


@contextlib.contextmanager
def adopting_into(client: Client) -> Iterator[None]:
    """Futures unpickled in this block (on this thread) become `client`'s."""
    previous = getattr(_adopting, "client", None)
    _adopting.client = client
    try:
        yield
    finally:
        _adopting.client = previous


def _adopt_future(task_id: int, key: Any) -> Future:
    client = getattr(_adopting, "client", None)
    if client is None:
        from .client import get_client

        client = get_client()
    return client._adopt(task_id, key)


def _group_ids(futures: Iterable[Future]) -> tuple[Client, dict[int, list[Future]]]:
    by_id: dict[int, list[Future]] = {}
    client = None
    for future in futures:
        if client is None:
            client = future._client
        elif future._client is not client:
            raise ValueError("futures from several clients cannot be waited on together")
        by_id.setdefault(future.task_id, []).append(future)
    if client is None:
        raise ValueError("no futures given")
    return client, by_id


def futures_of(collections: Any) -> list[Future]:
    """The futures in `collections`: futures, persisted Dask collections (their graphs hold
    futures), and lists, tuples, sets and dicts of them, as `distributed.futures_of`."""
    from dask.base import is_dask_collection

    found: dict[int, Future] = {}
    stack = [collections]
    while stack:
        item = stack.pop()
        if isinstance(item, Future):
            found.setdefault(item.task_id, item)
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif is_dask_collection(item):
            stack.extend(dict(item.__dask_graph__()).values())
    return list(found.values())


def wait(
    futures: Any, timeout: float | None = None, return_when: str = "ALL_COMPLETED"
) -> DoneAndNotDone:
    """Like concurrent.futures.wait: (done, not_done) sets of futures. Takes persisted Dask
    collections too, as `distributed.wait` does."""
    futures = futures_of(futures)
    if not futures:
        return DoneAndNotDone(set(), set())
    client, by_id = _group_ids(futures)
    ids = list(by_id)
    if return_when == FIRST_EXCEPTION:
        ended = _wait_first_exception(client, ids, timeout)
    else:
        mode = "ANY" if return_when == FIRST_COMPLETED else "ALL"
        ended = set(client._wait_ids(ids, timeout, mode))
    done = {f for task_id in ended for f in by_id[task_id]}
    return DoneAndNotDone(done, set(futures) - done)


def _wait_first_exception(client: Client, ids: list[int], timeout: float | None) -> set[int]:
    ended: set[int] = set()
    pending = list(ids)
    while pending:
        newly = client._wait_ids(pending, timeout, "ANY")
        if not newly:
            break
        ended.update(newly)
        if any(client._task_state(task_id) != "finished" for task_id in newly):
            break
        pending = [task_id for task_id in pending if task_id not in ended]
    return ended


def as_completed(futures: Iterable[Future], with_results: bool = False) -> Iterator[Any]:
    """Yields futures as their tasks end (with their results if `with_results`)."""
    futures = list(futures)
    if not futures:
        return
    client, by_id = _group_ids(futures)
    pending = list(by_id)
    while pending:
        ended = set(client._wait_ids(pending, None, "ANY"))
        pending = [task_id for task_id in pending if task_id not in ended]
        for task_id in ended:
            for future in by_id[task_id]:
                yield (future, future.result()) if with_results else future


def fire_and_forget(futures: Any) -> None:
    """Runs the tasks behind `futures` to the end even once no one holds them, as in
    `distributed`; unlike there, only while their client is open (closing it cancels them)."""
    for future in futures_of(futures):
        future.add_done_callback(_ignore)  # the waiting thread holds the future


def _ignore(_future: Future) -> None:
    pass
