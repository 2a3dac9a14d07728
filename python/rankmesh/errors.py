"""Exceptions rankmesh raises: on behalf of tasks and futures, and from its connections
(the native module's, re-exported so that callers need not import a private module)."""

from concurrent.futures import CancelledError

from ._rankmesh import ConnectionLost, HandshakeRefused, RankmeshError

__all__ = [
    "WALLTIME_DRAIN_EXIT",
    "CancelledError",
    "ConnectionLost",
    "FutureLost",
    "HandshakeRefused",
    "KilledWorker",
    "RankmeshError",
    "TaskError",
    "WalltimeDrain",
]

# A batch job that drained before its walltime exits with this (sysexits' EX_TEMPFAIL:
# "try again later"); `rankmesh status` reports such a job as drained. Same as the Rust side.
WALLTIME_DRAIN_EXIT = 75


class TaskError(RuntimeError):
    """A task failed with an exception that could not travel back as itself."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        where = f"\n\nTask traceback:\n{traceback_text}" if traceback_text else ""
        super().__init__(f"{type_name}: {message}{where}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


class KilledWorker(TaskError):
    """A task was on `allowed_failures` workers (3 by default) when each of them died, so
    it likely kills them: it fails rather than take down another. The message names the
    workers.

    Like `distributed.KilledWorker`, but `distributed` fails the task on the death after
    `allowed_failures`; rankmesh on the `allowed_failures`th, so 3 means 3 tries."""

    def __init__(self, message: str) -> None:
        super().__init__("KilledWorker", message, "")


class FutureLost(RuntimeError):
    """A finished task's result cannot be fetched: the worker holding it does not answer
    and the scheduler has not seen it go.

    A result lost with its worker is otherwise recomputed from its lineage, scattered data
    included (the scheduler keeps its bytes), so unlike `distributed` rankmesh does not
    raise this for lost scattered data."""


class WalltimeDrain(KeyboardInterrupt):
    """The batch job's walltime is about to end; raised in the script's main thread.

    Like KeyboardInterrupt (which it extends), it cancels the computation it interrupts,
    so the cluster stops starting that work, and `except Exception` does not swallow it.
    Catch it to save state; left uncaught, the job exits with WALLTIME_DRAIN_EXIT.
    """
