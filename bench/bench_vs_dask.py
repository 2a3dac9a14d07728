"""rankmesh against Dask distributed, side by side, in one invocation on one machine.

Clusters (both up for the whole run, repetitions alternate between them):
  dask      distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
            dashboard_address=None), scheduler worker-saturation --worker-saturation
            (default inf, as in the Dask anchors: no scheduler-side queuing; Dask's own
            default is 1.1, which caps no-op throughput near 600 tasks/s on 2 cores)
  rankmesh  rankmesh.LocalCluster(n_workers=2, threads_per_worker=1) (dashboard on, unwatched)
  rankmesh-watched  the same with a status page open throughout (a reader of its event
            stream, which takes a snapshot every 0.5 s) (noop and tree only)
  rankmesh-nodash  the same with dashboard_address=None (noop and tree only)
  threads   Dask's threaded scheduler, num_workers=2 (xarray workload only, in-process)

Workloads:
  noop      N no-op tasks: client.map(noop, range(N)) + client.gather (Dask: pure=False)
  tree      binary tree reduction of 2^L leaves (np.full(1000, i) float64 each),
            2^(L+1) - 1 tasks, dask.delayed graph through dask.compute
  xarray    examples/xarray_anomaly.py: climatology, anomalies, weighted global mean of a
            (days, 180, 360) float32 synthetic dataset

Reported per workload and system: wall seconds (median of --reps, after an untimed
warm-up; building the inputs is not timed, dask.compute's graph work is), tasks/s (tasks /
median wall), peak worker memory (the sum of PSS over the worker processes and their
children, sampled every 50 ms, the highest over all reps; the threaded scheduler runs in
this process, so it has none), and the speedup: Dask distributed's wall divided by this
system's. Results are checked and compared between systems; any mismatch exits 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dask
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from xarray_anomaly import anomaly_pipeline, synthetic_dataset  # noqa: E402

N_WORKERS = 2
LEAF_LEN = 1000
MEMORY_SAMPLE_S = 0.05
# Finding new processes (executors restart, workers start children) costs a /proc scan;
# reading the memory of known ones is cheap. So rescan less often than sampling.
PROCESS_RESCAN_S = 1.0
XARRAY_RELATIVE_TOLERANCE = 1e-6

FULL_SIZES = {"noop_n": 20_000, "tree_levels": 14, "xarray_days": 730, "xarray_chunk_days": 365}
# --quick: a CI smoke run. 60 days is cheap but has no repeated day of year, so its
# anomalies are all zero; the full run checks non-trivial values.
QUICK_SIZES = {"noop_n": 2_000, "tree_levels": 10, "xarray_days": 60, "xarray_chunk_days": 30}


# ---------------------------------------------------------------- task functions


def noop(i):
    return 1


def leaf(i, n):
    return np.full(n, float(i))


def combine(a, b):
    return a + b


def tree_graph(levels: int, salt: str):
    """Delayed binary tree; keys are salted so no rep can reuse another's results."""
    from dask import delayed

    dleaf, dcombine = delayed(leaf, pure=True), delayed(combine, pure=True)
    level = [dleaf(i, LEAF_LEN, dask_key_name=f"leaf-{salt}-{i}") for i in range(2**levels)]
    depth = 0
    while len(level) > 1:
        depth += 1
        level = [
            dcombine(level[j], level[j + 1], dask_key_name=f"combine-{salt}-{depth}-{j}")
            for j in range(0, len(level), 2)
        ]
    return level[0]


# ---------------------------------------------------------------- memory sampling


class PeakMemory:
    """Background sampler of the summed PSS of some processes and all their descendants.

    PSS, not RSS: a page several of them map (rankmesh's shared-memory objects, mapped by
    the worker and by the executors reading them) counts once in the sum, not once per
    process; for processes sharing nothing the two are the same."""

    def __init__(self, root_pids: Callable[[], list[int]]):
        self._root_pids = root_pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list[psutil.Process]:
        found = []
        for pid in self._root_pids():
            try:
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def _run(self) -> None:
        processes, scanned_at = [], 0.0
        while True:
            if time.monotonic() - scanned_at > PROCESS_RESCAN_S:
                processes, scanned_at = self._processes(), time.monotonic()
            total = 0
            for process in processes:
                try:
                    total += process.memory_full_info().pss
                except psutil.NoSuchProcess:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            if self._stop.wait(MEMORY_SAMPLE_S):
                return


