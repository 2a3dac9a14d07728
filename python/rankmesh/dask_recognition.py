"""Makes Dask and xarray treat a rankmesh client as they treat a `distributed` one.

Both look for `distributed.Client` to decide how to lock writes: without this, they take
rankmesh for the threaded scheduler and put thread locks (which cannot leave the process)
and per-process locks (which do not stop another worker) into graphs, and xarray keeps
netCDF files open in each worker process instead of closing them after each write. Where
the scheduler in use is a rankmesh client's, they now get `rankmesh.Lock` (cluster-wide),
and xarray's netCDF writers close files after each write, as under `distributed`.

The hooks wrap functions of dask and xarray (by their module attributes) when those
modules are imported; outside a rankmesh client they call the original unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .import_hooks import when_imported

# The client class whose `get` is recognised (set by install; this module does not import
# the client, which imports it).
_client_class: type | None = None


def rankmesh_scheduler_active(
    get: Any = None, scheduler: Any = None, collection: Any = None
) -> bool:
    """Whether Dask would run `collection` (or anything, without one) on a rankmesh client,
    given `get` or `scheduler` as dask.base.get_scheduler takes them."""
    from dask.base import get_scheduler

    collections = None if collection is None else [collection]
    try:
        chosen = get_scheduler(get=get, scheduler=scheduler, collections=collections)
    except Exception:  # noqa: BLE001 - a scheduler Dask cannot name is not ours
        return False
    owner = getattr(chosen, "__self__", None)
    return _client_class is not None and isinstance(owner, _client_class)


def _cluster_lock() -> Any:
    from .coordination import Lock

    return Lock()


def _wrap(module: ModuleType, name: str, wrapper: Callable[[Callable], Callable]) -> None:
    original = getattr(module, name, None)
    if original is not None and not getattr(original, "_rankmesh_wrapped", False):
        wrapped = functools.wraps(original)(wrapper(original))
        wrapped._rankmesh_wrapped = True
        setattr(module, name, wrapped)


def _xarray_scheduler(original: Callable) -> Callable:
    def get_dask_scheduler(get: Any = None, collection: Any = None) -> Any:
        if rankmesh_scheduler_active(get=get):
            return "distributed"  # xarray's name for "several processes, files closed"
        return original(get, collection)

    return get_dask_scheduler


def _xarray_lock_maker(original: Callable) -> Callable:
    def get_lock_maker(scheduler: Any = None) -> Any:
        if scheduler == "distributed" and rankmesh_scheduler_active():
            from .coordination import Lock

            return Lock
        return original(scheduler)

    return get_lock_maker


def _dask_scheduler_lock(original: Callable) -> Callable:
    def get_scheduler_lock(collection: Any = None, scheduler: Any = None) -> Any:
        if rankmesh_scheduler_active(scheduler=scheduler, collection=collection):
            return _cluster_lock()
        return original(collection, scheduler)

    return get_scheduler_lock


def _patch_xarray_locks(module: ModuleType) -> None:
    _wrap(module, "get_dask_scheduler", _xarray_scheduler)
    _wrap(module, "_get_lock_maker", _xarray_lock_maker)


def _patch_xarray_writers(module: ModuleType) -> None:
    _wrap(module, "get_dask_scheduler", _xarray_scheduler)


def _patch_scheduler_lock(module: ModuleType) -> None:
    _wrap(module, "get_scheduler_lock", _dask_scheduler_lock)


def install(client_class: type) -> None:
    """Hooks the modules now or when they are imported, for clients of `client_class`;
    once per process."""
    global _client_class
    if _client_class is not None:
        return
    _client_class = client_class
    when_imported("xarray.backends.locks", _patch_xarray_locks)
    when_imported("xarray.backends.writers", _patch_xarray_writers)
    for module in ("dask.utils", "dask.array.core", "dask.dataframe.io.hdf"):
        when_imported(module, _patch_scheduler_lock)
