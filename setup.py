"""`pip install .` (or the sdist): the `rankmesh` Python package, its native part and the
`rankmesh` binary, built by cargo into the active environment, with no root.

The binary links the system's MPI (found as mpi4py finds it: $MPICC, `mpicc` on PATH, or
pkg-config) and hwloc (pkg-config). `RANKMESH_NO_MPI=1` builds without MPI: local clusters
and batch submission work, and `rankmesh run` says it needs an MPI build. Everything this
file decides is printed, and what is missing is named before cargo starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustBin, RustExtension

ROOT = Path(__file__).resolve().parent
NO_MPI_ENV = "RANKMESH_NO_MPI"
HELP = "see docs/install.md"


def say(message: str) -> None:
    print(f"rankmesh build: {message}", file=sys.stderr)


def fail(message: str) -> None:
    sys.exit(f"rankmesh build: error: {message}\n({HELP})")


def version() -> str:
    """One version for the binary (`rankmesh --version`) and the package: Cargo's."""
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    return manifest["workspace"]["package"]["version"]


def pkg_config(*names: str) -> str | None:
    """The first of `names` pkg-config knows, if pkg-config is there at all."""
    if shutil.which("pkg-config") is None:
        return None
    for name in names:
        found = subprocess.run(["pkg-config", "--exists", name], capture_output=True)
        if found.returncode == 0:
            return name
    return None


def mpi_source() -> str | None:
    """Where rsmpi's build (build-probe-mpi) will find MPI, looking where it looks, in its
    order: $MPI_PKG_CONFIG, $CRAY_MPICH_DIR, $MPICC or `mpicc`, pkg-config mpich, ompi."""
    chosen = os.environ.get("MPI_PKG_CONFIG")
    if chosen:
        return f"pkg-config file {chosen} ($MPI_PKG_CONFIG)"
    cray = os.environ.get("CRAY_MPICH_DIR")
    if cray and Path(cray, "lib", "pkgconfig", "mpich.pc").is_file():
        return f"Cray MPICH in {cray} ($CRAY_MPICH_DIR)"
    mpicc = shutil.which(os.environ.get("MPICC") or "mpicc")
    if mpicc:
        return f"compiler wrapper {mpicc}"
    found = pkg_config("mpich", "ompi")
    return f"pkg-config package {found}" if found else None


def libclang_hint() -> None:
    """rsmpi's bindings are generated with libclang at build time: say so up front where
    none is in sight (the build's own error is less clear)."""
    if os.environ.get("LIBCLANG_PATH") or shutil.which("llvm-config"):
        return
    patterns = ["lib*/libclang*.so*", "lib*/*/libclang*.so*", "lib/llvm-*/lib/libclang*.so*"]
    if any(next(Path(root).glob(p), None) for root in ("/usr", "/usr/local") for p in patterns):
        return
    say(
        "no libclang in sight (no $LIBCLANG_PATH, no llvm-config): rsmpi generates its MPI"
        " bindings with it; if the build stops at 'Unable to find libclang', load an llvm"
        " or clang module or set LIBCLANG_PATH"
    )


def wanted(switch: str) -> bool:
    return os.environ.get(switch, "").strip().lower() in {"1", "true", "yes", "on"}


def binary_features() -> list[str]:
    hwloc = pkg_config("hwloc")
    if wanted(NO_MPI_ENV):
        say(f"{NO_MPI_ENV} is set: building without MPI (`rankmesh run` will refuse)")
        if hwloc is None:
            say("hwloc not found by pkg-config: building without placement (`rankmesh topology`)")
            return ["cli"]
        return ["cli", "hwloc"]
    mpi = mpi_source()
    missing = []
    if mpi is None:
        missing.append(
            "MPI: no $MPI_PKG_CONFIG, no $CRAY_MPICH_DIR, no $MPICC, no `mpicc` on PATH, and"
            " pkg-config knows neither mpich nor ompi (load your site's MPI module, e.g."
            " `module load openmpi`)"
        )
    if hwloc is None:
        missing.append(
            "hwloc: pkg-config knows no `hwloc` (load an hwloc module, or point"
            " PKG_CONFIG_PATH at the folder holding hwloc.pc)"
        )
    if missing:
        fail(
            "cannot build `rankmesh run`:\n  - "
            + "\n  - ".join(missing)
            + f"\nor set {NO_MPI_ENV}=1 to build without MPI (local clusters and batch"
            " submission still work)"
        )
    say(f"MPI from the {mpi}; hwloc from pkg-config")
    libclang_hint()
    return ["mpi", "hwloc", "cli"]


if shutil.which("cargo") is None:
    fail("cargo is not on PATH: install Rust 1.89 or newer (https://rustup.rs, no root needed)")

setup(
    version=version(),
    packages=["rankmesh"],
    package_dir={"": "python"},
    package_data={"rankmesh": ["py.typed", "_rankmesh.pyi"]},
    rust_extensions=[
        # The client and executor link need neither MPI nor hwloc.
        RustExtension("rankmesh._rankmesh", path="python/Cargo.toml", binding=Binding.PyO3),
        RustBin(
            "rankmesh",
            path="Cargo.toml",
            args=["--no-default-features"],
            features=binary_features(),
        ),
    ],
    zip_safe=False,
)
