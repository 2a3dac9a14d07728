"""Cluster-wide Lock, Semaphore, Event, Variable and Queue, as in `dask.distributed`.

The scheduler keeps them by name (`src/scheduler/coordination.rs`); any client, and any
task through `get_client()`, reaches the same object by its name. They pickle as their
name, so they travel inside task graphs and bind to the client of the process that uses
them. A client that disconnects (a task's executor that died) gives back its leases.

Differences from `distributed`: values in a Variable or Queue are pickled, so a Future
cannot be stored in one (TypeError); `Queue(maxsize=)` is not supported.
"""

from __future__ import annotations

import io
import pickle
import threading
import uuid
from typing import Any

import cloudpickle

from .futures import Future

__all__ = ["Event", "Lock", "Queue", "Semaphore", "Variable"]


class _Named:
    """A named object on the scheduler, reached through a client found when first used."""

    def __init__(self, name: str | None = None, client: Any = None) -> None:
        self.name = name or uuid.uuid4().hex
        self._client = client

    def __reduce__(self) -> tuple:
        return type(self), (self.name,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.name}>"

    def _request(self, op: str, value: bytes | None = None, number: int = 0, timeout=None):
        if self._client is None:
            from .client import get_client

            self._client = get_client()
        kind, result, request = self._client._core.coordinate(
            op, self.name, value, number, None if timeout is None else float(timeout)
        )
        if kind == "refused":
            raise RuntimeError(result)
        return kind, result, request


class Semaphore(_Named):
    """At most `max_leases` holders at a time, cluster-wide. Each acquire takes a lease;
    release gives back this object's oldest. Unlike `distributed`, a lease is not
    reclaimed while its holder is alive but silent: it is given back when the holder's
    connection to the scheduler ends (its process exited or died)."""

    def __init__(
        self,
        max_leases: int = 1,
        name: str | None = None,
        client: Any = None,
        register: bool = True,
        scheduler_rpc: Any = None,
        loop: Any = None,
    ) -> None:
        super().__init__(name, client)
        if max_leases < 1:
            raise ValueError(f"max_leases must be at least 1, not {max_leases}")
        self.max_leases = max_leases
        self._leases: list[int] = []
        self._leases_lock = threading.Lock()

    def __reduce__(self) -> tuple:
        return _semaphore, (self.name, self.max_leases)

    def acquire(self, timeout: float | None = None) -> bool:
        kind, _, lease = self._request("acquire", number=self.max_leases, timeout=timeout)
        if kind != "granted":
            return False
        with self._leases_lock:
            self._leases.append(lease)
        return True

    def release(self) -> bool:
        with self._leases_lock:
            if not self._leases:
                raise RuntimeError(f"{self!r} released more often than acquired")
            lease = self._leases.pop(0)
        self._request("release", number=lease)
        return True

    def get_value(self) -> int:
        """How many leases are held now, by anyone."""
        return self._request("leases")[1]

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _semaphore(name: str, max_leases: int) -> Semaphore:
    return Semaphore(max_leases=max_leases, name=name)


class Lock(Semaphore):
    """A cluster-wide mutual-exclusion lock: `Lock(name)` is the same lock in every
    process of the cluster. Locks that xarray and Dask put in graphs for writing (and
    thread locks found in graphs) become these, so writes from workers on different nodes
    to one file take turns."""

    def __init__(self, name: str | None = None, client: Any = None, **kwargs: Any) -> None:
        super().__init__(max_leases=1, name=name, client=client)

    def __reduce__(self) -> tuple:
        return Lock, (self.name,)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if not blocking:
            timeout = 0
        elif timeout is not None and timeout < 0:
            timeout = None  # threading.Lock's "wait forever"
        return super().acquire(timeout=timeout)

    def locked(self) -> bool:
        return self.get_value() > 0


class Event(_Named):
    """A flag tasks and clients wait on: wait() returns once someone set() it."""

    def set(self) -> None:
        self._request("event_set")

    def clear(self) -> None:
        self._request("event_clear")

    def is_set(self) -> bool:
        return self._request("event_is_set")[1]

    def wait(self, timeout: float | None = None) -> bool:
        return self._request("event_wait", timeout=timeout)[0] == "done"


class _ValuePickler(cloudpickle.Pickler):
    """Refuses futures: a Variable or Queue does not hold the results they point to."""

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, Future):
            raise TypeError(
                "rankmesh cannot keep a Future in a Variable or Queue (it would not hold the "
                "result); publish it with client.publish_dataset(name=...) and read it with "
                "get_dataset, or pass the future to the tasks that need it"
            )
        return super().reducer_override(obj)


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _ValuePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


class Variable(_Named):
    """One value shared by name; get() waits for a value to be set."""

    def set(self, value: Any, timeout: float | None = None) -> None:
        self._request("variable_set", _dumps(value))

    def get(self, timeout: float | None = None) -> Any:
        kind, value, _ = self._request("variable_get", timeout=timeout)
        if kind != "value":
            raise TimeoutError(f"{self!r} has no value after {timeout} s")
        return pickle.loads(value)

    def delete(self) -> None:
        self._request("variable_delete")


class Queue(_Named):
    """A first-in first-out queue shared by name; get() waits for an item."""

    def __init__(
        self, name: str | None = None, client: Any = None, maxsize: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(name, client)
        if maxsize:
            raise NotImplementedError("rankmesh's Queue has no maxsize; put() never blocks")

    def put(self, value: Any, timeout: float | None = None) -> None:
        self._request("queue_put", _dumps(value))

    def get(self, timeout: float | None = None, batch: bool | int = False) -> Any:
        if batch is not False:
            count = self.qsize() if batch is True else int(batch)
            return [self.get(timeout=timeout) for _ in range(count)]
        kind, value, _ = self._request("queue_get", timeout=timeout)
        if kind != "value":
            raise TimeoutError(f"{self!r} is empty after {timeout} s")
        return pickle.loads(value)

    def qsize(self) -> int:
        return self._request("queue_size")[1]