def rankmesh_worker_pids(cluster_pid: int) -> list[int]:
    """The `rankmesh worker` processes under `rankmesh local` (executors are their children)."""
    pids = []
    for process in psutil.Process(cluster_pid).children(recursive=True):
        try:
            if "worker" in process.cmdline()[1:2]:
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


# ---------------------------------------------------------------- systems


@dataclass
class System:
    """One way to run workloads. `client` is None for the in-process threaded scheduler."""

    name: str
    client: object
    compute_kwargs: dict[str, object]
    # Dask's map reuses results of equal (function, argument) calls unless pure=False;
    # rankmesh gives every submitted call its own task.
    map_kwargs: dict[str, object]
    worker_pids: Callable[[], list[int]]
    close: Callable[[], None] = lambda: None
    after_rep: Callable[[], None] = lambda: None


def start_dask(worker_saturation: str) -> System:
    import distributed

    if worker_saturation != "default":
        dask.config.set({"distributed.scheduler.worker-saturation": float(worker_saturation)})
    cluster = distributed.LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
    )
    # Not the default client: graphs computed for rankmesh must not pick distributed-only
    # methods (P2P rechunk/shuffle) because a distributed client exists.
    client = distributed.Client(cluster, set_as_default=False)
    client.wait_for_workers(N_WORKERS)
    worker_pids = list(client.run(os.getpid).values())

    def wait_scheduler_idle(timeout_s: float = 30.0) -> None:
        """Released futures of the previous rep must be forgotten before the next one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0:
                return
            time.sleep(0.05)

    def close() -> None:
        client.close()
        cluster.close()

    return System(
        name="dask",
        client=client,
        compute_kwargs={"scheduler": client},
        map_kwargs={"pure": False},
        worker_pids=lambda: worker_pids,
        close=close,
        after_rep=wait_scheduler_idle,
    )


def start_rankmesh(name: str = "rankmesh", dashboard: str = "on") -> System:
    import rankmesh

    address = None if dashboard == "off" else ":8787"
    cluster = rankmesh.LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=1, dashboard_address=address
    )
    client = rankmesh.Client(cluster)
    stop_watching = threading.Event()
    if dashboard == "watched":
        watch_status_page(client.dashboard_link, stop_watching)

    def close() -> None:
        stop_watching.set()
        client.close()
        cluster.close()

    return System(
        name=name,
        client=client,
        compute_kwargs={"scheduler": client.get},
        map_kwargs={},
        worker_pids=partial(rankmesh_worker_pids, cluster.pid),
        close=close,
    )


def watch_status_page(link: str, stop: threading.Event) -> None:
    """Reads the dashboard's event stream in a thread, as an open status page does."""
    import urllib.request

    base, token = link.split("/status?token=")
    request = urllib.request.Request(base + "/events", headers={"Authorization": f"Bearer {token}"})

    def read() -> None:
        with urllib.request.urlopen(request) as events:
            while not stop.is_set() and events.readline():
                pass

    threading.Thread(target=read, daemon=True).start()


def start_threads() -> System:
    return System(
        name="threads",
        client=None,
        compute_kwargs={"scheduler": "threads", "num_workers": N_WORKERS},
        map_kwargs={},
        worker_pids=list,
    )


# ---------------------------------------------------------------- workloads


def run_noop(system: System, items: range) -> list[int]:
    return system.client.gather(system.client.map(noop, items, **system.map_kwargs))


def run_collection(system: System, collection) -> object:
    return dask.compute(collection, **system.compute_kwargs)[0]


def xarray_series(days: int, salt: str, chunk_days: int):
    """Keys depend on the arguments only; the Dask side forgets them between reps."""
    return anomaly_pipeline(synthetic_dataset(days, min(days, chunk_days), seed=0))


@dataclass
class Workload:
    """`build(size, salt)` makes the input (untimed); `run(system, input)` is what is timed."""

    name: str
    build: Callable[[int, str], object]
    run: Callable[[System, object], object]
    size: int
    warmup_size: int
    n_tasks: int
    systems: list[str]
    check: Callable[[object], None]


