"""The Python client at scale: 10^6 calls through `client.map`, and a 10^6-task Dask graph
through `client.compute`, beside Dask's own graph-building time (issue 19).

Parts (`--parts`, default both):
  map    client.map(inc, range(N)) on rankmesh.LocalCluster, then sum(client.gather(...)):
         seconds until the futures are returned (submit) and until the sum is here (total);
         the client's and the scheduler's memory (`rankmesh local` hosts the scheduler;
         its workers are separate processes and not counted).
  graph  da.ones(B, chunks=1).map_blocks(inc).sum(split_every=16) with B = 15N/16 blocks:
         after Dask's blockwise fusion one task per block plus the sum's tree, about N
         tasks. First Dask's own graph
         building, stage by stage, as `dask.compute` does it before any scheduler runs
         (optimize the expression, materialize its graph, convert it to Task objects, and
         dask.order, which the local schedulers run and rankmesh skips above 5,000 tasks);
         then rankmesh's client.compute (submit: until the future is returned, Dask's
         work included; total: until the value is here), with rankmesh's own stages; then
         Dask's threaded scheduler (`dask.compute(scheduler="threads")`, 2 threads) on the
         same graph for the total time. Each system gets its own map_blocks name, so no
         expression or graph cached by an earlier run is reused.
  Dask distributed (`--distributed`, both parts) runs the same on
  distributed.LocalCluster(2 workers, 1 thread each, worker-saturation inf), stopped at
  `--deadline` seconds per part (it runs ~2,400 tasks/s here: fine at 10^5, long at 10^6).

Every result is checked against its closed form and between systems; a mismatch exits 1.
Load averages are printed at the start and the end: the machine is shared.

    .venv/bin/python bench/bench_client_scale.py                 # N = 10^6, ~5 min on 2 cores
    .venv/bin/python bench/bench_client_scale.py --n 100000      # a quick run
    .venv/bin/python bench/bench_client_scale.py --n 100000 --distributed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime

import dask
import dask.array as da
import numpy as np
import psutil

SAMPLE_S = 0.05
N_WORKERS = 2


def inc(x):
    return x + 1


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class PeakRss:
    """Highest RSS of some processes, sampled every SAMPLE_S by a thread (the sampling
    takes the GIL for microseconds)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = {name: p.memory_info().rss for name, p in self._processes.items()}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        for name, process in self._processes.items():
            try:
                self.peak[name] = max(self.peak[name], process.memory_info().rss)
            except psutil.NoSuchProcess:
                continue

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def growth(self, name: str) -> int:
        return self.peak[name] - self.start[name]


class Stages:
    """Wall seconds spent in some functions, by name: wraps attributes of modules for the
    duration of a block (only the outermost call of each counts)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    @contextmanager
    def timing(self, targets: list[tuple[object, str, str]]):
        originals = []
        for owner, attribute, name in targets:
            original = getattr(owner, attribute)
            originals.append((owner, attribute, original))
            setattr(owner, attribute, self._wrap(original, name))
        try:
            yield self
        finally:
            for owner, attribute, original in originals:
                setattr(owner, attribute, original)

    def _wrap(self, func: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            depth = self._depth.get(name, 0)
            self._depth[name] = depth + 1
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._depth[name] = depth
                if depth == 0:
                    elapsed = time.perf_counter() - start
                    self.seconds[name] = self.seconds.get(name, 0.0) + elapsed

        return timed


def cpu_s() -> float:
    """CPU seconds this process has used: unlike wall time, hardly changed by what else
    runs on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cluster_cpu_s(cluster) -> float:
    """CPU seconds of `rankmesh local` and everything under it (scheduler, workers,
    executors) so far."""
    root = psutil.Process(cluster.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(record: dict, part: str, **values: object) -> None:
    record.setdefault(part, {}).update(values)
    shown = ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )
    print(f"  {part}: {shown}", flush=True)


