"""Shell-command and MPI-program tasks: what `Client.submit_command` runs in an executor."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from .children import dying_with_parent

__all__ = ["run_command"]

# An executor rank's MPI identity must not leak into the programs it starts: an `mpirun`
# inside would take itself for a rank of the job and fail to start its own ranks.
_MPI_ENVIRONMENT_PREFIXES = ("OMPI_", "PMIX_", "PMI_")


def run_command(
    args: str | Sequence[str],
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: bytes | None,
    timeout: float | None,
    check: bool,
) -> subprocess.CompletedProcess:
    """Runs the command to its end and returns its exit code and output. The program dies
    with the executor (a cancelled task's executor is killed), so nothing outlives the
    task; `check` raises CalledProcessError (carrying the output) on a non-zero exit."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_MPI_ENVIRONMENT_PREFIXES)
    }
    environment.update(env or {})
    return subprocess.run(
        args,
        shell=isinstance(args, str),
        cwd=cwd,
        env=environment,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=check,
        preexec_fn=dying_with_parent(signal.SIGKILL),
    )