@dataclass
class Row:
    workload: str
    system: str
    n_tasks: int
    walls: list[float] = field(default_factory=list)
    peak_memory: int = 0
    result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def check_noop(n: int) -> Callable[[object], None]:
    def check(result) -> None:
        if sum(result) != n:
            raise AssertionError(f"noop: {sum(result)} results, expected {n}")

    return check


def check_tree(levels: int) -> Callable[[object], None]:
    leaves = 2**levels
    expected = float(leaves * (leaves - 1) // 2)

    def check(result) -> None:
        if result.shape != (LEAF_LEN,) or not np.all(result == expected):
            raise AssertionError(f"tree: got {result[:3]}..., expected all {expected}")

    return check


def check_xarray(days: int) -> Callable[[object], None]:
    def check(result) -> None:
        if result.shape != (days,) or not np.all(np.isfinite(result)):
            raise AssertionError(f"xarray: got shape {result.shape}, expected ({days},), finite")

    return check


def workloads(sizes: dict[str, int], systems: list[str]) -> list[Workload]:
    n, levels, days = sizes["noop_n"], sizes["tree_levels"], sizes["xarray_days"]
    build_xarray = partial(xarray_series, chunk_days=sizes["xarray_chunk_days"])
    with_client = [s for s in systems if s != "threads"]
    # The dashboard variants answer one question: what watching costs the scheduler.
    main_systems = [s for s in systems if not s.startswith("rankmesh-")]
    return [
        Workload(
            name="noop",
            build=lambda size, salt: range(size),
            run=run_noop,
            size=n,
            warmup_size=500,
            n_tasks=n,
            systems=with_client,
            check=check_noop(n),
        ),
        Workload(
            name="tree",
            build=tree_graph,
            run=run_collection,
            size=levels,
            warmup_size=6,
            n_tasks=2 ** (levels + 1) - 1,
            systems=with_client,
            check=check_tree(levels),
        ),
        Workload(
            name="xarray",
            build=build_xarray,
            run=run_collection,
            size=days,
            warmup_size=min(30, days),
            n_tasks=len(build_xarray(days, "count").__dask_graph__()),
            systems=main_systems,
            check=check_xarray(days),
        ),
    ]


def compare_between_systems(workload: Workload, rows: list[Row]) -> str:
    """Every system's result against the first one's; returns a note for the table."""
    if len(rows) < 2:
        return f"only {rows[0].system} ran, nothing to compare"
    reference = np.asarray(rows[0].result)
    worst = 0.0
    for row in rows[1:]:
        worst = max(worst, float(np.max(np.abs(np.asarray(row.result) - reference))))
    if workload.name == "xarray":
        tolerance = XARRAY_RELATIVE_TOLERANCE * float(np.max(np.abs(reference)))
    else:
        tolerance = 0.0
    compared = " vs ".join(row.system for row in rows)
    if worst > tolerance:
        raise AssertionError(f"{workload.name}: {compared} differ by {worst:.3g} > {tolerance:.3g}")
    return f"{compared}: max |difference| {worst:.2g} (allowed {tolerance:.2g})"


def run_workload(workload: Workload, systems: dict[str, System], reps: int) -> list[Row]:
    rows = {name: Row(workload.name, name, workload.n_tasks) for name in workload.systems}
    for name in workload.systems:
        workload.run(systems[name], workload.build(workload.warmup_size, "warmup"))
        systems[name].after_rep()
    for rep in range(reps):
        for name in workload.systems:  # alternate: one rep of each system in turn
            system, row = systems[name], rows[name]
            job = workload.build(workload.size, f"rep{rep}")
            gc.collect()
            with PeakMemory(system.worker_pids) as memory:
                start = time.perf_counter()
                result = workload.run(system, job)
                row.walls.append(time.perf_counter() - start)
            workload.check(result)
            row.peak_memory = max(row.peak_memory, memory.peak_bytes)
            row.result = result
            system.after_rep()
            log(f"{workload.name} {name} rep{rep}: {row.walls[-1]:.3f} s")
            del job, result
    return list(rows.values())


# ---------------------------------------------------------------- output


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for module in ("dask", "distributed", "xarray", "numpy", "rankmesh"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def print_table(rows: list[Row], notes: dict[str, str]) -> None:
    dask_wall = {row.workload: row.median for row in rows if row.system == "dask"}
    header = (
        f"{'workload':<8} {'system':<9} {'tasks':>7} {'wall s':>8} {'tasks/s':>9} "
        f"{'worker PSS MiB':>14} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        memory = f"{row.peak_memory / 2**20:.0f}" if row.peak_memory else "-"
        speedup = (
            f"{dask_wall[row.workload] / row.median:.2f}x" if row.workload in dask_wall else "-"
        )
        print(
            f"{row.workload:<8} {row.system:<9} {row.n_tasks:>7} {row.median:>8.3f} "
            f"{row.n_tasks / row.median:>9.0f} {memory:>14} {speedup:>8}"
        )
    for workload, note in notes.items():
        print(f"{workload}: {note}")
    print("speedup = Dask distributed wall / this system's wall (higher: faster than Dask)")
    walls = {(row.workload, row.system): row.median for row in rows}
    for workload in dict.fromkeys(row.workload for row in rows):
        off = walls.get((workload, "rankmesh-nodash"))
        for system in ("rankmesh", "rankmesh-watched"):
            on = walls.get((workload, system))
            if off and on:
                print(f"{workload}: {system} wall / rankmesh-nodash wall = {on / off:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: small sizes, 1 rep, well under a minute"
    )
    parser.add_argument(
        "--systems",
        default="dask,rankmesh,threads",
        help="comma-separated subset of dask,rankmesh,rankmesh-watched,rankmesh-nodash,threads",
    )
    parser.add_argument(
        "--workloads", default="noop,tree,xarray", help="comma-separated subset of noop,tree,xarray"
    )
    parser.add_argument(
        "--worker-saturation",
        default="inf",
        help="Dask scheduler setting: a number, 'inf', or 'default' (1.1)",
    )
    parser.add_argument("--json", type=Path, help="append one JSON record of the run to this file")
    args = parser.parse_args()
    load_start = loadavg()
    started = time.perf_counter()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    reps = 1 if args.quick else args.reps
    chosen_systems = [s for s in args.systems.split(",") if s]
    chosen_workloads = [w for w in args.workloads.split(",") if w]

    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    starters = {
        "dask": partial(start_dask, args.worker_saturation),
        "rankmesh": start_rankmesh,
        "rankmesh-watched": partial(start_rankmesh, "rankmesh-watched", "watched"),
        "rankmesh-nodash": partial(start_rankmesh, "rankmesh-nodash", "off"),
        "threads": start_threads,
    }
    systems: dict[str, System] = {}
    rows: list[Row] = []
    notes: dict[str, str] = {}
    try:
        for name in chosen_systems:
            start = time.perf_counter()
            systems[name] = starters[name]()
            log(f"{name}: started in {time.perf_counter() - start:.2f} s")
        for workload in workloads(sizes, chosen_systems):
            if workload.name not in chosen_workloads or not workload.systems:
                continue
            workload_rows = run_workload(workload, systems, reps)
            notes[workload.name] = compare_between_systems(workload, workload_rows)
            rows += workload_rows
    finally:
        for system in systems.values():
            system.close()

    load_end = loadavg()
    print(
        f"rankmesh vs Dask, {N_WORKERS} workers x 1 thread, median of {reps} rep(s), "
        f"{os.cpu_count()} CPUs, Dask worker-saturation {args.worker_saturation}"
    )
    print(f"load average at start {load_start}, at end {load_end}")
    print_table(rows, notes)
    if args.json:
        record = {
            "bench": "bench_vs_dask",
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(),
            "ncpu": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "script_wall_s": round(time.perf_counter() - started, 3),
            "params": {**vars(args), "json": str(args.json), **sizes, "reps": reps},
            "versions": versions(),
            "rows": [
                {
                    "workload": r.workload,
                    "system": r.system,
                    "n_tasks": r.n_tasks,
                    "wall_s_median": r.median,
                    "wall_s": r.walls,
                    "tasks_per_s": r.n_tasks / r.median,
                    "peak_worker_pss_bytes": r.peak_memory,
                }
                for r in rows
            ],
            "notes": notes,
        }
        with args.json.open("a") as out:
            out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
