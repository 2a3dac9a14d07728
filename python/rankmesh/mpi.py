"""`rankmesh.initialize()`: dask-mpi's habit, `mpirun -n N python script.py`, on rankmesh.

Every rank replaces itself with the `rankmesh` binary (same process, same MPI launcher
environment), which initializes MPI: rank 0 becomes the scheduler and runs the script
again from the top as its child, where `initialize()` finds the cluster and returns;
the other ranks become workers. So, as with dask-mpi, code above `initialize()` runs on
every rank, and only rank 0 runs what follows it.
"""

from __future__ import annotations

import os
import sys

from .cluster import find_binary

__all__ = ["initialize"]


def initialize(
    threads_per_worker: int | None = None,
    memory_limit: int | str | None = None,
    worker_per: str | None = None,
) -> None:
    """Makes this MPI job a rankmesh cluster and returns on rank 0 with it as Dask's
    default scheduler. Outside `mpirun`/`srun` the `rankmesh` binary says how to launch.

    As `rankmesh run`: each worker rank takes its place on the node (`worker_per`: numa,
    socket, core, gpu or node; default numa) with one executor per core of it unless
    `threads_per_worker` says otherwise."""
    if os.environ.get("RANKMESH_SCHEDULER_FILE"):
        return  # rank 0's script, started by `rankmesh run`: the cluster is the default
    if not sys.argv or not sys.argv[0] or sys.argv[0] == "-c":
        raise RuntimeError("rankmesh.initialize() must be called from a script file")
    binary = find_binary()
    command = [binary, "run", "--python", sys.executable]
    if threads_per_worker is not None:
        command += ["--threads-per-worker", str(threads_per_worker)]
    if worker_per is not None:
        command += ["--worker-per", worker_per]
    if memory_limit is not None:
        command += ["--memory-limit", str(memory_limit).replace(" ", "")]
    command += [os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(binary, command)
