"""Exceptions rankmesh raises on behalf of tasks and futures."""

from concurrent.futures import CancelledError

__all__ = ["CancelledError", "FutureLost", "TaskError"]


class TaskError(RuntimeError):
    """A task failed with an exception that could not travel back as itself."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nTask traceback:\n{traceback_text}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


class FutureLost(RuntimeError):
    """The result of a task is gone (its worker died) and cannot be recomputed."""
