"""Dask's local-scheduler callbacks (`dask.callbacks.Callback`) around a rankmesh `get`,
so that `with dask.diagnostics.ProgressBar():` works as it does on Dask's own schedulers.

Tasks run elsewhere, and the client hears how many of its tasks are computed
(`ClientCore.watch_progress`), not which: the state's `finished` list grows by that count
(in submission order) and `waiting` shrinks. `pretask` is called for every task when the
graph is submitted, `posttask` (with no result) as the count passes it: their times are
when the client submitted and heard, not when a worker ran the task."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dask.callbacks import Callback, local_callbacks, unpack_callbacks

from .helper_threads import start_helper_thread

__all__ = ["dask_callbacks"]

POLL_S = 0.1


@contextlib.contextmanager
def dask_callbacks(core: Any, dsk: Any) -> Iterator[Callable[[list], None] | None]:
    """Runs the active callbacks around a computation of `dsk`. Yields None when there are
    none; else a function to call with the submitted task keys, which starts following
    their progress until the block ends."""
    if not Callback.active:
        yield None
        return
    with local_callbacks(None) as callbacks:
        start, start_state, pretask, posttask, finish = unpack_callbacks(callbacks)
        for callback in start:
            callback(dsk)
        core.watch_progress(True)
        state: dict[str, Any] = {
            "cache": {},
            "ready": [],
            "running": [],
            "waiting": [],
            "finished": [],
            "released": [],
        }
        stop = threading.Event()
        follower: list[threading.Thread] = []

        def follow(keys: list) -> None:
            state["waiting"] = list(keys)
            for callback in start_state:
                callback(dsk, state)
            for key in keys:
                for callback in pretask:
                    callback(key, dsk, state)
            thread = start_helper_thread(
                _follow,
                "rankmesh-callbacks",
                (core, keys, state, stop, lambda key: _posttask(posttask, key, dsk, state)),
            )
            follower.append(thread)

        errored = True
        try:
            yield follow
            errored = False
        finally:
            stop.set()
            for thread in follower:
                thread.join()
            core.watch_progress(False)
            if not errored:
                state["finished"] = state["finished"] + state["waiting"]
                state["waiting"] = []
            for callback in finish:
                callback(dsk, state, errored)


def _posttask(hooks: list[Callable], key: Any, dsk: Any, state: dict[str, Any]) -> None:
    for hook in hooks:
        hook(key, None, dsk, state, None)


def _follow(
    core: Any,
    keys: list,
    state: dict[str, Any],
    stop: threading.Event,
    finished: Callable[[Any], None],
) -> None:
    reported = 0
    while not stop.wait(POLL_S):
        done = min(len(keys), core.computed() or 0)
        state["finished"], state["waiting"] = keys[:done], keys[done:]
        for key in keys[reported:done]:
            finished(key)
        reported = max(reported, done)
