#!/usr/bin/env bash
# Installs everything rankmesh needs into this checkout, then optionally runs the main job:
#   system packages (apt), .venv with the pinned Python packages (requirements-dev.txt),
#   the `rankmesh` binary (into .venv/bin) and the `rankmesh` Python package.
# Idempotent: a step whose inputs did not change since the last run is skipped.
#
#   bash scripts/install.sh                 # install / update
#   bash scripts/install.sh --run [ARGS]    # ... then examples/xarray_anomaly.py [ARGS]
#
# Environment: PYTHON (interpreter for the venv, default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}
# One build cache for `cargo` here and for the builds `pip install .` runs.
export CARGO_TARGET_DIR=$ROOT/target

RUN_EXAMPLE=0
if [ "${1:-}" = "--run" ]; then
  RUN_EXAMPLE=1
  shift
fi

step() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

# MPI, hwloc and libclang (rsmpi's bindings): what the binary builds against.
# python3 and python3-venv, passwd (useradd) and util-linux (setpriv, runuser): the security
# tests run an attacker as a second Unix user with Debian's own interpreter, and the
# install test builds rankmesh as a user without root in a venv of it. chromium (headless)
# and a font: the dashboard tests look at its pages as a person would. git: the install
# test builds from a clean clone.
APT_PACKAGES=(pkg-config build-essential libopenmpi-dev openmpi-bin libhwloc-dev libudev-dev
              libclang-dev clang hwloc python3 python3-venv passwd util-linux chromium
              fonts-dejavu-core git)

# ---------------------------------------------------------------- system packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  step "apt packages: already installed"
else
  step "apt packages: installing ${missing[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: install ${missing[*]} yourself"
    SUDO=(sudo)
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

# ---------------------------------------------------------------- toolchains
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || die "cargo not found (install Rust 1.89 or newer)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than 3.11"

# ---------------------------------------------------------------- virtual environment
# The venv's tools first.
export PATH=$VENV/bin:$PATH
if [ -x "$VENV/bin/python" ]; then
  step "venv: $VENV exists"
else
  step "venv: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

# A stamp of what was installed lets a rerun skip pip entirely.
requirements_hash=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
requirements_stamp=$VENV/.rankmesh-requirements.sha256
if [ "$(cat "$requirements_stamp" 2>/dev/null)" = "$requirements_hash" ]; then
  step "python packages: up to date"
else
  step "python packages: pip install -r requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$requirements_hash" >"$requirements_stamp"
fi

# ---------------------------------------------------------------- rankmesh binary
# The same `pip install .` a user runs on a cluster (setup.py): the package, its native
# part and the binary, built into the venv. Skipped when nothing it builds from changed.
package_inputs=()
for path in Cargo.toml Cargo.lock setup.py pyproject.toml src python jobscripts; do
  [ -e "$path" ] && package_inputs+=("$path")
done
package_hash=$(find "${package_inputs[@]}" -type f -not -path '*/__pycache__/*' \
                 -not -name '*.so' -print0 \
               | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
package_stamp=$VENV/.rankmesh-package.sha256
if [ "$(cat "$package_stamp" 2>/dev/null)" = "$package_hash" ] \
   && [ -x "$VENV/bin/rankmesh" ] && "$VENV/bin/python" -c 'import rankmesh' 2>/dev/null; then
  step "rankmesh: up to date"
else
  step "rankmesh: pip install . (cargo release builds of the binary and the package)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps --force-reinstall .
  echo "$package_hash" >"$package_stamp"
fi

step "done: activate with 'source .venv/bin/activate'"

if [ "$RUN_EXAMPLE" -eq 1 ]; then
  step "running examples/xarray_anomaly.py $*"
  exec "$VENV/bin/python" examples/xarray_anomaly.py "$@"
fi
