#!/usr/bin/env bash
# Builds rankmesh against MPICH (beside the default Open MPI build, in target-mpich/) and
# runs the MPI launch tests under MPICH's Hydra launcher (mpiexec.mpich). Not part of
# scripts/test.sh: it is a second full Rust build (about 5 minutes on 2 cores).
# Debian keeps Open MPI the default `mpicc`/`mpirun` when both are installed.
#
#   bash scripts/check-mpich.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/install.sh

if ! command -v mpicc.mpich >/dev/null || ! command -v mpiexec.mpich >/dev/null; then
  env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libmpich-dev mpich </dev/null
fi
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
# rsmpi's build finds the MPI library through this compiler wrapper.
MPICC=mpicc.mpich CARGO_TARGET_DIR=$ROOT/target-mpich cargo build --release --bin rankmesh
ldd target-mpich/release/rankmesh | grep -q libmpich || { echo "not linked to MPICH" >&2; exit 1; }

RANKMESH_TEST_MPI=mpich RANKMESH_BINARY=$ROOT/target-mpich/release/rankmesh \
  "$ROOT/.venv/bin/python" -m pytest tests/python/test_mpi_run.py -q --timeout 300
