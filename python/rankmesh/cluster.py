"""LocalCluster: a scheduler and worker processes on this machine (`rankmesh local`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .children import dying_with_parent
from .dashboard_links import cluster_html, dashboard_link
from .task_options import resource_pairs

__all__ = ["LocalCluster", "find_binary"]


def find_binary() -> str:
    """The `rankmesh` binary: $RANKMESH_BINARY if set (e.g. a build against another MPI),
    else the one beside this interpreter (the same environment), else PATH."""
    chosen = os.environ.get("RANKMESH_BINARY")
    if chosen:
        return chosen
    beside = Path(sys.executable).parent / "rankmesh"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rankmesh")
    if found is None:
        raise FileNotFoundError(
            "the `rankmesh` binary is not installed beside this Python nor on PATH "
            "(scripts/install.sh installs it)"
        )
    return found


def _parse_memory(limit: int | str | None) -> str:
    if limit is None:
        return "auto"
    return str(limit).replace(" ", "")


def _fraction(value: float | bool) -> str:
    return "false" if value is False else str(value)


class LocalCluster:
    """Starts `rankmesh local`: one scheduler and `n_workers` worker processes, each with
    `threads_per_worker` executor processes. Close it (or leave its `with` block) to stop
    all of them.

    A worker process that dies is replaced (as `distributed`'s nannies do); its tasks run
    again elsewhere, and one that was on `allowed_failures` dying workers fails with
    `KilledWorker`.

    `memory_limit` is per worker: bytes, "4GiB", a fraction of this machine's memory, or
    "auto" (the default: the machine's memory, or its cgroup's, shared among the workers);
    0 for none. Above `memory_target` of it results spill to `local_directory` (default
    $TMPDIR, then /tmp); above `memory_pause` a worker takes no new tasks; above
    `memory_terminate` its largest executor restarts. Each threshold may be False. As in
    `distributed`, except that the limit also counts the worker's shared memory and its
    executors (docs/memory.md).

    `resources` ({"GPU": 1}) are what each worker offers tasks submitted with
    `resources=`, as `distributed.LocalCluster(resources=)`.

    `dashboard_address` ("HOST:PORT", None for no dashboard): unlike `distributed`, an
    empty host (":8787") means 127.0.0.1, not every interface; a taken port moves to the
    next free one; every request needs the cluster token (`dashboard_link` carries it)."""

    def __init__(
        self,
        n_workers: int = 2,
        threads_per_worker: int = 1,
        memory_limit: int | str | None = None,
        timeout: float = 60,
        allowed_failures: int = 3,
        memory_target: float | bool = 0.6,
        memory_spill: float | bool = 0.7,
        memory_pause: float | bool = 0.8,
        memory_terminate: float | bool = 0.95,
        local_directory: str | os.PathLike | None = None,
        resources: dict[str, float] | None = None,
        dashboard_address: str | None = ":8787",
    ) -> None:
        if n_workers < 1 or threads_per_worker < 1:
            raise ValueError("n_workers and threads_per_worker must be at least 1")
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        from ._rankmesh import runtime_base

        # Private (0700, a random name), where rankmesh's own files go.
        self._dir = tempfile.mkdtemp(prefix="rankmesh-cluster-", dir=runtime_base())
        self.scheduler_file = os.path.join(self._dir, "scheduler.json")
        command = [
            find_binary(),
            "local",
            "-n",
            str(n_workers),
            "--threads-per-worker",
            str(threads_per_worker),
            "--memory-limit",
            _parse_memory(memory_limit),
            "--memory-target",
            _fraction(memory_target),
            "--memory-spill",
            _fraction(memory_spill),
            "--memory-pause",
            _fraction(memory_pause),
            "--memory-terminate",
            _fraction(memory_terminate),
            "--scheduler-file",
            self.scheduler_file,
            "--allowed-failures",
            str(allowed_failures),
            "--python",
            sys.executable,
        ]
        if dashboard_address is None:
            command.append("--no-dashboard")
        else:
            command += ["--dashboard-address", dashboard_address]
        if local_directory is not None:
            command += ["--local-directory", os.fspath(local_directory)]
        if resources:
            pairs = resource_pairs(resources)
            command += ["--resources", ",".join(f"{name}={amount}" for name, amount in pairs)]
        # Like multiprocessing's children, executors see this interpreter's import path, so
        # functions from scripts' sibling modules and test modules unpickle there.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            env=env,
            # The cluster stops (SIGTERM) if this Python dies without closing it.
            preexec_fn=dying_with_parent(signal.SIGTERM),
        )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.scheduler_file):
            code = self._process.poll()
            if code is not None:
                self._cleanup()
                raise RuntimeError(f"rankmesh local exited with status {code} while starting")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"the local cluster did not start within {timeout} s")
            time.sleep(0.01)

    @property
    def address(self) -> str:
        from ._rankmesh import read_scheduler_file

        return read_scheduler_file(self.scheduler_file)[0]

    @property
    def dashboard_link(self) -> str | None:
        """The status page, with the cluster token (see `Client.dashboard_link`)."""
        from ._rankmesh import read_scheduler_file

        _, token, dashboard = read_scheduler_file(self.scheduler_file)
        return dashboard_link(dashboard, token)

    def _repr_html_(self) -> str:
        return cluster_html(
            "LocalCluster",
            self.address,
            self.dashboard_link,
            [("workers", self.n_workers), ("threads per worker", self.threads_per_worker)],
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self, timeout: float = 10) -> None:
        """Stops the scheduler and every worker; kills what has not left after `timeout`."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._process.poll() is None else "closed"
        return f"<rankmesh.LocalCluster: {self.n_workers} workers, {state}>"
