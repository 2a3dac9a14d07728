"""What the MPI benchmarks share: how they call mpirun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Open MPI's UCX layer; without InfiniBand devices it must be allowed every transport.
UCX_ENV = {
    "OMPI_MCA_pml": "ucx",
    "OMPI_MCA_pml_ucx_tls": "any",
    "OMPI_MCA_pml_ucx_devices": "any",
}


def mpirun_base(np: int) -> list[str]:
    """mpirun for np ranks on this machine: oversubscribed, unbound (rankmesh binds itself)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit("mpirun not found (install openmpi-bin)")
    base = [mpirun, "--oversubscribe", "--bind-to", "none", "-np", str(np)]
    if os.geteuid() == 0:
        base.insert(1, "--allow-run-as-root")
    return base


def rankmesh_mpi_settings(env: dict[str, str]) -> dict[str, str]:
    """The Open MPI settings `rankmesh run` fills in under `env` (`rankmesh mpi-settings`),
    so the other side of a comparison can be given the same."""
    from rankmesh.cluster import find_binary

    printed = subprocess.run(
        [find_binary(), "mpi-settings"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout
    return dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
