"""Start-up and teardown of an MPI job: dask-mpi against `rankmesh run`, side by side.

One invocation alternates repetitions of the same job under `mpirun -np 4` (as root with
--allow-run-as-root, always --oversubscribe --bind-to none):

  dask-mpi   python job.py, calling dask_mpi.initialize(nthreads=1, dashboard=False):
             rank 0 scheduler, rank 1 the script (client), ranks 2-3 workers
  dask-mpi+  the same, given the Open MPI settings `rankmesh run` fills in for itself
             (`rankmesh mpi-settings`): what of the difference is MPI's own start-up
  rankmesh   rankmesh run job.py: rank 0 scheduler and the script, ranks 1-3 workers

Dask runs with `distributed.scheduler.worker-saturation: inf`, as in the Dask anchors.
Each job connects a client, waits until all its workers are there, runs --ntasks no-op
tasks with map + gather, and exits. Reported (median over --reps, seconds since mpirun was
launched): workers ready, tasks done, and total (mpirun returned), with the ratios
dask-mpi / rankmesh and dask-mpi+ / rankmesh. dask-mpi needs mpi4py and dask-mpi in the environment
(`pip install -r bench/requirements.txt`); without them only
the rankmesh side runs and the ratio column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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


def run_job(command: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    # As in the Dask anchors: no scheduler-side queuing (Dask's default, 1.1, is slower).
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="inf", **env)
    launched = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    total = time.time() - launched
    if result.returncode != 0:
        raise RuntimeError(f"{command[-3:]} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    marks = json.loads(line)
    return {
        "workers ready": marks["ready"] - launched,
        "tasks done": marks["tasks"] - launched,
        "total": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--np", type=int, default=4)
    parser.add_argument("--ntasks", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    from rankmesh.cluster import find_binary

    try:
        import dask_mpi  # noqa: F401
        import mpi4py  # noqa: F401

        systems = ["dask-mpi", "dask-mpi+", "rankmesh"]
    except ImportError:
        systems = ["rankmesh"]
    folder = tempfile.mkdtemp(prefix="rankmesh-bench-")
    scripts = {"dask-mpi": DASK_JOB, "rankmesh": RANKMESH_JOB}
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {}
    for system in systems:
        kind = system.rstrip("+")
        path = os.path.join(folder, f"{kind}.py")
        with open(path, "w") as file:
            file.write(scripts[kind])
        job_args = [path, str(args.np), str(args.ntasks)]
        if kind == "dask-mpi":
            command = [*mpirun_base(args.np), sys.executable, *job_args]
        else:
            runner = [find_binary(), "run", "--python", sys.executable]
            command = [*mpirun_base(args.np), *runner, *job_args]
        env = rankmesh_mpi_settings({}) if system == "dask-mpi+" else {}
        jobs[system] = (command, env)

    samples: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
    load_start = os.getloadavg()
    for _ in range(args.reps):
        for system, (command, env) in jobs.items():
            samples[system].append(run_job(command, env, args.timeout))
    shutil.rmtree(folder, ignore_errors=True)

    print(
        f"MPI job start-up, mpirun -np {args.np}, {args.ntasks} no-op tasks, median of {args.reps}"
    )
    print(f"load average at start {load_start}, at end {os.getloadavg()}")
    if "dask-mpi+" in jobs:
        settings = " ".join(f"{k}={v}" for k, v in jobs["dask-mpi+"][1].items())
        print(f"dask-mpi+ = dask-mpi with {settings or 'nothing (rankmesh sets nothing here)'}")
    others = [s for s in systems if s != "rankmesh"]
    header = " ".join(f"{s:>10}" for s in systems) + "".join(f"{s + ' / rm':>16}" for s in others)
    print(f"{'milestone (s since launch)':28} {header}")
    for milestone in ["workers ready", "tasks done", "total"]:
        medians = {s: statistics.median(r[milestone] for r in samples[s]) for s in systems}
        ratios = "".join(f"{medians[s] / medians['rankmesh']:15.2f}x" for s in others)
        print(f"{milestone:28} " + " ".join(f"{medians[s]:10.3f}" for s in systems) + ratios)
    if not others:
        print("dask-mpi is not installed (pip install -r bench/requirements.txt): no ratios")
    print("ratio = dask-mpi / rankmesh (higher: rankmesh faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
