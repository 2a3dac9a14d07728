#!/usr/bin/env bash
# MPICH's Hydra launcher (also what many PBS sites use): a rankmesh cluster of N ranks.
#   launchers/mpiexec.sh N script.py [args...]
# -bind-to none: rankmesh places its own workers. MPIEXEC picks the launcher where
# several MPIs are installed (Debian: mpiexec.mpich beside Open MPI's mpiexec), and
# RANKMESH_BINARY the rankmesh built against that MPI (scripts/check-mpich.sh builds one).
set -euo pipefail
n=${1:?usage: mpiexec.sh N script.py [args...]}
shift
exec "${MPIEXEC:-mpiexec}" -bind-to none -n "$n" \
  "${RANKMESH_BINARY:-rankmesh}" run --python "${RANKMESH_PYTHON:-$(command -v python3)}" "$@"