def measured_run(record: dict, part: str, cluster, tasks: int, submit, wait):
    """Runs `wait(submit())` on rankmesh and reports its times, CPU and memory as `part`."""
    with PeakRss({"client": os.getpid(), "scheduler": cluster.pid}) as rss:
        cluster_start = cluster_cpu_s(cluster)
        start, cpu_start = time.perf_counter(), cpu_s()
        handle = submit()
        submitted, cpu_submitted = time.perf_counter(), cpu_s()
        value = wait(handle)
        done, cpu_done = time.perf_counter(), cpu_s()
        cluster_used = cluster_cpu_s(cluster) - cluster_start
        del handle
    report(
        record,
        part,
        submit_s=submitted - start,
        total_s=done - start,
        client_cpu_submit_s=cpu_submitted - cpu_start,
        client_cpu_total_s=cpu_done - cpu_start,
        cluster_cpu_s=cluster_used,
        tasks_per_s=round(tasks / (done - start)),
        client_peak=mib(rss.peak["client"]),
        client_growth=mib(rss.growth("client")),
        scheduler_growth_B_per_task=round(rss.growth("scheduler") / tasks),
    )
    return value


# ---------------------------------------------------------------- client.map


def rankmesh_map(client, cluster, n: int, record: dict) -> int:
    client.gather(client.map(inc, range(100)))  # warm-up: executors have the function
    gc.collect()
    total = measured_run(
        record,
        "rankmesh map",
        cluster,
        n,
        submit=lambda: client.map(inc, range(n)),
        wait=lambda futures: sum(client.gather(futures)),
    )
    report(
        record,
        "rankmesh map",
        ru_maxrss=mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    )
    return total


def distributed_map(client, n: int, deadline: float, record: dict) -> int | None:
    import distributed

    client.gather(client.map(inc, range(100), pure=False))
    gc.collect()
    with PeakRss({"client": os.getpid()}) as rss:
        start = time.perf_counter()
        futures = client.map(inc, range(n), pure=False)
        submitted = time.perf_counter()
        try:
            with client.as_current():  # not the default client: wait() finds it so
                distributed.wait(futures, timeout=max(1.0, deadline - (submitted - start)))
        except distributed.TimeoutError:
            done = sum(f.status == "finished" for f in futures)
            report(record, "distributed map", gave_up_after_s=deadline, finished=done)
            client.cancel(futures)
            return None
        total = sum(client.gather(futures))
        done = time.perf_counter()
        del futures
    report(
        record,
        "distributed map",
        submit_s=submitted - start,
        total_s=done - start,
        tasks_per_s=round(n / (done - start)),
        client_growth=mib(rss.growth("client")),
    )
    return total


# ---------------------------------------------------------------- a Dask graph


SPLIT_EVERY = 16


def blocks_for(n: int) -> int:
    """Blocks whose fused graph has about n tasks: one per block, and the sum's tree adds
    one per SPLIT_EVERY - 1 blocks."""
    return n * (SPLIT_EVERY - 1) // SPLIT_EVERY


def array_sum(n: int, name: str):
    """sum(inc(1)) over one-element blocks, about n tasks; `name` keeps each system's graph
    its own."""
    blocks = da.ones(blocks_for(n), chunks=1).map_blocks(inc, dtype=float, name=name)
    return blocks.sum(split_every=SPLIT_EVERY)


def dask_graph_building(n: int, record: dict) -> int:
    """Dask's own work before any scheduler runs, stage by stage; the number of tasks."""
    from dask._expr import FinalizeCompute
    from dask._task_spec import convert_legacy_graph
    from dask.base import collections_to_expr
    from dask.order import order

    gc.collect()
    with PeakRss({"client": os.getpid()}) as rss:
        cpu_start = cpu_s()
        t0 = time.perf_counter()
        collection = array_sum(n, "inc-floor")
        t1 = time.perf_counter()
        expr = FinalizeCompute(collections_to_expr([collection])).optimize()
        t2 = time.perf_counter()
        graph = expr.__dask_graph__()
        t3 = time.perf_counter()
        converted = convert_legacy_graph(graph)
        t4, cpu_floor = time.perf_counter(), cpu_s()
        order(converted)
        t5 = time.perf_counter()
        tasks = len(converted)
        del collection, expr, graph, converted
    report(
        record,
        "dask graph building",
        tasks=tasks,
        construct_s=t1 - t0,
        optimize_s=t2 - t1,
        materialize_s=t3 - t2,
        convert_s=t4 - t3,
        floor_s=t4 - t0,
        floor_cpu_s=cpu_floor - cpu_start,
        order_s=t5 - t4,
        client_growth=mib(rss.growth("client")),
    )
    return tasks


