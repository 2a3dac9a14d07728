"""Shared by the batch-system tests: the real local SLURM (scripts/local-slurm.sh) and the
`rankmesh` CLI run with a private job-record folder and config file per test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rankmesh.cluster import find_binary

BINARY = find_binary()
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# A job script that keeps a cluster busy with small Dask computations until stopped.
COMPUTES_FOREVER = (
    "import time, dask.array as da\n"
    "print('started', flush=True)\n"
    "while True:\n"
    "    (da.ones((400, 400), chunks=100) * 2).sum().compute()\n"
    "    time.sleep(0.2)\n"
)


def slurm_problem() -> str | None:
    """Why the local SLURM cannot take jobs, or None when it can."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (bash scripts/local-slurm.sh start sets it up)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if "is UP" not in ping.stdout:
        return f"slurmctld is not up ({ping.stdout.strip() or ping.stderr.strip()})"
    return None


def require_slurm(also: str | None = None) -> None:
    """Skips outside the test setup; in CI (CI=true) a missing SLURM is a failure."""
    problem = slurm_problem()
    if problem is None and also is not None and shutil.which(also) is None:
        problem = f"`{also}` is not on PATH (slurm-wlm-torque provides it)"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs need the local SLURM: {problem}")
    pytest.skip(problem)


class Rankmesh:
    """Runs the CLI in `workdir` with its own job records and config file."""

    def __init__(self, workdir: Path, config: str = "") -> None:
        self.workdir = workdir
        self.config = workdir / "config.toml"
        self.config.write_text(config)
        self.env = dict(os.environ)
        self.env.update(
            RANKMESH_STATE_DIR=str(workdir / "state"),
            RANKMESH_CONFIG=str(self.config),
            RANKMESH_PYTHON=sys.executable,
        )

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BINARY, *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *args: str) -> str:
        result = self("submit", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def wait(self, job: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """`rankmesh wait JOB`; a job still running after `timeout` seconds is cancelled
        and fails the test with its log, so that a hung job shows why (pytest-timeout's
        300 s would show only this process's stacks)."""
        try:
            return self("wait", job, timeout=timeout)
        except subprocess.TimeoutExpired:
            logs = self("logs", job).stdout
            left = job_processes(job)
            self("cancel", job)
            raise AssertionError(
                f"job {job} still ran after {timeout} s; its processes {left}; log:\n{logs}"
            ) from None

    def status(self, job: str) -> dict:
        result = self("status", job, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for_output(self, job: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self("logs", job)
            if text in logs.stdout:
                return
            time.sleep(0.5)
        raise AssertionError(f"job {job} never printed {text!r}; status {self.status(job)}")


def job_processes(job: str) -> list[str]:
    """Processes that belong to SLURM job `job` (found by the job id in their environment)."""
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            if process.environ().get("SLURM_JOB_ID") == job:
                found.append(f"{process.pid} {process.name()}")
        except psutil.Error:
            pass  # gone meanwhile, or not ours to read
    return found


def assert_no_processes_left(job: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = job_processes(job)
    assert left == [], f"processes of job {job} outlived it: {left}"
