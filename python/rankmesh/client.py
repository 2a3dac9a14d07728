"""The Client: submits work to a rankmesh scheduler and is a Dask scheduler (`get`)."""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from itertools import islice, repeat
from typing import Any

import cloudpickle
import dask.config
from dask.utils import key_split

from . import dask_recognition
from . import graph as graphs
from .dashboard_links import cluster_html, dashboard_link, format_bytes
from .dask_callbacks import dask_callbacks
from .errors import CancelledError, FutureLost
from .futures import Future, adopting_into
from .helper_threads import start_helper_thread
from .payloads import FunctionRegistry, PayloadEncoder
from .serialize import loads_error, loads_frames
from .task_options import Options, TaskAnnotations, annotations_of, refuse_actors

__all__ = ["Client", "get_client", "rejoin", "secede", "worker_client"]

# A result whose worker died is recomputed once the scheduler sees the worker go, which takes
# moments: how long to keep trying a worker that does not answer, and how often.
LOST_RESULT_PATIENCE = 60.0
LOST_RESULT_RETRY_S = 0.05
_NO_DEFAULT = object()


def _connection_details(
    address: Any, scheduler_file: str | None, token: str | None
) -> tuple[str, str, str | None]:
    """(scheduler address, token, dashboard address if known)."""
    dashboard = None
    if address is not None and not isinstance(address, str):
        scheduler_file = address.scheduler_file  # a LocalCluster
        address = None
    if address is None and scheduler_file is None:
        scheduler_file = os.environ.get("RANKMESH_SCHEDULER_FILE")
    if scheduler_file is not None:
        from ._rankmesh import read_scheduler_file

        # Refused unless ours and writable by nobody else: a planted file would send the
        # client, and the code it submits, to someone else's scheduler.
        address, file_token, dashboard = read_scheduler_file(os.fspath(scheduler_file))
        token = token or file_token
    if address is None:
        raise ValueError(
            "no scheduler to connect to: pass address= or scheduler_file=, "
            "or set RANKMESH_SCHEDULER_FILE"
        )
    token = token or os.environ.get("RANKMESH_TOKEN")
    if not token:
        raise ValueError(
            f"no token for {address}: pass token=, use a scheduler file, or set RANKMESH_TOKEN"
        )
    return address, token, dashboard


# client.map submits in chunks: small first, so the cluster starts at once, then larger.
MAP_FIRST_CHUNK = 1024
MAP_MAX_CHUNK = 16384


