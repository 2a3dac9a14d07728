"""Threads rankmesh starts in the user's process, which leave signals to its main thread."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

# What a program is stopped or steered by; the Rust threads of the client block the same
# (`rankmesh::process::leave_signals_to_the_main_thread`).
MAIN_THREAD_SIGNALS = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGALRM,
    }
)


def start_helper_thread(
    target: Callable[..., object], name: str, args: tuple = ()
) -> threading.Thread:
    """Starts a daemon thread that blocks MAIN_THREAD_SIGNALS from its first instruction
    (it inherits the mask set around its start). The kernel hands a signal sent to the
    process to any thread that does not block it, and Python, which runs handlers in the
    main thread, does not wake that thread from a blocking call for a signal another
    thread took: a script in `time.sleep` slept through the SIGINT that `rankmesh local`
    sends it to stop while the client's release thread took signals (test_cli)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return thread
