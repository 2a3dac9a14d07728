"""What the child processes rankmesh starts from Python need (as `src/process.rs` for the
Rust side): to end with the process that started them."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

__all__ = ["dying_with_parent"]

_PR_SET_PDEATHSIG = 1


def dying_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` when the thread that started it ends (Linux)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return arm
