#!/usr/bin/env bash
# Runs Dask's own tests (from the installed dask) with every computation on a rankmesh
# cluster, then on a `distributed` LocalCluster (2 worker processes, 1 thread each), and
# lists the tests that pass under distributed but not under rankmesh.
#
#   bash scripts/dask-suite.sh [OUT_DIR]          # default OUT_DIR: /tmp/dask-suite
#
# Per system and module, OUT_DIR/<system>/ gets <module>.log (pytest -rA output),
# <module>.xml (JUnit), <module>.json (the plugin's report: outcome, first error line and
# routed computations per test) and <module>.time (wall seconds). Then
# tests/python/dask_suite/compare.py prints the comparison and writes OUT_DIR/summary.txt.
#
# Environment:
#   DASK_SUITE_SYSTEMS   systems to run (default "rankmesh distributed")
#   DASK_SUITE_MODULES   test modules, relative to the dask package (default: the six below)
#   DASK_SUITE_K         a pytest -k expression applied to every module (default: none)
#   DASK_SUITE_TIMEOUT   per-test timeout in seconds (pytest-timeout; default 180)
#   DASK_SUITE_MODULE_DEADLINE  seconds before a whole module's run is killed (default 7200)
#
# The routing is tests/python/dask_suite/plugin.py (loaded with -p from this folder).
# Without the rankmesh binary and package installed (scripts/install.sh) it cannot start.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-/tmp/dask-suite}
PY=$ROOT/.venv/bin/python
export PATH=$ROOT/.venv/bin:$PATH
DASK=$("$PY" -c 'import dask, os; print(os.path.dirname(dask.__file__))')
SYSTEMS=${DASK_SUITE_SYSTEMS:-rankmesh distributed}
MODULES=${DASK_SUITE_MODULES:-tests/test_delayed.py array/tests/test_array_core.py \
array/tests/test_reductions.py array/tests/test_rechunk.py bag/tests/test_bag.py \
dataframe/tests/test_groupby.py}
TIMEOUT=${DASK_SUITE_TIMEOUT:-180}
DEADLINE=${DASK_SUITE_MODULE_DEADLINE:-7200}
K_ARGS=()
if [ -n "${DASK_SUITE_K:-}" ]; then
  K_ARGS=(-k "$DASK_SUITE_K")
fi

echo "[dask-suite] dask $("$PY" -c 'import dask; print(dask.__version__)')," \
  "distributed $("$PY" -c 'import distributed; print(distributed.__version__)'), output in $OUT"
# Which rankmesh ran: the checkout's commit and when the installed package was last written
# (scripts/install.sh); the suite tests the installed package, not the working tree.
INSTALLED=$("$PY" -c 'import rankmesh, os; print(os.path.dirname(rankmesh.__file__))')
echo "[dask-suite] rankmesh: checkout $(git -C "$ROOT" describe --always --dirty 2>/dev/null)," \
  "installed package $INSTALLED written $(date -u -r "$INSTALLED/__init__.py" '+%F %T UTC')"
START=$SECONDS
for system in $SYSTEMS; do
  mkdir -p "$OUT/$system"
  for module in $MODULES; do
    name=$(basename "$module" .py)
    began=$SECONDS
    timeout --kill-after=60 "$DEADLINE" "$PY" -m pytest \
      -p tests.python.dask_suite.plugin -p no:cacheprovider \
      --dask-suite="$system" --dask-suite-report="$OUT/$system/$name.json" \
      --junitxml="$OUT/$system/$name.xml" --timeout="$TIMEOUT" \
      -q -rA --tb=short "${K_ARGS[@]}" "$DASK/$module" >"$OUT/$system/$name.log" 2>&1
    status=$?
    echo $((SECONDS - began)) >"$OUT/$system/$name.time"
    echo "[dask-suite] $system $name: exit $status in $((SECONDS - began)) s:" \
      "$(grep -E '^[=]* ?[0-9]+ (passed|failed|error|skipped)|no tests ran' \
        "$OUT/$system/$name.log" | tail -1)"
    grep -E '^(routed computations|not routed)' "$OUT/$system/$name.log" | sed 's/^/    /'
  done
done
echo "[dask-suite] all runs took $((SECONDS - START)) s"
"$PY" tests/python/dask_suite/compare.py "$OUT"
