"""Batch jobs from Python (a notebook on a login node): `rankmesh.submit(...)` returns a
`Job`. Every call runs the `rankmesh` CLI with `--json`, so SLURM and PBS are handled in
one place (src/batch); see docs/slurm.md and docs/pbs.md.

    job = rankmesh.submit("analysis.py", "--year", "2020", nodes=2, walltime="02:00:00")
    print(job.script)     # the rendered job script
    job.status()          # {'state': 'running', 'exit_code': None, ...}
    job.wait()            # the job's exit code
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .cluster import find_binary

__all__ = ["BatchError", "Job", "submit"]

# Keyword arguments of submit() that are `rankmesh submit` flags.
_FLAGS = (
    "nodes",
    "ntasks_per_node",
    "cpus_per_task",
    "mem",
    "walltime",
    "partition",
    "account",
    "qos",
    "gpus",
    "job_name",
    "output",
    "memory_limit",
    "memory_target",
    "memory_spill",
    "memory_pause",
    "memory_terminate",
    "local_directory",
    "profile",
    "system",
)


class BatchError(RuntimeError):
    """The rankmesh CLI refused or failed; the message is its own."""


def _rankmesh(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The job runs this interpreter unless a profile activates another environment.
    env.setdefault("RANKMESH_PYTHON", sys.executable)
    return subprocess.run(
        [find_binary(), *args], capture_output=True, text=True, env=env, check=False
    )


def _checked(*args: str) -> str:
    result = _rankmesh(*args)
    if result.returncode != 0:
        raise BatchError(result.stderr.strip() or f"rankmesh {args[0]} exited {result.returncode}")
    return result.stdout


@dataclass(frozen=True)
class Job:
    """A submitted batch job."""

    id: str
    system: str
    output: str
    script: str

    def status(self) -> dict[str, Any]:
        """State (pending with reason, running, completed, failed, cancelled, timeout,
        drained), exit code, elapsed time, nodes."""
        return json.loads(_checked("status", self.id, "--json"))

    def wait(self) -> int:
        """Blocks until the job ends; returns its exit code."""
        result = _rankmesh("wait", self.id, "--json")
        if not result.stdout.strip():
            raise BatchError(result.stderr.strip())
        return int(json.loads(result.stdout).get("exit_code") or result.returncode)

    def cancel(self) -> None:
        _checked("cancel", self.id)

    def logs(self) -> str:
        """What the job wrote to its output file so far."""
        return _checked("logs", self.id)


def submit(script: str, *args: str, dry_run: bool = False, **options: Any) -> Job:
    """Submits `script args` as a batch job; options are `rankmesh submit`'s flags
    (nodes=2, walltime="01:00:00", partition=..., profile=..., system="slurm", ...).
    With dry_run=True nothing is submitted and the Job has only its script."""
    unknown = sorted(set(options) - set(_FLAGS))
    if unknown:
        raise TypeError(
            f"unknown submit options: {', '.join(unknown)} (known: {', '.join(_FLAGS)})"
        )
    command = ["submit", "--json"]
    for name, value in options.items():
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    if dry_run:
        command.append("--dry-run")
    command += ["--", str(script), *map(str, args)]
    answer = json.loads(_checked(*command))
    return Job(
        id=answer.get("id", ""),
        system=answer["system"],
        output=str(answer.get("output", "")),
        script=answer["script"],
    )