def _key_prefix(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


# How often the tasks of dropped futures go to the scheduler between the client's calls.
RELEASE_INTERVAL_S = 0.05


def _drain(queue: deque) -> list:
    """Everything in `queue`, taken out one by one: others may append meanwhile."""
    taken = []
    with contextlib.suppress(IndexError):
        while True:
            taken.append(queue.popleft())
    return taken


def _release_dropped(
    core: Any, dropped: deque, released: deque, lock: threading.Lock, stop: threading.Event
) -> None:
    """Releases the tasks of dropped futures on the scheduler while the client makes no
    calls (a notebook after `del x`), as `distributed` does at once: the workers' memory
    does not wait for the next call. The function registry is the client's own, so the
    ids are left in `released` for its next call to note there."""
    while not stop.wait(RELEASE_INTERVAL_S):
        with lock:
            ids = _drain(dropped)
            if ids:
                core.release(ids)
                released.extend(ids)


class Client:
    """A connection to a rankmesh cluster, with dask.distributed's method names.

    Unlike `distributed`, a scheduler file is read only if it belongs to you and nobody
    else may write it (PermissionError otherwise): whoever can write it could send the
    client, and the code it submits, to their own scheduler."""

    def __init__(
        self,
        address: Any = None,
        scheduler_file: str | None = None,
        token: str | None = None,
        timeout: float = 10,
    ) -> None:
        from ._rankmesh import ClientCore

        self.address, token, dashboard = _connection_details(address, scheduler_file, token)
        self._core = ClientCore(self.address, token, timeout)
        # The dashboard's address and the token its requests carry.
        self._dashboard = (dashboard, token) if dashboard is not None else None
        self._encoder = PayloadEncoder(FunctionRegistry())
        # Futures alive per task id; at zero the id waits in _to_release (a deque: futures
        # are dropped on any thread) for the next call or the releasing thread, which
        # leaves what it released in _released_meanwhile. Taking ids out of _to_release and
        # releasing them is one step under _releasing_lock, so that a future made again
        # on a dropped task (`_adopt`) can take its id back before the release is sent.
        self._holds: dict[int, int] = {}
        self._to_release: deque[int] = deque()
        self._released_meanwhile: deque[int] = deque()
        self._releasing_lock = threading.Lock()
        self._stop_releasing = threading.Event()
        self._releasing = start_helper_thread(
            _release_dropped,
            "rankmesh-client-releases",
            (
                self._core,
                self._to_release,
                self._released_meanwhile,
                self._releasing_lock,
                self._stop_releasing,
            ),
        )
        weakref.finalize(self, self._stop_releasing.set)
        # The task of each key a future of this client holds (the latest one made with that
        # key). An entry whose task is no longer in _holds is stale: ignored, pruned.
        self._by_key: dict[Any, int] = {}
        self._default_config: Any = None
        self._closed = False
        # Clients that are gone need no place in the list.
        _created[:] = [ref for ref in _created if ref() is not None]
        _created.append(weakref.ref(self))
        dask_recognition.install(Client)

    def __repr__(self) -> str:
        return f"<rankmesh.Client: {self.address}{' (closed)' if self._closed else ''}>"

    @property
    def dashboard_link(self) -> str | None:
        """The live status page, with the cluster token in it (opening it sets a cookie and
        drops the token from the address bar); through jupyter-server-proxy under JupyterHub.
        None when the client was given an address rather than a scheduler file or cluster,
        or the cluster has no dashboard. Keep it to yourself: it opens the cluster."""
        return dashboard_link(*self._dashboard) if self._dashboard is not None else None

    def _repr_html_(self) -> str:
        workers = [] if self._closed else self.workers()
        memory = sum(int(w.get("memory_limit", 0)) for w in workers)
        return cluster_html(
            "Client",
            self.address,
            self.dashboard_link,
            [
                ("workers", len(workers)),
                ("threads", sum(int(w["nthreads"]) for w in workers)),
                ("memory", format_bytes(memory) if memory else "no limit"),
            ],
        )

    # A connection is not data: copies (dask.config is deep-copied with client.get in it
    # while the client is the default scheduler) are the client itself.
    def __copy__(self) -> Client:
        return self

    def __deepcopy__(self, memo: dict) -> Client:
        return self

    # ---------------------------------------------------------------- futures' bookkeeping

    def _hold(self, future: Future) -> None:
        self._holds[future.task_id] = self._holds.get(future.task_id, 0) + 1
        self._by_key[future.key] = future.task_id

    def _hold_new(self, ids: list[int], keys: list[Any]) -> None:
        """_hold for one new future on each of `ids`, tasks no future holds yet."""
        self._holds.update(zip(ids, repeat(1)))
        self._by_key.update(zip(keys, ids, strict=True))

    def _drop(self, task_id: int, key: Any) -> None:
        # Runs in Future.__del__: no native call here, only a note for the next call or
        # the releasing thread.
        count = self._holds.get(task_id, 0) - 1
        if count > 0:
            self._holds[task_id] = count
        elif count == 0:
            del self._holds[task_id]
            self._to_release.append(task_id)
            if self._by_key.get(key) == task_id:
                self._by_key.pop(key, None)

    def _held_task(self, key: Any) -> int | None:
        """The task of a future of this client with this key, if one is alive."""
        task_id = self._by_key.get(key)
        return task_id if task_id is not None and task_id in self._holds else None

    def _adopt(self, task_id: int, key: Any) -> Future:
        """A future on a task this client may not hold yet (one unpickled here): holding it
        on the scheduler too keeps the result while this future lives. A task whose last
        future was dropped here and whose release is not sent yet is simply not released
        (`distributed` sends that release after the new hold, and loses the task)."""
        if task_id not in self._holds:
            with self._releasing_lock:
                try:
                    self._to_release.remove(task_id)
                except ValueError:
                    self._core.want([task_id])
        return Future(self, task_id, key)

    def _flush_releases(self) -> None:
        if not self._closed:
            with self._releasing_lock:
                self._release(_drain(self._to_release), _drain(self._released_meanwhile))
        if len(self._by_key) > 2 * len(self._holds) + 1024:
            # Keys another key's future replaced (aliases of one task, a key reused).
            holds = self._holds
            self._by_key = {k: i for k, i in self._by_key.items() if i in holds}

    def _release(self, task_ids: list[int], released: Sequence[int] = ()) -> None:
        """Releases tasks on the scheduler (`released`: already done there), and the
        functions no held task uses."""
        registry = self._encoder.registry
        if task_ids:
            self._core.release(task_ids)
        if task_ids or released:
            registry.released([*task_ids, *released])
        unused = registry.take_unused()
        if unused:
            self._core.release_functions(unused)

    def _submit(
        self,
        tasks: list,
        wanted: list[int],
        restrictions: dict[int, list[int]] | None = None,
        options: dict[int, Options] | None = None,
    ) -> None:
        registry = self._encoder.registry
        # Functions stay shipped here: the tasks about to go may use them.
        with registry.deferring_releases():
            self._flush_releases()
        functions = registry.submitted(tasks, wanted)
        self._core.submit(functions, tasks, wanted, restrictions or None, options or None)

    def _call_annotations(
        self,
        workers: Any,
        retries: int | None,
        priority: int,
        allow_other_workers: bool,
        resources: dict | None,
        actor: bool,
    ) -> TaskAnnotations:
        """The options of submitted calls: submit's keywords, over `dask.annotate`'s."""
        refuse_actors(actor)
        given = {
            "workers": workers,
            "retries": retries,
            "priority": priority,
            "allow_other_workers": allow_other_workers,
            "resources": resources,
        }
        defaults = {**dask.get_annotations(), **{k: v for k, v in given.items() if v}}
        return TaskAnnotations({}, self._worker_ids, defaults)

    def _worker_ids(self, workers: Any) -> list[int]:
        """Worker ids for a `workers=` argument: ids, data addresses ("host:port", with or
        without "tcp://"), host names, or dicts from `workers()`; one or a list."""
        if isinstance(workers, int | str | dict):
            workers = [workers]
        known = self.workers()
        ids: list[int] = []
        for wanted in workers:
            if isinstance(wanted, dict):
                wanted = wanted["id"]
            if isinstance(wanted, str):
                address = wanted.removeprefix("tcp://")
                matches = [w["id"] for w in known if address in (w["data_address"], w["host"])]
                if not matches:
                    raise ValueError(f"no worker at {wanted!r}; workers: {known}")
                ids.extend(matches)
            elif isinstance(wanted, int) and not isinstance(wanted, bool):
                ids.append(wanted)
            else:
                raise TypeError(f"workers= takes ids, addresses or host names, not {wanted!r}")
        return ids

    def _wait_ids(self, ids: list[int], timeout: float | None, return_when: str) -> list[int]:
        self._flush_releases()
        return self._core.wait(ids, timeout, return_when)

    def _task_state(self, task_id: int) -> str:
        """pending, finished, error, cancelled or lost."""
        return self._core.state(task_id)

    def _error_of(self, future: Future) -> BaseException | None:
        return self._failure(future.task_id)

    def _failure(self, task_id: int) -> BaseException | None:
        state = self._core.state(task_id)
        if state == "error":
            return loads_error(self._core.error(task_id))
        if state == "cancelled":
            return CancelledError(f"task {task_id} was cancelled")
        if state == "lost":
            return FutureLost(f"the result of task {task_id} was lost")
        return None

    def _collect(self, ids: list[int], timeout: float | None, ordered: bool = False) -> Any:
        """Values of tasks by id (with `ordered`, a list in the order of `ids`): one wait
        and one fetch for all of them. A result whose worker died meanwhile is waited for
        again (the scheduler recomputes it or names another copy); one whose worker does
        not answer and is not seen to go either, for LOST_RESULT_PATIENCE seconds."""
        unique = list(dict.fromkeys(ids))
        values: dict[int, Any] = {}
        wanted = unique
        patience: float | None = None
        while True:
            ended = self._wait_ids(wanted, timeout, "ALL")
            if len(ended) < len(wanted):
                pending = len(wanted) - len(ended)
                raise TimeoutError(f"{pending} of {len(unique)} tasks still pending")
            for task_id in self._core.unfinished(wanted):
                failure = self._failure(task_id)
                if failure is not None:
                    raise failure
            fetched, missing = self._core.fetch_loaded(wanted, loads_frames)
            if not missing and not values:  # all at the first try, in the order of unique
                if ordered and len(unique) == len(ids):
                    return fetched
                values = dict(zip(wanted, fetched, strict=True))
                return [values[task_id] for task_id in ids] if ordered else values
            values.update(
                (task_id, value)
                for task_id, value in zip(wanted, fetched, strict=True)
                if task_id not in missing
            )
            del fetched
            if not missing:
                if ordered:
                    return [values[task_id] for task_id in ids]
                return {task_id: values[task_id] for task_id in unique}
            patience = patience or time.monotonic() + LOST_RESULT_PATIENCE
            if time.monotonic() > patience:
                task_id, why = next(iter(missing.items()))
                raise FutureLost(f"the result of task {task_id} cannot be fetched: {why}")
            wanted = list(missing)
            # Until the scheduler has seen the worker go, the result still points at it.
            time.sleep(LOST_RESULT_RETRY_S)

    # ---------------------------------------------------------------------- plain futures

    def submit(
        self,
        func: Callable,
        *args: Any,
        key: Any = None,
        workers: Any = None,
        resources: dict | None = None,
        retries: int | None = None,
        priority: int = 0,
        fifo_timeout: Any = None,
        allow_other_workers: bool = False,
        actor: bool = False,
        actors: bool = False,
        pure: bool = False,
        **kwargs: Any,
    ) -> Future:
        """Runs func(*args, **kwargs) on the cluster; futures in the arguments (also inside
        lists, tuples and dicts) are replaced by their values. With pure=True, an identical
        call returns a future on the earlier task.

        As in `distributed`: `workers` (ids, addresses or host names, see `_worker_ids`)
        are the only workers that may run it, or with allow_other_workers=True the ones it
        prefers; `retries`: runs again this many times after raising; `priority`: higher
        runs first among waiting tasks; `resources` ({"GPU": 1}): held on its worker while
        it runs, so it goes only where they are free; `dask.annotate(...)` around the call
        sets the same. Unlike `distributed`: pure defaults to False (every call runs); a
        task whose only allowed workers are all gone, or whose resources no connected worker
        has, fails with NoWorkerError instead of waiting; actors are refused
        (NotImplementedError); `fifo_timeout` is accepted and has no effect."""
        options = (workers, retries, priority, allow_other_workers, resources, actor or actors)
        annotations = self._call_annotations(*options)
        if key is None and pure:
            from dask.base import tokenize

            key = f"{_key_prefix(func)}-{tokenize(func, args, kwargs)}"
        if key is not None:
            existing = self._held_task(key)
            if existing is not None:
                return Future(self, existing, key)
        task_id = self._core.next_task_id(1)
        payload, deps, funcs = self._encoder.call(func, args, kwargs)
        restrictions, options = _options_by_id(annotations, [task_id])
        prefix = key_split(key) if key is not None else _key_prefix(func)
        task = (task_id, deps, funcs, payload, annotations.priority(None, 0), prefix)
        self._submit([task], [task_id], restrictions, options)
        return Future(self, task_id, key if key is not None else f"{prefix}-{task_id:x}")

    def submit_command(
        self,
        args: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        **options: Any,
    ) -> Future:
        """Runs a program (an argument list, or a string for /bin/sh) as a task, as
        HyperQueue's jobs do; the future's value is a `subprocess.CompletedProcess` with
        `returncode`, `stdout` and `stderr` (bytes). A non-zero exit makes the task fail
        with `subprocess.CalledProcessError` (with the output) unless check=False.
        `options` are submit's (`resources={"GPU": 1}`, `workers=`, `retries=`...). The
        program gets the executor's environment without its MPI rank variables, plus `env`,
        so an `mpirun` command starts its own ranks; cancelling the task kills it."""
        from .commands import run_command

        return self.submit(run_command, args, cwd, env, stdin, timeout, check, **options)

    def map(
        self,
        func: Callable,
        *iterables: Iterable,
        key: Any = None,
        workers: Any = None,
        retries: int | None = None,
        resources: dict | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        actor: bool = False,
        actors: bool = False,
        pure: bool = False,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list:
        """submit() for each tuple of arguments, with submit's options for every call.
        `pure` and `batch_size` are accepted for dask.distributed compatibility and
        ignored: every call runs. The calls go in chunks (`MAP_FIRST_CHUNK` doubling up to
        `MAP_MAX_CHUNK`) while the rest are being encoded, so the cluster starts at once
        and 10^6 encoded calls are never all here at the same time."""
        options = (workers, retries, priority, allow_other_workers, resources, actor or actors)
        annotations = self._call_annotations(*options)
        restriction = annotations.restriction(None)
        task_options = annotations.options(None)
        first_priority = annotations.priority(None, 0)
        prefix = key if isinstance(key, str) else _key_prefix(func)
        keys = iter(key) if isinstance(key, list) else None
        calls = zip(*iterables, strict=True)
        futures: list[Future] = []
        size = MAP_FIRST_CHUNK
        encode = None
        with graphs.gc_paused():
            while chunk := list(islice(calls, size)):
                if encode is None:  # not before there is a call: it registers func
                    encode = self._encoder.calls(func, kwargs)
                first = self._core.next_task_id(len(chunk))
                ids = list(range(first, first + len(chunk)))  # one int object per id, shared
                payloads, deps, funcs = encode(chunk)
                del chunk
                self._submit_calls(
                    first,
                    ids,
                    payloads,
                    deps,
                    funcs,
                    first_priority + len(futures),
                    prefix,
                    restriction,
                    task_options,
                )
                del payloads
                if keys is None:
                    chunk_keys = [f"{prefix}-{task_id:x}" for task_id in ids]
                else:
                    chunk_keys = list(islice(keys, len(ids)))
                try:
                    futures.extend(Future._many(self, ids, chunk_keys))
                except ValueError:  # fewer keys than calls: no future holds these tasks
                    self._release(ids)
                    raise
                size = min(2 * size, MAP_MAX_CHUNK)
        return futures

    def _submit_calls(
        self,
        first: int,
        ids: list[int],
        payloads: list[bytes],
        deps: list[list[int]],
        funcs: list[list[int]],
        first_priority: int,
        prefix: str,
        restriction: list[int] | None,
        options: Options | None,
    ) -> None:
        """Submits calls `ids` (consecutive from `first`), all held: `_submit` in columns."""
        registry = self._encoder.registry
        with registry.deferring_releases():
            self._flush_releases()
        functions = registry.calls_submitted(ids, funcs)
        self._core.submit_calls(
            functions,
            first,
            payloads,
            deps,
            funcs,
            first_priority,
            prefix,
            restriction,
            options,
        )

    def scatter(self, data: Any) -> Any:
        """Futures on data placed on the cluster: one per item of a list, tuple or dict."""
        if isinstance(data, dict):
            return dict(zip(data, self.scatter(list(data.values())), strict=True))
        single = not isinstance(data, list | tuple)
        values = [data] if single else list(data)
        if not values:
            return []
        first = self._core.next_task_id(len(values))
        tasks = []
        for offset, value in enumerate(values):
            payload, _, funcs = self._encoder.data(value)
            tasks.append((first + offset, [], funcs, payload, offset, "data"))
        ids = [task[0] for task in tasks]
        self._submit(tasks, ids)
        futures = [Future(self, task_id, f"data-{task_id:x}") for task_id in ids]
        return futures[0] if single else futures

    def gather(self, futures: Any, timeout: float | None = None) -> Any:
        """Values for futures, in the same nesting (lists, tuples, sets, dicts)."""
        if type(futures) is list and all(type(future) is Future for future in futures):
            ids = [future.task_id for future in futures]  # a map's futures: no walk
            return self._collect(ids, timeout, ordered=True)
        ids: list[int] = []
        _walk_futures(futures, lambda future: ids.append(future.task_id))
        values = self._collect(ids, timeout)
        return _replace_futures(futures, values)

    def cancel(self, futures: Future | Iterable[Future]) -> None:
        futures = [futures] if isinstance(futures, Future) else list(futures)
        self._core.cancel([future.task_id for future in futures])

    # ------------------------------------------------------------------------------- dask

    def _submit_graph(
        self, dsk: Any, outputs: list, options: Mapping[str, Any] | None = None
    ) -> tuple[graphs.GraphTasks, list[int]]:
        """Submits what `outputs` need; returns the tasks and the new ids among the outputs.
        Each task's options: its annotations in the graph, else `options` (compute's and
        persist's keywords), else `dask.annotate`'s around the call."""
        with graphs.gc_paused():
            return self._submit_graph_now(dsk, outputs, options)

    def _submit_graph_now(
        self, dsk: Any, outputs: list, options: Mapping[str, Any] | None
    ) -> tuple[graphs.GraphTasks, list[int]]:
        annotations = TaskAnnotations(
            annotations_of(dsk),
            self._worker_ids,
            {**dask.get_annotations(), **{k: v for k, v in (options or {}).items() if v}},
        )
        graph, held = graphs.materialize(dsk)

        def external(key: Any) -> int | None:
            if key in held:
                return held[key]
            return self._held_task(key)

        def submit(tasks: list, held: list[int], release: list[int], *options: dict) -> None:
            self._submit(tasks, held, *options)
            if release:
                self._release(release)

        # The graph's chunks share functions: none is released until all are submitted.
        with self._encoder.registry.deferring_releases():
            built = graphs.graph_tasks(
                graph,
                outputs,
                external,
                self._core.next_task_id,
                self._encoder,
                submit,
                annotations,
            )
        wanted = list(dict.fromkeys(built.key_ids[key] for key in outputs))
        wanted = [task_id for task_id in wanted if task_id in built.task_ids]
        return built, wanted

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Dask's scheduler entry point: `dask.compute(x, scheduler=client.get)`. Takes
        submit's `workers`, `retries`, `priority`, `allow_other_workers` for every task.
        Active `dask.callbacks` (`dask.diagnostics.ProgressBar`) are run as Dask's local
        schedulers run them, except the per-task hooks (see dask_callbacks.py)."""
        outputs = graphs.flatten_keys(keys)
        with dask_callbacks(self._core, dsk) as follow:
            built, wanted = self._submit_graph(dsk, outputs, _graph_options(kwargs))
            if follow is not None:
                submitted = built.task_ids
                follow([key for key, task_id in built.key_ids.items() if task_id in submitted])
            try:
                values = self._collect([built.key_ids[key] for key in outputs], None)
            except KeyboardInterrupt:
                self._core.cancel(list(built.task_ids))
                raise
            finally:
                self._to_release.extend(wanted)
        return graphs.repack(keys, {key: values[built.key_ids[key]] for key in outputs})

    def compute(
        self, collections: Any, sync: bool = False, optimize_graph: bool = True, **kwargs: Any
    ) -> Any:
        """Futures on the final values of Dask collections (their values if sync=True).
        Takes submit's `workers`, `retries`, `priority`, `allow_other_workers`."""
        single = not isinstance(collections, list | tuple)
        collections = [collections] if single else list(collections)
        with dask.config.set(graphs.DASK_CONFIG), graphs.gc_paused():
            expr, keys = graphs.compute_expression(collections, optimize_graph)
        built, _ = self._submit_graph(expr, keys, _graph_options(kwargs))
        futures = [Future(self, built.key_ids[key], key) for key in keys]
        result = self.gather(futures) if sync else futures
        return result[0] if single else result

    def persist(self, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
        """The collections, computed on the cluster and held there by futures in their graphs.
        Takes submit's `workers`, `retries`, `priority`, `allow_other_workers`."""
        single = not isinstance(collections, list | tuple)
        collections = [collections] if single else list(collections)
        with dask.config.set(graphs.DASK_CONFIG), graphs.gc_paused():
            expr, keys, rebuild = graphs.persist_expression(collections, optimize_graph)
        outputs = [key for collection_keys in keys for key in collection_keys]
        built, _ = self._submit_graph(expr, outputs, _graph_options(kwargs))
        futures = {key: Future(self, built.key_ids[key], key) for key in outputs}
        rebuilt = rebuild(futures)
        return rebuilt[0] if single else rebuilt

    # -------------------------------------------------------------------------- lifecycle

    # ------------------------------------------------------------------ published datasets

    def publish_dataset(
        self, *args: Any, name: str | None = None, override: bool = False, **kwargs: Any
    ) -> None:
        """Publishes values (futures, persisted collections, anything picklable) under
        names, as `distributed`: `publish_dataset(x, name="x")` or `publish_dataset(x=x)`.
        The scheduler holds the futures inside until `unpublish_dataset`, also after this
        client closes; a name taken already raises KeyError unless override=True."""
        if args:
            if name is None:
                raise ValueError("publish_dataset(*args) needs name=")
            kwargs[name] = args[0] if len(args) == 1 else list(args)
        from .futures import futures_of

        for dataset_name, value in kwargs.items():
            tasks = [future.task_id for future in futures_of(value)]
            pickled = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            kind, why, _ = self._core.dataset("publish", dataset_name, pickled, tasks, override)
            if kind == "refused":
                raise (KeyError if "already exists" in why else ValueError)(why)

    def unpublish_dataset(self, name: str) -> None:
        """Removes a published dataset (if there is one); its results go unless something
        else holds them."""
        self._core.dataset("unpublish", name)

    def get_dataset(self, name: str, default: Any = _NO_DEFAULT, **kwargs: Any) -> Any:
        """A published dataset; its futures become this client's. KeyError (or `default`)
        if there is none."""
        kind, value, _ = self._core.dataset("get", name)
        if kind == "refused":
            if default is not _NO_DEFAULT:
                return default
            raise KeyError(value)
        with adopting_into(self):
            return pickle.loads(value)

    def list_datasets(self, **kwargs: Any) -> list[str]:
        """The names of the published datasets."""
        return self._core.dataset("list")[1]

    @property
    def datasets(self) -> Datasets:
        """The published datasets as a mapping: `client.datasets["x"] = x`, `del ...`."""
        return Datasets(self)

    def as_default(self) -> Client:
        """Makes this client Dask's scheduler until close()."""
        if self._default_config is None:
            self._default_config = dask.config.set({"scheduler": self.get, **graphs.DASK_CONFIG})
        return self

    def workers(self) -> list[dict[str, object]]:
        return self._core.workers()

    @staticmethod
    def _address(worker: Mapping[str, Any]) -> str:
        """A worker as `distributed` names it: its data server's address."""
        return f"tcp://{worker['data_address']}"

    def register_plugin(self, plugin: Any, name: str | None = None, idempotent: Any = None) -> None:
        """Sets `plugin` up (`plugin.setup(worker=...)`) in every executor process of every
        worker, and in every one that starts later; one of the same name is torn down first.
        Unlike `distributed`: it runs in executor processes (one per thread), `worker` is a
        `rankmesh.WorkerContext`, a setup that raises is reported in the worker's log rather
        than here, and nothing is returned. Scheduler and nanny plugins are refused."""
        import cloudpickle

        if not callable(getattr(plugin, "setup", None)):
            raise TypeError(f"{plugin!r} is not a worker plugin: it has no setup(worker)")
        kind = type(plugin).__mro__
        if any(cls.__name__ in ("SchedulerPlugin", "NannyPlugin") for cls in kind):
            raise NotImplementedError("rankmesh runs worker plugins only")
        name = name or getattr(plugin, "name", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        self._core.register_plugin(name, cloudpickle.dumps(plugin))

    register_worker_plugin = register_plugin

    def unregister_worker_plugin(self, name: str) -> None:
        """Tears the plugin down in every executor; new ones no longer set it up."""
        self._core.unregister_plugin(name)

    def upload_file(self, filename: str | os.PathLike, load: bool = True) -> None:
        """Puts a .py, .zip, .egg or .whl file on every executor's import path (now and in
        executors that start later), importing a module, as `distributed`'s."""
        from .plugins import UploadFile

        self.register_plugin(UploadFile(filename, load))

    def restart(self, timeout: float = 30, wait_for_workers: bool = True) -> None:
        """Cancels every task of every client on the cluster (their futures read
        "cancelled") and restarts every executor process, as `distributed` restarts its
        workers: module state and memory that task code left behind are gone. The workers
        themselves (Rust) stay; tasks submitted next run once executors are back."""
        self._flush_releases()
        self._core.restart()
        self._core.info(timeout)  # answered after the restart: the scheduler has done it
        if wait_for_workers:
            self.wait_for_workers(len(self.workers()), timeout)

    def retire_workers(
        self,
        workers: Any = None,
        close_workers: bool = True,
        remove: bool = True,
        timeout: float = 30,
    ) -> dict[str, dict]:
        """Stops `workers` (ids, addresses or host names; all without an argument) on
        purpose: what ran there runs again elsewhere, counting against no task, and a local
        cluster does not replace them. Returns the retired workers' info by address.
        Unlike `distributed`, results held only on them are recomputed from their lineage
        rather than copied away first, and workers that are MPI ranks cannot retire (under
        mpirun a rank that leaves ends the job): NotImplementedError."""
        known = {w["id"]: w for w in self.workers()}
        ids = list(known) if workers is None else self._worker_ids(workers)
        retiring = {i: known[i] for i in ids if i in known}
        ranks = [w for w in retiring.values() if w.get("rank") is not None]
        if ranks:
            raise NotImplementedError(
                f"workers {[w['id'] for w in ranks]} are MPI ranks: under mpirun a rank that "
                "leaves ends the job; stop using them with workers= on submit instead"
            )
        self._core.retire_workers(list(retiring))
        deadline = time.monotonic() + timeout
        while any(w["id"] in retiring for w in self._core.workers()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {list(retiring)} still connected after {timeout} s")
            time.sleep(0.02)
        return {self._address(w): w for w in retiring.values()}

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> None:
        """Blocks until at least `n_workers` workers are connected; TimeoutError after
        `timeout` seconds (None: no limit), as in `distributed`."""
        if n_workers < 0:
            raise ValueError(f"n_workers must be 0 or more, not {n_workers}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._core.workers()) < n_workers:
            if deadline is not None and time.monotonic() > deadline:
                have = len(self._core.workers())
                raise TimeoutError(
                    f"only {have} of {n_workers} workers connected after {timeout} s"
                )
            time.sleep(0.05)

    def nthreads(self) -> dict[str, int]:
        """Threads (executor processes) of each worker, by address."""
        return {self._address(w): int(w["nthreads"]) for w in self.workers()}

    ncores = nthreads

    def who_has(self, futures: Any = None) -> dict[Any, list[str]]:
        """The workers holding each future's result, by key (all futures of this client
        without an argument); empty for a result not computed. Unlike `distributed`, it
        names the one holder this client was told of, not every replica."""
        if futures is None:
            holds = self._holds
            held = [(key, task_id) for key, task_id in self._by_key.items() if task_id in holds]
        else:
            held = []
            _walk_futures(futures, lambda future: held.append((future.key, future.task_id)))
        addresses = {w["id"]: self._address(w) for w in self.workers()}
        located = {}
        for key, task_id in held:
            worker = self._core.location(task_id)
            located[key] = [addresses[worker]] if worker in addresses else []
        return located

    def has_what(self) -> dict[str, list[Any]]:
        """The keys of this client's results each worker holds (see who_has)."""
        what: dict[str, list[Any]] = {self._address(w): [] for w in self.workers()}
        for key, holders in self.who_has().items():
            for address in holders:
                what[address].append(key)
        return what

    def run(self, function: Callable, *args: Any, workers: Any = None, **kwargs: Any) -> dict:
        """function(*args, **kwargs) once on each worker (or on `workers`), by address.
        Unlike `distributed`, it runs as a task in one of the worker's executor processes
        (after the tasks queued there), not in the worker process itself, which is not
        Python; a function taking `dask_worker` is refused."""
        if "dask_worker" in getattr(function, "__code__", _NO_CODE).co_varnames:
            raise TypeError("rankmesh workers are not Python: there is no dask_worker to pass")
        wanted = self.workers() if workers is None else None
        ids = [w["id"] for w in wanted] if wanted is not None else self._worker_ids(workers)
        by_id = {w["id"]: w for w in self.workers()}
        futures = {
            self._address(by_id[i]): self.submit(function, *args, workers=[i], **kwargs)
            for i in ids
            if i in by_id
        }
        return self.gather(futures)

    def scheduler_info(self, timeout: float = 30) -> dict[str, object]:
        """The scheduler's address, its workers and counters, asked of the scheduler.

        Like `distributed`'s, keyed by worker address (what `workers=` takes); each
        worker's entry also holds its memory counters (`memory_limit`, `managed_bytes`,
        `spilled_bytes` now on disk, `spilled_total` and `unspilled_total` since its start,
        `process_bytes`, `paused`, `paused_seconds`), and `recomputed_tasks` counts tasks
        computed again after a worker was lost, or an executor with the results it kept
        (rankmesh only)."""
        self._flush_releases()  # what it reports should reflect futures let go
        recomputed, memory = self._core.info(timeout)
        workers = {}
        for worker in self.workers():
            workers[self._address(worker)] = {**worker, **memory.get(worker["id"], {})}
        return {"address": self.address, "workers": workers, "recomputed_tasks": recomputed}

    def close(self) -> None:
        if self._closed:
            return
        if self._default_config is not None:
            self._default_config.__exit__(None, None, None)
            self._default_config = None
        self._stop_releasing.set()
        self._releasing.join(timeout=5)
        self._flush_releases()
        self._closed = True
        self._core.close()

    def __enter__(self) -> Client:
        return self.as_default()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_NO_CODE = (lambda: None).__code__

# The clients created here, oldest first (get_client's answer outside tasks: the newest
# still open), and the client of this executor process (made when a task first asks).
_created: list[weakref.ref[Client]] = []
_task_client: Client | None = None


class Datasets(MutableMapping):
    """`Client.datasets`: the published datasets by name, as in `distributed`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getitem__(self, name: str) -> Any:
        return self._client.get_dataset(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._client.publish_dataset(value, name=name)

    def __delitem__(self, name: str) -> None:
        self._client.unpublish_dataset(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._client.list_datasets())

    def __len__(self) -> int:
        return len(self._client.list_datasets())


def get_client() -> Client:
    """The client to use here, as `distributed.get_client`: inside a task, a connection of
    the task's executor process to the scheduler (made on first use and kept for the
    process, so tasks can submit tasks and use locks, queues and variables); elsewhere the
    most recently created client that is still open."""
    global _task_client
    address = os.environ.get("RANKMESH_SCHEDULER_ADDRESS")
    if address is not None and "RANKMESH_EXECUTOR_ID" in os.environ:
        if _task_client is None or _task_client._closed:
            _task_client = Client(address, token=os.environ.get("RANKMESH_TOKEN"))
        return _task_client
    while _created:
        client = _created[-1]()
        if client is not None and not client._closed:
            return client
        _created.pop()
    raise ValueError("No clients found: create a rankmesh.Client first")


@contextlib.contextmanager
def worker_client(timeout: float | None = None, separate_thread: bool = True) -> Iterator[Client]:
    """The client of the task's executor (see get_client), as a context manager, for code
    written with `distributed.worker_client`. Unlike there, the task does not secede: it
    keeps its executor while it waits for the tasks it submits, so give workers more than
    one thread, or send those tasks to other workers (`workers=`)."""
    yield get_client()


def secede() -> None:
    """Refused: rankmesh cannot yet give a waiting task's executor to other tasks."""
    raise NotImplementedError(
        "rankmesh has no secede(): a task keeps its executor while it waits; give workers "
        "more than one thread, or submit the tasks it waits for with workers= elsewhere"
    )


def rejoin() -> None:
    """Refused, as secede()."""
    secede()


def _options_by_id(
    annotations: TaskAnnotations, ids: list[int]
) -> tuple[dict[int, list[int]], dict[int, Options]]:
    """Restrictions and (retries, allow_other_workers) of submitted calls, by task id."""
    workers = annotations.restriction(None)
    options = annotations.options(None)
    restrictions = {task_id: workers for task_id in ids} if workers is not None else {}
    return restrictions, ({task_id: options for task_id in ids} if options else {})


_GRAPH_OPTIONS = ("workers", "retries", "priority", "allow_other_workers", "resources")


def _graph_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The task options among compute's, persist's or get's keywords."""
    refuse_actors(bool(kwargs.get("actors")))
    return {name: kwargs[name] for name in _GRAPH_OPTIONS if kwargs.get(name)}


def _walk_futures(obj: Any, visit: Callable[[Future], None]) -> None:
    if isinstance(obj, Future):
        visit(obj)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            _walk_futures(item, visit)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _walk_futures(item, visit)


def _replace_futures(obj: Any, values: Mapping[int, Any]) -> Any:
    if isinstance(obj, Future):
        return values[obj.task_id]
    if isinstance(obj, list | tuple | set | frozenset):
        return type(obj)(_replace_futures(item, values) for item in obj)
    if isinstance(obj, Mapping):
        return type(obj)((key, _replace_futures(item, values)) for key, item in obj.items())
    return obj
