#!/usr/bin/env bash
# Runs every test of the project, installing first (scripts/install.sh, without the demo):
# Rust format, lints and tests; Python lints and tests; a smoke run of the side-by-side
# benchmark. Stops at the first failing stage, with a non-zero exit.
#
#   bash scripts/test.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

START=$SECONDS
stage() { printf '\n[test] ==== %s (at %ds)\n' "$*" $((SECONDS - START)); }

stage "install (scripts/install.sh)"
# A fresh clone's builds take about 3.3 GB (target/ and .venv/); with less free, the build
# may stop half-way on "No space left on device", so say so first.
free_kib=$(df -Pk "$ROOT" | awk 'NR == 2 { print $4 }')
if [ "${free_kib:-0}" -lt $((4 * 1024 * 1024)) ]; then
  echo "[test] warning: only $((free_kib / 1024)) MiB free under $ROOT; the builds need about 3.3 GB" >&2
fi
bash scripts/install.sh

VENV=$ROOT/.venv
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
# The rankmesh binary and the package live in the venv; LocalCluster finds the binary on PATH.
export PATH=$VENV/bin:$PATH
export CARGO_TARGET_DIR=$ROOT/target
# The PyO3 crate builds against the venv's interpreter (it has no Rust test binary).
export PYO3_PYTHON=$VENV/bin/python

stage "local SLURM (scripts/local-slurm.sh start; stopped again when this script ends)"
# The batch-system tests (tests/python/test_slurm*.py, test_pbs*.py) submit to a real
# one-node SLURM; they skip with a reason without it, and fail when CI=true.
if [ "$(id -u)" = 0 ]; then
  trap 'bash "$ROOT/scripts/local-slurm.sh" stop' EXIT
  bash scripts/local-slurm.sh start
else
  echo "[test] not root: no local SLURM, the batch-system tests will skip"
fi

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy (-D warnings)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

stage "cargo test"
cargo test --workspace --quiet

stage "ruff check"
"$VENV/bin/ruff" check python tests bench examples jobscripts docs

stage "pytest tests/python"
"$VENV/bin/python" -m pytest tests/python -q --timeout 300

stage "benchmark smoke run (bench/bench_vs_dask.py --quick)"
"$VENV/bin/python" bench/bench_vs_dask.py --quick

stage "all tests passed in $((SECONDS - START))s"
