#!/usr/bin/env bash
# SLURM: inside an allocation (sbatch or salloc), one rankmesh rank per task.
#   launchers/srun.sh script.py [args...]
# --mpi=pmix: Debian's Open MPI speaks PMIx (pmi2 does not work with it);
# --cpu-bind=none: rankmesh places its own workers.
set -euo pipefail
exec srun --mpi=pmix --cpu-bind=none \
  rankmesh run --python "${RANKMESH_PYTHON:-$(command -v python3)}" "$@"