def rankmesh_graph(client, cluster, n: int, tasks: int, record: dict) -> float:
    import rankmesh.client
    import rankmesh.graph

    graphs = rankmesh.graph
    targets = [
        (graphs, "compute_expression", "optimize"),
        (rankmesh.client, "annotations_of", "annotations (lowers the graph)"),
        (graphs, "materialize", "materialize+convert"),
        (graphs, "graph_tasks", "rankmesh graph_tasks"),
        (rankmesh.client.Client, "_submit", "rankmesh _submit (native)"),
    ]
    gc.collect()
    with Stages().timing(targets) as stages:
        value = measured_run(
            record,
            "rankmesh graph",
            cluster,
            tasks,
            submit=lambda: client.compute(array_sum(n, "inc-rankmesh")),
            wait=lambda future: future.result(),
        )
    report(record, "rankmesh graph stages", **{k: round(v, 2) for k, v in stages.seconds.items()})
    return value


def threaded_graph(n: int, tasks: int, record: dict) -> float:
    gc.collect()
    with PeakRss({"client": os.getpid()}) as rss:
        start, cpu_start = time.perf_counter(), cpu_s()
        (value,) = dask.compute(array_sum(n, "inc-threads"), scheduler="threads", num_workers=2)
        done, cpu_done = time.perf_counter(), cpu_s()
    report(
        record,
        "threads graph",
        total_s=done - start,
        cpu_s=cpu_done - cpu_start,
        tasks_per_s=round(tasks / (done - start)),
        client_growth=mib(rss.growth("client")),
    )
    return value


def distributed_graph(client, n: int, tasks: int, deadline: float, record: dict) -> float | None:
    import distributed

    gc.collect()
    start = time.perf_counter()
    future = client.compute(array_sum(n, "inc-distributed"))
    submitted = time.perf_counter()
    try:
        value = future.result(timeout=max(1.0, deadline - (submitted - start)))
    except distributed.TimeoutError:
        report(record, "distributed graph", gave_up_after_s=deadline)
        client.cancel(future)
        return None
    done = time.perf_counter()
    report(
        record,
        "distributed graph",
        submit_s=submitted - start,
        total_s=done - start,
        tasks_per_s=round(tasks / (done - start)),
    )
    return value


# ---------------------------------------------------------------- main


def check(what: str, got: object, expected: object) -> None:
    if got != expected:
        print(f"MISMATCH {what}: {got!r} != {expected!r}", flush=True)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="calls / blocks (10^6)")
    parser.add_argument("--parts", default="map,graph", help="map, graph or both")
    parser.add_argument("--distributed", action="store_true", help="also Dask distributed")
    parser.add_argument("--deadline", type=float, default=300.0, help="distributed, per part")
    parser.add_argument("--no-threads", action="store_true", help="skip the threaded run")
    parser.add_argument("--json", help="append one JSON record of the run to this file")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    n = args.n

    import rankmesh

    record: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": n,
        "load_start": os.getloadavg(),
        "python": platform.python_version(),
        "dask": dask.__version__,
    }
    print(f"bench_client_scale N={n:,} parts={sorted(parts)}; start: {load()}", flush=True)
    with rankmesh.LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        with rankmesh.Client(cluster) as client:
            if "map" in parts:
                total = rankmesh_map(client, cluster, n, record)
                check("rankmesh map sum", total, n * (n + 1) // 2)
            if "graph" in parts:
                tasks = dask_graph_building(n, record)
                value = rankmesh_graph(client, cluster, n, tasks, record)
                check("rankmesh graph value", float(value), 2.0 * blocks_for(n))
                if not args.no_threads:
                    threaded = threaded_graph(n, tasks, record)
                    check("threads == rankmesh", float(threaded), float(value))
    if args.distributed:
        import distributed

        dask.config.set({"distributed.scheduler.worker-saturation": float("inf")})
        with (
            distributed.LocalCluster(
                n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
        ):
            if "map" in parts:
                total = distributed_map(client, n, args.deadline, record)
                if total is not None:
                    check("distributed map sum", total, n * (n + 1) // 2)
            if "graph" in parts:
                value = distributed_graph(client, n, tasks, args.deadline, record)
                if value is not None:
                    check("distributed graph value", float(value), 2.0 * blocks_for(n))
    record["load_end"] = os.getloadavg()
    print(f"end: {load()}", flush=True)
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
