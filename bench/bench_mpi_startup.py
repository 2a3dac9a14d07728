"""Start-up and teardown of an MPI job: dask-mpi against `rankmesh run`, side by side.

One invocation alternates repetitions of the same job under `mpirun -np N` (as root with
--allow-run-as-root, always --oversubscribe --bind-to none), N = 4 or each of --ranks
(`--ranks 4,16,64`: start-up against the number of ranks; below, for N = 4):

  dask-mpi   python job.py, calling dask_mpi.initialize(nthreads=1, dashboard=False):
             rank 0 scheduler, rank 1 the script (client), ranks 2-3 workers
  dask-mpi+  the same, given the Open MPI settings `rankmesh run` fills in for itself
             (`rankmesh mpi-settings`): what of the difference is MPI's own start-up
  rankmesh   rankmesh run job.py: rank 0 scheduler and the script, ranks 1-3 workers

Dask runs with `distributed.scheduler.worker-saturation: inf`, as in the Dask anchors.
Each job connects a client, waits until all its workers are there, runs --ntasks no-op
tasks with map + gather, and exits. Reported (median over --reps, seconds since mpirun was
launched): workers ready, tasks done, and total (mpirun returned), with the ratios
dask-mpi / rankmesh and dask-mpi+ / rankmesh, per rank count. dask-mpi needs mpi4py and
dask-mpi in the environment (`pip install -r bench/requirements.txt`); without them only
the rankmesh side runs, and the output says so.

A job still running after --timeout seconds is stopped (SIGTERM to mpirun, then SIGKILL to
its process group) and reported as timed out; that system is not tried again, at that rank
count or the ones after it (dask-mpi's 62 Python workers on 2 cores take minutes).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from subprocess import PIPE

from _mpi import mpirun_base, rankmesh_mpi_settings

DASK_JOB = """
import json, os, sys, time
import dask_mpi
from distributed import Client
dask_mpi.initialize(nthreads=1, dashboard=False)
client = Client()
client.wait_for_workers(int(sys.argv[1]) - 2)
ready = time.time()
futures = client.map(lambda i: i, range(int(sys.argv[2])), pure=False)
assert sum(client.gather(futures)) == sum(range(int(sys.argv[2])))
print(json.dumps({"ready": ready, "tasks": time.time()}), flush=True)
"""

RANKMESH_JOB = """
import json, sys, time
import rankmesh
client = rankmesh.Client()  # the script starts once every worker has registered
ready = time.time()
futures = client.map(lambda i: i, range(int(sys.argv[2])))
assert sum(client.gather(futures)) == sum(range(int(sys.argv[2])))
print(json.dumps({"ready": ready, "tasks": time.time()}), flush=True)
"""


class TimedOut(Exception):
    """The job ran past its deadline and was stopped."""


def run_job(command: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    # As in the Dask anchors: no scheduler-side queuing (Dask's default, 1.1, is slower).
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="inf", **env)
    launched = time.time()
    # mpirun leads a process group of its own, with its ranks, so a stuck job can be ended.
    job = subprocess.Popen(
        command, stdout=PIPE, stderr=PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(job)
        raise TimedOut from None
    total = time.time() - launched
    if job.returncode != 0:
        raise RuntimeError(f"{command[-3:]} failed ({job.returncode}):\n{stderr[-2000:]}")
    line = next(line for line in stdout.splitlines() if line.startswith("{"))
    marks = json.loads(line)
    return {
        "workers ready": marks["ready"] - launched,
        "tasks done": marks["tasks"] - launched,
        "total": total,
    }


def stop(job: subprocess.Popen) -> None:
    """Ends a job past its deadline: mpirun passes SIGTERM on to its ranks; whatever of its
    process group is left 10 s later is killed."""
    job.terminate()
    try:
        job.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone
    job.wait()


def rank_counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    if min(counts) < 3:
        raise argparse.ArgumentTypeError("dask-mpi needs 3 ranks at least")
    return counts


def cell(value: float | None, width: int, missing: str) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{missing:>{width}}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ranks", "--np", type=rank_counts, default=[4], help="rank counts, e.g. 4,16,64"
    )
    parser.add_argument("--ntasks", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120, help="seconds a job may take")
    args = parser.parse_args()

    from rankmesh.cluster import find_binary

    try:
        import dask_mpi  # noqa: F401
        import mpi4py  # noqa: F401

        systems = ["dask-mpi", "dask-mpi+", "rankmesh"]
    except ImportError:
        systems = ["rankmesh"]
    folder = tempfile.mkdtemp(prefix="rankmesh-bench-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a failed job too
    paths = {}
    for kind, script in [("dask-mpi", DASK_JOB), ("rankmesh", RANKMESH_JOB)]:
        paths[kind] = os.path.join(folder, f"{kind}.py")
        with open(paths[kind], "w") as file:
            file.write(script)
    settings = rankmesh_mpi_settings({}) if "dask-mpi+" in systems else {}

    def job(system: str, n: int) -> tuple[list[str], dict[str, str]]:
        kind = system.rstrip("+")
        job_args = [paths[kind], str(n), str(args.ntasks)]
        if kind == "dask-mpi":
            command = [*mpirun_base(n), sys.executable, *job_args]
        else:
            runner = [find_binary(), "run", "--python", sys.executable]
            command = [*mpirun_base(n), *runner, *job_args]
        return command, settings if system == "dask-mpi+" else {}

    ranks = ",".join(map(str, args.ranks))
    print(f"MPI job start-up, mpirun -np {ranks}, {args.ntasks} no-op tasks, median of {args.reps}")
    if "dask-mpi+" in systems:
        chosen = " ".join(f"{k}={v}" for k, v in settings.items())
        print(f"dask-mpi+ = dask-mpi with {chosen or 'nothing (rankmesh sets nothing here)'}")
        print("ratio = dask-mpi / rankmesh (higher: rankmesh faster)")
    else:
        print("dask-mpi is not installed (pip install -r bench/requirements.txt): no ratios")
    print(f"a job still running after {args.timeout:g} s is stopped")
    others = [s for s in systems if s != "rankmesh"]
    header = " ".join(f"{s:>10}" for s in systems) + "".join(f"{s + ' / rm':>16}" for s in others)
    timed_out: dict[str, int] = {}  # system -> the rank count it ran out of time at
    for n in args.ranks:
        load_start = os.getloadavg()
        samples: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
        for _ in range(args.reps):
            for system in systems:
                if system in timed_out:
                    continue
                try:
                    samples[system].append(run_job(*job(system, n), args.timeout))
                except TimedOut:
                    timed_out[system] = n
        load = [", ".join(f"{x:.2f}" for x in loads) for loads in (load_start, os.getloadavg())]
        print(f"\nmpirun -np {n}: load average at start {load[0]}, at end {load[1]}")
        print(f"{'milestone (s since launch)':28} {header}")
        missing = {
            s: "timeout" if timed_out.get(s) == n else "-" for s in systems if s in timed_out
        }
        for milestone in ["workers ready", "tasks done", "total"]:
            medians = {
                s: None if s in missing else statistics.median(r[milestone] for r in samples[s])
                for s in systems
            }
            ours = medians["rankmesh"]
            ratios = [None if None in (medians[s], ours) else medians[s] / ours for s in others]
            print(
                f"{milestone:28} "
                + " ".join(cell(medians[s], 10, missing.get(s, "")) for s in systems)
                + "".join(cell(r, 15, "-") + ("x" if r is not None else " ") for r in ratios)
            )
        for system, mark in missing.items():
            if mark == "timeout":
                print(f"{system}: timed out after {args.timeout:g} s (stopped), not tried further")
            else:
                print(f"{system}: not tried (timed out at -np {timed_out[system]})")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
