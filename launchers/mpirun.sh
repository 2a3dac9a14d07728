#!/usr/bin/env bash
# Open MPI: run a script on a rankmesh cluster of N ranks (rank 0: scheduler + script,
# ranks 1..N-1: workers).   launchers/mpirun.sh N script.py [args...]
# --bind-to none: rankmesh places and binds its own workers (docs/topology.md);
# --oversubscribe: more ranks than cores, as on a laptop or in tests. Root needs
# --allow-run-as-root (containers, CI).
set -euo pipefail
n=${1:?usage: mpirun.sh N script.py [args...]}
shift
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
exec mpirun "${extra[@]}" --oversubscribe --bind-to none -n "$n" \
  rankmesh run --python "${RANKMESH_PYTHON:-$(command -v python3)}" "$@"
