"""rankmesh: run Dask graphs and futures on HPC clusters with a Rust scheduler."""

from importlib.metadata import PackageNotFoundError, version

from .client import Client
from .cluster import LocalCluster
from .errors import CancelledError, FutureLost, TaskError
from .futures import Future, as_completed, wait
from .mpi import initialize

try:
    __version__ = version("rankmesh")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0"

__all__ = [
    "CancelledError",
    "Client",
    "Future",
    "FutureLost",
    "LocalCluster",
    "TaskError",
    "__version__",
    "as_completed",
    "initialize",
    "wait",
]
