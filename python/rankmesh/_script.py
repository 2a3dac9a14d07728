"""Runs a user's script inside a cluster (`python -m rankmesh._script script.py args`).

`rankmesh local` and rank 0 of `rankmesh run` start scripts through this: the cluster is
already Dask's default scheduler when the script's first line runs, so unchanged
`ds.compute()` calls run on it, and `rankmesh.Client()` connects to the same cluster.
The script runs as `__main__`, with its own path and arguments in `sys.argv`; its exit
code and traceback are the process's.

SIGUSR1 means the batch job's walltime is near (SLURM's `--signal`, or rank 0's drain
timer): the script gets `rankmesh.WalltimeDrain` and, if it lets it escape, the job exits
with WALLTIME_DRAIN_EXIT instead of being killed at the walltime.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback

from .errors import WALLTIME_DRAIN_EXIT, WalltimeDrain


def _drain_on_warning() -> None:
    """Raise WalltimeDrain in the main thread at the first SIGUSR1; ignore repeats (the
    batch system and rank 0 may both send one)."""

    def warned(signum: int, frame: object) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        raise WalltimeDrain("the batch job's walltime is about to end")

    signal.signal(signal.SIGUSR1, warned)


def _wait_for_go() -> None:
    """The host starts this interpreter before its workers are up, so the imports above
    overlap their start; it writes "go" on this pipe once they all have registered."""
    fd = os.environ.pop("RANKMESH_START_FD", None)
    if fd is None:
        return
    try:
        with os.fdopen(int(fd), "rb") as pipe:
            word = pipe.read()
    except KeyboardInterrupt:
        word = b""
    if word != b"go":
        sys.exit(1)  # the cluster did not start; the host says why


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m rankmesh._script SCRIPT [ARGS...]")
    from .client import Client

    _wait_for_go()
    _drain_on_warning()
    Client().as_default()
    sys.argv = sys.argv[1:]
    # As `python script.py` would: the script's folder first on the import path.
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except WalltimeDrain:
        traceback.print_exc()
        print(
            f"rankmesh: drained before the walltime; exiting with {WALLTIME_DRAIN_EXIT}",
            file=sys.stderr,
        )
        sys.exit(WALLTIME_DRAIN_EXIT)


if __name__ == "__main__":
    main()
