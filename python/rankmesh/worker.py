"""What task code can learn about the worker running it."""

import os
from dataclasses import dataclass

# Set by the worker in each executor's environment (src/worker/worker_loop.rs).
WORKER_ID_ENV = "RANKMESH_WORKER_ID"


@dataclass(frozen=True)
class WorkerContext:
    """The worker a task runs on: `id` is the scheduler's number for it, the one
    placement and the scheduler's logs use."""

    id: int


def get_worker() -> WorkerContext:
    """The worker running the current task; raises ValueError outside a task."""
    value = os.environ.get(WORKER_ID_ENV)
    if value is None:
        raise ValueError("get_worker() works only inside a task run by a rankmesh worker")
    return WorkerContext(id=int(value))
