"""Refuses `da.store` into a target that lives in one process's memory.

On a cluster each store task unpickles its own copy of such a target (a numpy array, a
zarr array on a memory store), writes into the copy and drops it: the caller's target
stays as it was, and nothing says so. `distributed` refuses in-memory zarr stores in
`to_zarr` only; rankmesh refuses both, in the executor, where the write would happen.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

from .import_hooks import when_imported

# zarr stores that keep their chunks in the process (v3's MemoryStore and GpuMemoryStore;
# v2's dict, MemoryStore and KVStore).
_MEMORY_STORES = ("MemoryStore", "GpuMemoryStore", "KVStore", "dict")


def in_memory_description(target: object) -> str | None:
    """What makes `target` process-local, or None for a target others can see (a file)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(target, numpy.ndarray):
        return f"a {type(target).__module__}.{type(target).__name__}"
    if type(target).__module__.split(".")[0] == "zarr":
        store = getattr(target, "store", None)
        if type(store).__name__ in _MEMORY_STORES:
            return f"a zarr array in a {type(store).__name__}"
    return None


def refuse_in_memory_targets(dask_array_core: ModuleType) -> None:
    """Wraps dask.array.core.load_store_chunk, which every `da.store` task calls (also
    inside fused tasks, which look it up by name when they are unpickled)."""
    original = dask_array_core.load_store_chunk

    @functools.wraps(original)
    def load_store_chunk(x, out, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        what = in_memory_description(out)
        if what is not None:
            raise RuntimeError(
                f"da.store cannot write into {what} on a rankmesh cluster: each task would "
                "write into its own copy in a worker process and the target would not change. "
                "Store into files (zarr on disk, netCDF, HDF5), or compute the array and "
                "assign it: target[...] = x.compute()"
            )
        return original(x, out, *args, **kwargs)

    dask_array_core.load_store_chunk = load_store_chunk


def install() -> None:
    when_imported("dask.array.core", refuse_in_memory_targets)
