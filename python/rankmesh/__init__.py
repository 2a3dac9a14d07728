"""rankmesh: run Dask graphs and futures on HPC clusters with a Rust scheduler."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each public name and the module it lives in, imported on first use: executors (which
# import rankmesh.executor) and scripts that only call initialize() then never load the
# client and Dask (~0.1 s of every process start).
_EXPORTS = {
    "BatchError": "batch",
    "Job": "batch",
    "submit": "batch",
    "Client": "client",
    "get_client": "client",
    "rejoin": "client",
    "secede": "client",
    "worker_client": "client",
    "Event": "coordination",
    "Lock": "coordination",
    "Queue": "coordination",
    "Semaphore": "coordination",
    "Variable": "coordination",
    "LocalCluster": "cluster",
    "CancelledError": "errors",
    "ConnectionLost": "errors",
    "FutureLost": "errors",
    "HandshakeRefused": "errors",
    "KilledWorker": "errors",
    "RankmeshError": "errors",
    "TaskError": "errors",
    "WalltimeDrain": "errors",
    "Future": "futures",
    "fire_and_forget": "futures",
    "performance_report": "reports",
    "progress": "progress",
    "as_completed": "futures",
    "futures_of": "futures",
    "wait": "futures",
    "initialize": "mpi",
    "WorkerContext": "worker",
    "WorkerPlugin": "plugins",
    "get_worker": "worker",
}

if TYPE_CHECKING:
    from .batch import BatchError, Job, submit
    from .client import Client, get_client, rejoin, secede, worker_client
    from .cluster import LocalCluster
    from .coordination import Event, Lock, Queue, Semaphore, Variable
    from .errors import (
        CancelledError,
        ConnectionLost,
        FutureLost,
        HandshakeRefused,
        KilledWorker,
        RankmeshError,
        TaskError,
        WalltimeDrain,
    )
    from .futures import Future, as_completed, fire_and_forget, futures_of, wait
    from .mpi import initialize
    from .plugins import WorkerPlugin
    from .progress import progress
    from .reports import performance_report
    from .worker import WorkerContext, get_worker


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    # importlib.metadata costs ~60 ms: on demand only.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("rankmesh")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0.0.0"
    raise AttributeError(f"module 'rankmesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BatchError",
    "CancelledError",
    "Client",
    "ConnectionLost",
    "Event",
    "Future",
    "FutureLost",
    "HandshakeRefused",
    "Job",
    "KilledWorker",
    "LocalCluster",
    "Lock",
    "Queue",
    "RankmeshError",
    "Semaphore",
    "TaskError",
    "Variable",
    "WalltimeDrain",
    "WorkerContext",
    "WorkerPlugin",
    "__version__",
    "as_completed",
    "fire_and_forget",
    "performance_report",
    "progress",
    "futures_of",
    "get_client",
    "get_worker",
    "initialize",
    "rejoin",
    "secede",
    "submit",
    "wait",
    "worker_client",
]
