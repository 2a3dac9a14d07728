"""Runs a user's script inside a cluster (`python -m rankmesh._script script.py args`).

`rankmesh local` and rank 0 of `rankmesh run` start scripts through this: the cluster is
already Dask's default scheduler when the script's first line runs, so unchanged
`ds.compute()` calls run on it, and `rankmesh.Client()` connects to the same cluster.
The script runs as `__main__`, with its own path and arguments in `sys.argv`; its exit
code and traceback are the process's.
"""

from __future__ import annotations

import os
import runpy
import sys


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
    Client().as_default()
    sys.argv = sys.argv[1:]
    # As `python script.py` would: the script's folder first on the import path.
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
