"""rankmesh: run Dask graphs and futures on HPC clusters with a Rust scheduler."""

from .batch import BatchError, Job, submit
from .client import Client
from .cluster import LocalCluster
from .errors import CancelledError, FutureLost, TaskError, WalltimeDrain
from .futures import Future, as_completed, wait
from .mpi import initialize
from .worker import WorkerContext, get_worker


def __getattr__(name: str) -> str:
    # importlib.metadata costs ~60 ms of every start (scripts, executors): on demand only.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("rankmesh")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0.0.0"
    raise AttributeError(f"module 'rankmesh' has no attribute {name!r}")


__all__ = [
    "BatchError",
    "CancelledError",
    "Client",
    "Future",
    "FutureLost",
    "Job",
    "LocalCluster",
    "TaskError",
    "WalltimeDrain",
    "WorkerContext",
    "__version__",
    "as_completed",
    "get_worker",
    "initialize",
    "submit",
    "wait",
]
