"""The xarray pipeline under `mpirun -np N rankmesh run`: workers placed by the topology plan
(`--worker-per numa`, the default) against unbound workers (`--no-bind`), side by side.

Each repetition runs the same job both ways, alternating (mpirun as root with
--allow-run-as-root, always --oversubscribe --bind-to none, so only rankmesh binds). The job
computes examples/xarray_anomaly.py on synthetic data through `dask.compute` and prints its
wall time and, from inside a task on every worker, the worker's `Cpus_allowed_list` and
OMP_NUM_THREADS. Reported: median pipeline seconds and median job seconds (mpirun launch to
exit) per mode, their ratio, and what the workers were bound to. On a machine with few cores
and one NUMA node little difference is expected; the point is that both modes run and report.
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

from _mpi import mpirun_base

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

JOB = """
import json, os, sys, time
sys.path.insert(0, {examples!r})
import dask, numpy as np
import rankmesh
from xarray_anomaly import anomaly_pipeline, synthetic_dataset

def where(i):
    time.sleep(0.2)  # long enough that every worker gets one
    status = open("/proc/self/status").read().splitlines()
    cpus = next(line.split()[1] for line in status if line.startswith("Cpus_allowed_list"))
    return rankmesh.get_worker().id, cpus, os.environ.get("OMP_NUM_THREADS")

ds = synthetic_dataset(days={days}, chunk_days={chunk_days}, seed=3)
start = time.perf_counter()
series = anomaly_pipeline(ds).compute()
seconds = time.perf_counter() - start
assert np.isfinite(series.values).all()
with rankmesh.Client() as client:
    workers = sorted(set(client.gather(client.map(where, range({probes})))))
print(json.dumps({{"seconds": seconds, "workers": workers}}), flush=True)
"""


def run_job(command: list[str], timeout: float) -> dict:
    launched = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    total = time.time() - launched
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    record = json.loads(line)
    record["total"] = total
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--np", type=int, default=3, help="MPI ranks (rank 0: scheduler)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--chunk-days", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="small data, 1 rep (smoke run)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.days, args.chunk_days = 1, 120, 30
    binary = shutil.which("rankmesh", path=os.path.dirname(sys.executable)) or shutil.which(
        "rankmesh"
    )
    if binary is None:
        sys.exit("rankmesh binary not found (run scripts/install.sh)")
    modes = {"numa": ["--worker-per", "numa"], "unbound": ["--no-bind"]}
    print(f"load average at start: {os.getloadavg()}")
    print(f"mpirun -np {args.np}, {args.days} days by {args.chunk_days}, {args.reps} reps")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "job.py")
        with open(script, "w") as f:
            f.write(
                JOB.format(
                    examples=os.path.abspath(EXAMPLES),
                    days=args.days,
                    chunk_days=args.chunk_days,
                    probes=4 * (args.np - 1),
                )
            )
        for _ in range(args.reps):
            for mode, flags in modes.items():
                command = mpirun_base(args.np) + [binary, "run", "--python", sys.executable]
                results[mode].append(run_job(command + flags + [script], args.timeout))
    print(f"{'mode':<9} {'pipeline s':>10} {'job s':>7}  workers (id: cpus, OMP_NUM_THREADS)")
    medians = {}
    for mode, runs in results.items():
        pipeline = statistics.median(r["seconds"] for r in runs)
        total = statistics.median(r["total"] for r in runs)
        medians[mode] = pipeline
        workers = ", ".join(f"{w}: {cpus}, {omp}" for w, cpus, omp in runs[-1]["workers"])
        print(f"{mode:<9} {pipeline:>10.2f} {total:>7.2f}  {workers}")
    print(f"unbound / numa pipeline time: {medians['unbound'] / medians['numa']:.2f}")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
