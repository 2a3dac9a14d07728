"""Work larger than memory: rankmesh against Dask distributed, side by side, in one
invocation on one machine, with the same memory limit for both.

Clusters (one at a time, each for all its workloads; the order alternates per rep):
  dask      distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
            memory_limit=LIMIT, local_directory=a fresh temp folder); Dask's default
            thresholds (target 0.6, spill 0.7, pause 0.8, terminate 0.95)
  rankmesh  rankmesh.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=LIMIT,
            local_directory=a fresh temp folder); the same thresholds by default
  threads   (a reference, not by default) Dask's threaded scheduler, 2 threads in this
            process, with no memory limit at all: nothing spilled, the machine's memory
            holding everything. How fast the graph runs when memory is no constraint;
            its peak is this process's PSS

Workloads (both against a cluster holding 2 x LIMIT):
  rechunk   a float64 cube of 4x the cluster's memory, (T, Y, X) in (1, Y, X) chunks,
            rechunked to (T, Y/16, X/16), persisted, then summed
  xarray    examples/xarray_anomaly.py (climatology, anomalies, weighted global mean) on a
            dataset of 4x the cluster's memory, persisted first

Reported per workload and system: wall seconds, peak memory (PSS of the workers and
their children, summed, sampled every 50 ms), bytes spilled and read back (Dask: the spill
buffers' disk-write and disk-read metrics; rankmesh: scheduler_info's spilled_total and
unspilled_total), and Dask's wall divided by this system's. A system that fails a workload
(killed workers, an error) is reported as such. A run still going after --timeout seconds
(default 900) is reported as not finished. Results are compared between systems; a
mismatch exits 1.

    .venv/bin/python bench/bench_memory.py                 # 512 MiB workers, 4 GiB cube
    .venv/bin/python bench/bench_memory.py --quick         # 256 MiB workers, 2 GiB cube
    .venv/bin/python bench/bench_memory.py --systems dask,rankmesh,threads  # and the reference
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _shared_memory import shared_memory  # noqa: E402
from bench_vs_dask import PeakMemory, loadavg, rankmesh_worker_pids  # noqa: E402
from xarray_anomaly import anomaly_pipeline, synthetic_dataset  # noqa: E402

MIB = 1 << 20
N_WORKERS = 2
RELATIVE_TOLERANCE = 1e-9


def cube(cluster_bytes: int):
    """float64 (T, 1024, 1024) of 4x the cluster's memory, one 8 MiB plane per chunk,
    rechunked to (T, 64, 64) columns."""
    planes = 4 * cluster_bytes // (1024 * 1024 * 8)
    x = da.random.RandomState(0).random((planes, 1024, 1024), chunks=(1, 1024, 1024))
    return x.rechunk((planes, 64, 64))


def dataset(cluster_bytes: int):
    """The anomaly pipeline's (days, 180, 360) float32 dataset at 4x the cluster's memory."""
    days = 4 * cluster_bytes // (180 * 360 * 4)
    # 128 chunks (32 MiB at 2 x 512 MiB): a chunk a worker can hold a few of, as Pangeo
    # sizes chunks to its workers.
    return synthetic_dataset(days=days, chunk_days=max(days // 128, 1), seed=3)


# The threaded reference's scheduler (`--systems threads`).
THREADS = {"scheduler": "threads", "num_workers": N_WORKERS}


def run_rechunk(client, cluster_bytes: int) -> float:
    if client is None:
        persisted = cube(cluster_bytes).persist(**THREADS)
        return float(persisted.sum().compute(**THREADS))
    persisted = client.persist(cube(cluster_bytes))
    total = float(client.compute(persisted.sum()).result())
    del persisted
    return total


def run_xarray(client, cluster_bytes: int) -> np.ndarray:
    if client is None:
        ds = dataset(cluster_bytes).persist(**THREADS)
        return np.asarray(anomaly_pipeline(ds).compute(**THREADS))
    ds = client.persist(dataset(cluster_bytes))
    result = client.compute(anomaly_pipeline(ds)).result()
    return np.asarray(result)


def start(system: str, limit: int, directory: str):
    if system == "threads":
        return None, None, lambda: [os.getpid()], lambda: (0, 0)
    if system == "dask":
        import distributed

        cluster = distributed.LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            memory_limit=limit,
            local_directory=directory,
            dashboard_address=None,
        )
        client = distributed.Client(cluster, set_as_default=False)
        client.wait_for_workers(N_WORKERS)
        pids = list(client.run(os.getpid).values())

        def spilled() -> tuple[int, int]:
            def disk_bytes(dask_worker) -> tuple[float, float]:
                metrics = getattr(dask_worker.data, "cumulative_metrics", {}).items()
                moved = {label: v for (label, unit), v in metrics if unit == "bytes"}
                return moved.get("disk-write", 0), moved.get("disk-read", 0)

            per_worker = client.run(disk_bytes).values()
            return int(sum(w for w, _ in per_worker)), int(sum(r for _, r in per_worker))

        return cluster, client, lambda: pids, spilled
    import rankmesh

    cluster = rankmesh.LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=1, memory_limit=limit, local_directory=directory
    )
    client = rankmesh.Client(cluster)

    def spilled() -> tuple[int, int]:
        workers = client.scheduler_info()["workers"].values()
        return sum(w["spilled_total"] for w in workers), sum(w["unspilled_total"] for w in workers)

    return cluster, client, lambda: rankmesh_worker_pids(cluster.pid), spilled


def measure(system: str, workload: str, limit: int, timeout: float):
    directory = tempfile.mkdtemp(prefix=f"bench-memory-{system}-")
    cluster_bytes = N_WORKERS * limit
    run = run_rechunk if workload == "rechunk" else run_xarray
    try:
        cluster, client, pids, spilled = start(system, limit, directory)
        try:
            outcome: dict = {}

            def work() -> None:
                try:
                    outcome["result"] = run(client, cluster_bytes)
                except Exception as e:  # reported as the row's failure
                    outcome["error"] = f"{type(e).__name__}: {str(e)[:200]}"

            # Tasks, not P2P, for both; intermediate chunks small enough for the workers.
            config = {"array.rechunk.method": "tasks", "array.chunk-size": "16MiB"}
            with dask.config.set(config), PeakMemory(pids) as peak:
                started = time.perf_counter()
                worker = threading.Thread(target=work, daemon=True)
                worker.start()
                worker.join(timeout)
                wall = time.perf_counter() - started
            if worker.is_alive():  # closing the cluster below ends its wait
                return {"error": f"did not finish in {timeout:.0f} s"}
            if "error" in outcome:
                return outcome
            return {
                "wall": wall,
                "peak": peak.peak_bytes,
                "spilled": spilled(),
                "result": outcome["result"],
            }
        finally:
            if client is not None:
                client.close()
                cluster.close()
    except Exception as e:  # a failed run is a result here
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def same(a, b) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=RELATIVE_TOLERANCE, atol=0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB workers, 2 GiB cube")
    parser.add_argument("--limit-mib", type=int, help="each worker's memory limit")
    parser.add_argument("--workloads", default="rechunk,xarray")
    parser.add_argument("--systems", default="dask,rankmesh")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a system gets per workload"
    )
    args = parser.parse_args()
    limit = (args.limit_mib or (256 if args.quick else 512)) * MIB
    systems = args.systems.split(",")
    print(
        f"# {N_WORKERS} workers x {limit // MIB} MiB; load {loadavg()}; {shared_memory()}",
        flush=True,
    )
    print("| workload | system | wall s | peak MiB | spilled MiB | read back MiB | dask/this |")
    print("|---|---|---|---|---|---|---|")
    mismatch = False
    for workload in args.workloads.split(","):
        ok = {}
        for system in systems:  # each row as soon as it is measured: runs can be long
            o = measure(system, workload, limit, args.timeout)
            if "error" in o:
                print(f"| {workload} | {system} | failed: {o['error']} | | | | |", flush=True)
                continue
            ok[system] = o
            ratio = ""
            if system in ("rankmesh", "threads") and "dask" in ok:
                ratio = f"{ok['dask']['wall'] / o['wall']:.2f}x"
            peak, (written, read) = o["peak"] / MIB, (b / MIB for b in o["spilled"])
            cells = [workload, system, f"{o['wall']:.1f}", f"{peak:.0f}", f"{written:.0f}"]
            cells += [f"{read:.0f}", ratio]
            print("| " + " | ".join(cells) + " |", flush=True)
        results = [o["result"] for o in ok.values()]
        if any(not same(results[0], other) for other in results[1:]):
            mismatch = True
            print(f"# {workload}: results differ between systems", flush=True)
    print(f"# load after: {loadavg()}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
