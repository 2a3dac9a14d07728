"""`pip install .` as a cluster user does it: no root, a fresh venv in a clean clone, Rust
and MPI on PATH the way modules offer them. Then everything runs from that venv. The same
user with MPI hidden gets a clear message, or with RANKMESH_NO_MPI=1 a build without MPI.

Slow (cold cargo builds as the user): conftest.py starts the builds when the session
begins (`Builds.start`), niced, in a thread, so they compile while the other tests wait on
their clusters, and runs this file's tests last."""

import json
import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from batch_helpers import ROOT

USER = "rankmesh-builder"
# What a site's modules would offer: a world-readable toolchain and a PATH without MPI.
MODULES = Path("/opt/rankmesh-test")
BUILD_TIMEOUT = 1500

JOB = """
import dask.array as da
x = da.arange(200_000, chunks=20_000)
print("sums", int((x * 3).sum().compute()), int((x * 3).sum().compute(scheduler="threads")))
"""

LOCAL = """
import dask.array as da, numpy as np, rankmesh
with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster):
    x = da.random.default_rng(5).random((400, 400), chunks=100)
    y = (x @ x.T).mean(axis=0)
    ours, theirs = y.compute(), y.compute(scheduler="threads")
    print("local equal", bool(np.allclose(ours, theirs)), ours.shape)
"""


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "making a second user needs root (useradd, runuser)"
    for tool in ("useradd", "runuser", "git"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


def _needs_root() -> None:
    missing = _missing_requirement()
    if missing:
        pytest.skip(missing)


class User:
    """Runs commands as USER with a clean environment, as after a login."""

    def __init__(self, home: Path, path: str, **env: str) -> None:
        self.home = home
        self.env = {"HOME": str(home), "USER": USER, "LANG": "C.UTF-8", "PATH": path, **env}

    def __call__(
        self, script: str, timeout: float = 600, niced: bool = False, **env: str
    ) -> subprocess.CompletedProcess:
        variables = [f"{k}={v}" for k, v in {**self.env, **env}.items()]
        nice = ["nice", "-n", "19"] if niced else []
        return subprocess.run(
            [*nice, "runuser", "-u", USER, "--", "env", "-i", *variables, "bash", "-c", script],
            # Not this process's environment: a build started in the background would
            # carry whatever a test running meanwhile has set (test_mpi_run.py finds its
            # jobs' processes by a variable).
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _toolchain() -> Path:
    """The Rust toolchain this machine builds with, as hard links in a readable folder."""
    sysroot = Path(
        subprocess.run(
            ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    shared = MODULES / "rust"
    if not (shared / "bin" / "cargo").exists():
        MODULES.mkdir(mode=0o755, exist_ok=True)
        if subprocess.run(["cp", "-al", str(sysroot), str(shared)]).returncode != 0:
            shutil.copytree(sysroot, shared, symlinks=True)
    return shared / "bin"


def _path_without_mpi() -> str:
    """/usr/bin as a module-less shell sees it, minus Open MPI's and MPICH's commands."""
    hidden = MODULES / "bin-without-mpi"
    if not hidden.exists():
        hidden.mkdir(parents=True)
        for tool in Path("/usr/bin").iterdir():
            if not tool.name.startswith(("mpi", "ompi", "orte", "opal", "oshmem", "shmem")):
                (hidden / tool.name).symlink_to(tool)
    return str(hidden)


def _pkg_config_with_only_hwloc() -> str:
    folder = MODULES / "pkgconfig-only-hwloc"
    if not folder.exists():
        folder.mkdir(parents=True)
        found = subprocess.run(
            ["pkg-config", "--variable=pcfiledir", "hwloc"], capture_output=True, text=True
        ).stdout.strip()
        (folder / "hwloc.pc").symlink_to(Path(found) / "hwloc.pc")
    return str(folder)


def _clone() -> tuple[Path, Path]:
    """A clean clone of this checkout in the user's fresh home, and the toolchain's bin."""
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    home = Path(
        subprocess.run(["sh", "-c", f"echo ~{USER}"], capture_output=True, text=True).stdout.strip()
    )
    checkout = home / "rankmesh"
    for name in ("rankmesh", "venv", "venv-no-mpi", "venv-refused", ".cargo", "dist"):
        shutil.rmtree(home / name, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    subprocess.run(["chown", "-R", f"{USER}:", str(checkout)], check=True)
    return home, _toolchain()


def _user(home: Path, rust: Path) -> User:
    # Unoptimised: these builds check that a user can build and install, not how fast
    # the result runs (CI's own install builds and tests the optimised one); opt-level 0
    # builds in 40% of the time, which keeps CI within its budget.
    return User(home, f"{rust}:/usr/bin:/bin", CARGO_PROFILE_RELEASE_OPT_LEVEL="0")


def _hidden(user: User) -> User:
    """The same user with MPI off PATH and only hwloc for pkg-config."""
    return User(
        user.home,
        f"{user.env['PATH'].split(':')[0]}:{_path_without_mpi()}",
        PKG_CONFIG_LIBDIR=_pkg_config_with_only_hwloc(),
        CARGO_PROFILE_RELEASE_OPT_LEVEL=user.env["CARGO_PROFILE_RELEASE_OPT_LEVEL"],
    )


def _build_with_mpi(user: User) -> subprocess.CompletedProcess:
    return user(
        "cd ~/rankmesh && python3 -m venv ~/venv && ~/venv/bin/pip install -q .",
        timeout=BUILD_TIMEOUT,
        niced=True,
    )


def _build_sdist_without_mpi(user: User) -> list[subprocess.CompletedProcess]:
    """The sdist, as a release would ship it, installed with RANKMESH_NO_MPI=1 where MPI is
    hidden; built on the checkout's cargo cache (only where the build compiles differs: the
    sources are the sdist's)."""
    sdist = user(
        "cd ~/rankmesh && ~/venv/bin/pip install -q build"
        " && ~/venv/bin/python -m build -q --sdist --outdir ~/dist",
        niced=True,
    )
    if sdist.returncode != 0:
        return [sdist]
    made = _hidden(user)(
        "python3 -m venv ~/venv-no-mpi"
        " && ~/venv-no-mpi/bin/pip install -q ~/dist/rankmesh-*.tar.gz",
        CARGO_TARGET_DIR=str(user.home / "rankmesh" / "target"),
        timeout=BUILD_TIMEOUT,
        niced=True,
        RANKMESH_NO_MPI="1",
    )
    return [sdist, made]


class Builds:
    """The user's two builds (with MPI, then the sdist without), one after the other in a
    thread, started once per session: conftest.py starts them once the session's tests are
    collected, so that they compile beside the other tests, and stops them at its end."""

    user: User | None = None
    with_mpi: Future
    without_mpi: Future

    @classmethod
    def start(cls) -> None:
        if cls.user is not None or _missing_requirement():
            return
        cls.user = user = _user(*_clone())
        builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="user-build")
        cls.with_mpi = with_mpi = builder.submit(_build_with_mpi, user)
        cls.without_mpi = builder.submit(
            lambda: _build_sdist_without_mpi(user) if with_mpi.result().returncode == 0 else []
        )
        builder.shutdown(wait=False)

    @classmethod
    def stop(cls) -> None:
        """Kills what is still building (a session that ended early), so that pytest's
        exit does not wait for it."""
        if cls.user is not None:
            subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)


@pytest.fixture(scope="module")
def built() -> User:
    _needs_root()
    Builds.start()
    made = Builds.with_mpi.result(timeout=BUILD_TIMEOUT)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-5000:]
    assert Builds.user is not None
    return Builds.user


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_pip_install_as_a_user_builds_everything_into_the_venv(built):
    venv = built.home / "venv" / "bin"
    assert (venv / "rankmesh").stat().st_uid != 0, "the user's own binary"
    version = built("~/venv/bin/rankmesh --version")
    package = built("~/venv/bin/python -c 'import rankmesh; print(rankmesh.__version__)'")
    assert version.returncode == 0 and package.returncode == 0, version.stderr + package.stderr
    cargo_version = next(
        line.split('"')[1]
        for line in (ROOT / "Cargo.toml").read_text().splitlines()
        if line.startswith("version = ")
    )
    assert version.stdout.split() == ["rankmesh", cargo_version]
    assert package.stdout.strip() == cargo_version
    local = built(f"cd ~ && ~/venv/bin/python -c '{LOCAL}'")
    assert local.returncode == 0, local.stderr
    assert "local equal True (400,)" in local.stdout


def _write_job(home: Path) -> None:
    script = home / "job.py"
    script.write_text(JOB)
    shutil.chown(script, USER)


def test_mpirun_starts_the_users_binary_on_three_ranks(built):
    _write_job(built.home)
    ran = built(
        "cd ~ && mpirun -n 3 --oversubscribe ~/venv/bin/rankmesh run"
        " --python ~/venv/bin/python job.py",
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    sums = next(line for line in ran.stdout.splitlines() if line.startswith("sums"))
    _, ours, theirs = sums.split()
    assert ours == theirs == str(3 * sum(range(200_000)))
    assert "2 workers ready" in ran.stderr


def test_the_users_doctor_sees_mpi_and_hwloc(built):
    ran = built("~/venv/bin/rankmesh doctor --json --require mpi,hwloc")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    checks = {check["name"]: check for check in json.loads(ran.stdout)["checks"]}
    assert checks["build"]["facts"]["features"] == ["mpi", "hwloc", "batch"]
    assert checks["mpi"]["status"] == "ok" and checks["topology"]["status"] == "ok"


@pytest.mark.timeout(2 * BUILD_TIMEOUT)
def test_with_mpi_hidden_the_build_names_what_is_missing_or_builds_without_it(built):
    hidden = _hidden(built)
    assert hidden("command -v mpicc").returncode != 0
    # A venv of its own: the sdist's build below installs into ~/venv-no-mpi meanwhile.
    refused = hidden(
        "cd ~/rankmesh && python3 -m venv ~/venv-refused && ~/venv-refused/bin/pip install -q ."
    )
    assert refused.returncode != 0
    message = refused.stdout + refused.stderr
    assert "rankmesh build: error: cannot build `rankmesh run`" in message, message[-4000:]
    assert "no `mpicc` on PATH" in message and "RANKMESH_NO_MPI=1" in message
    assert "hwloc:" not in message, "hwloc is there: only MPI is missing"

    steps = Builds.without_mpi.result(timeout=2 * BUILD_TIMEOUT)
    for step in steps:
        assert step.returncode == 0, step.stdout[-3000:] + step.stderr[-5000:]
    assert len(steps) == 2
    local = hidden(f"cd ~ && ~/venv-no-mpi/bin/python -c '{LOCAL}'")
    assert local.returncode == 0 and "local equal True" in local.stdout, local.stderr
    _write_job(built.home)
    run = hidden("cd ~ && PMI_RANK=0 PMI_SIZE=1 ~/venv-no-mpi/bin/rankmesh run job.py")
    assert run.returncode == 1
    assert "built without MPI" in run.stderr and "docs/install.md" in run.stderr
    # Batch submission needs no MPI on the login node: the job script it would submit.
    script = hidden(
        "cd ~ && RANKMESH_STATE_DIR=~/state ~/venv-no-mpi/bin/rankmesh submit --dry-run job.py"
    )
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --ntasks-per-node" in script.stdout and " run --python " in script.stdout
    doctor = hidden("~/venv-no-mpi/bin/rankmesh doctor --json")
    report = json.loads(doctor.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["build"]["facts"]["features"] == ["hwloc", "batch"]
    assert checks["mpi"]["status"] == "warn" and doctor.returncode == 0
    assert hidden("~/venv-no-mpi/bin/rankmesh doctor --require mpi").returncode == 1
