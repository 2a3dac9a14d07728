"""Worker-to-worker transfer of large numpy arrays: rankmesh over MPI (and UCX, and TCP)
against a raw MPI ping-pong of the same bytes and against Dask, in one run.

Parts (sizes: --count arrays of --size-mib MiB, float64; GB = 1e9 bytes):
  raw MPI    mpi4py ping-pong between 2 ranks (`mpirun -np 2`), Send/Recv of one
             pre-faulted buffer; GB/s = size / (round trip / 2). The ceiling. It runs
             twice: with Open MPI's settings as they are (the anchor's method), and with
             the settings `rankmesh run` fills in (`rankmesh mpi-settings`); the better
             of the two is the ceiling the ratios use.
  rankmesh   `mpirun -np 3 rankmesh run --transport T`: workers A and B (ranks 1, 2), on
             one node, so by default B links A's shared-memory file ("linked"); with
             `--no-same-node-links` the bytes go over T as between nodes ("over T").
             Each array is made on A (workers=[A]) and consumed (x.sum()) by a task
             pinned to B twice: the first time B fetches it from A, the second time B
             has it. Transfer = t(first) - t(second): everything the fetch adds, from the
             request to the bytes being usable by B's task.
             * one at a time: per-array transfer, median
             * all at once: --count arrays on A, consumed together on B twice;
               GB/s = count * size / (t_first - t_second). The first round is reported
               apart ("cold"): rankmesh then receives most arrays into fresh shared
               memory, later rounds into the segments released arrays left.
  dask       distributed.LocalCluster(2 workers x 1 thread, processes) with the same
             pinning (workers=[A], allow_other_workers=False) over its TCP comm.
The ceiling is the best ping-pong of a run before the rest and one after.
Each of the rankmesh variants (MPI with Open MPI's ob1 PML, MPI with the UCX PML, TCP;
linked and not) runs as its own job; the raw ping-pong is repeated with the UCX PML for the UCX row.
Ratio = GB/s / raw MPI GB/s of the same PML (higher is better; 1.0 = the MPI ceiling).

The raw MPI part needs mpi4py built against the system MPI (bench/requirements.txt);
without it that part is skipped and the ratio column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _mpi import UCX_ENV, mpirun_base, rankmesh_mpi_settings
from _shared_memory import shared_memory

MiB = 1 << 20


def make(i: int, nbytes: int):
    import numpy as np

    return np.full(nbytes // 8, float(i))


def consume(x) -> float:
    return float(x.sum())


def consume_on(client, submit, xs: list, worker, expected: list[float]) -> float:
    """Seconds to run `consume` on every array of xs on worker, all submitted at once."""
    start = time.perf_counter()
    sums = client.gather([submit(consume, x, worker=worker) for x in xs])
    elapsed = time.perf_counter() - start
    assert sums == expected, sums
    return elapsed


def measure(client, submit, a, b, args) -> dict:
    """Transfer seconds per array (one at a time) and GB/s for --count at once.

    `submit(func, *args, worker=W)` pins a task to worker W and returns a future."""
    nbytes = args.size_mib * MiB
    expected = [float(i) * (nbytes // 8) for i in range(args.count)]

    def transfer(xs: list, sums: list[float]) -> float:
        consume_on(client, submit, xs, a, sums)  # made: A holds them, the client none
        first = consume_on(client, submit, xs, b, sums)  # B fetches them from A
        again = consume_on(client, submit, xs, b, sums)  # B holds them
        return first - again

    one_at_a_time = []
    for rep in range(args.reps + 1):  # the first round warms connections and pools up
        for i in range(args.count):
            seconds = transfer([submit(make, i, nbytes, worker=a)], expected[i : i + 1])
            if rep:
                one_at_a_time.append(seconds)
    at_once = []
    for _ in range(args.reps + 1):  # the first round is cold: B has fewer spare buffers
        xs = [submit(make, i, nbytes, worker=a) for i in range(args.count)]
        at_once.append(args.count * nbytes / 1e9 / transfer(xs, expected))
    per_array = statistics.median(one_at_a_time)
    return {
        "one_s": per_array,
        "one_gbs": nbytes / 1e9 / per_array,
        "all_cold_gbs": at_once[0],
        "all_gbs": statistics.median(at_once[1:]),
    }


# ---------------------------------------------------------------------------- children


def rankmesh_child(args) -> None:
    import rankmesh

    client = rankmesh.Client()  # the job's cluster
    a, b = client.workers()[:2]

    def submit(func, *call_args, worker):
        return client.submit(func, *call_args, workers=[worker["id"]])

    print(json.dumps(measure(client, submit, a, b, args)), flush=True)


def mpi_child(args) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    buf = np.ones(args.size_mib * MiB, dtype=np.uint8)
    rtts = []
    for it in range(2 + args.count * args.reps):
        comm.Barrier()
        start = MPI.Wtime()
        if rank == 0:
            comm.Send([buf, MPI.BYTE], dest=peer, tag=1)
            comm.Recv([buf, MPI.BYTE], source=peer, tag=2)
        else:
            comm.Recv([buf, MPI.BYTE], source=peer, tag=1)
            comm.Send([buf, MPI.BYTE], dest=peer, tag=2)
        if it >= 2:
            rtts.append(MPI.Wtime() - start)
    if rank == 0:
        one_way = statistics.median(rtts) / 2
        print(json.dumps({"one_s": one_way, "one_gbs": buf.nbytes / 1e9 / one_way}), flush=True)


# ---------------------------------------------------------------------------- parent


def child_args(args) -> list[str]:
    return ["--size-mib", str(args.size_mib), "--count", str(args.count), "--reps", str(args.reps)]


def run_child(command: list[str], env: dict[str, str], timeout: float) -> dict:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("{")))


def raw_mpi(args, env: dict[str, str]) -> dict | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    me = os.path.abspath(__file__)
    command = [*mpirun_base(2), sys.executable, me, "--mpi-child", *child_args(args)]
    return run_child(command, env, args.timeout)


def rankmesh_job(args, transport: str, env: dict[str, str], links: bool = True) -> dict:
    from rankmesh.cluster import find_binary

    runner = [find_binary(), "run", "--transport", transport, "--python", sys.executable]
    if not links:
        runner.insert(2, "--no-same-node-links")
    me = os.path.abspath(__file__)
    command = [*mpirun_base(3), *runner, me, "--rankmesh-child", *child_args(args)]
    return run_child(command, env, args.timeout)


def dask_cluster(args) -> dict:
    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.comm.compression": None}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])

        def submit(func, *call_args, worker):
            return client.submit(
                func, *call_args, workers=[worker], allow_other_workers=False, pure=False
            )

        return measure(client, submit, a, b, args)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1, help="rounds of --count arrays")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--json", help="append one JSON record of the run to this file")
    parser.add_argument("--rankmesh-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mpi-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rankmesh_child:
        rankmesh_child(args)
        return 0
    if args.mpi_child:
        mpi_child(args)
        return 0

    load_start = os.getloadavg()
    pmls = {"ob1": {}, "ucx": UCX_ENV}
    # Raw MPI as Open MPI is set up here (the anchor's method), and with the settings
    # rankmesh fills in for itself: the ceiling is the better of the two.
    variants = {
        (pml, settings): env if settings == "as is" else {**env, **rankmesh_mpi_settings(env)}
        for pml, env in pmls.items()
        for settings in ("as is", "rankmesh's settings")
    }
    raw_before = {variant: raw_mpi(args, env) for variant, env in variants.items()}
    rows = [
        ("rankmesh, MPI job (ob1), linked", "ob1", rankmesh_job(args, "mpi", {})),
        ("rankmesh, MPI job (UCX PML), linked", "ucx", rankmesh_job(args, "mpi", UCX_ENV)),
        ("rankmesh, over MPI (ob1)", "ob1", rankmesh_job(args, "mpi", {}, links=False)),
        ("rankmesh, over MPI (UCX PML)", "ucx", rankmesh_job(args, "mpi", UCX_ENV, links=False)),
        ("rankmesh, TCP, linked", "ob1", rankmesh_job(args, "tcp", {})),
        ("rankmesh, over TCP", "ob1", rankmesh_job(args, "tcp", {}, links=False)),
    ]
    if not args.skip_dask:
        rows.append(("dask distributed, TCP", "ob1", dask_cluster(args)))
    # The best of a ping-pong before and one after: on a shared machine that keeps a slow
    # moment from flattering the ratios.
    raw_after = {variant: raw_mpi(args, env) for variant, env in variants.items()}
    raw = {
        variant: max(raw_before[variant], raw_after[variant], key=lambda r: r["one_gbs"])
        if raw_before[variant]
        else None
        for variant in variants
    }
    ceilings = {
        pml: max((r["one_gbs"] for (p, _), r in raw.items() if p == pml and r), default=None)
        for pml in pmls
    }

    print(
        f"worker -> worker transfer, {args.size_mib} MiB arrays; one at a time: median of "
        f"{args.count * args.reps}; all at once: {args.count} arrays, median of {args.reps}"
    )
    print(f"load average at start {load_start}, at end {os.getloadavg()}; {shared_memory()}")
    print(
        f"{'':44}{'one: s':>9}{'GB/s':>7}{'x raw':>7}{'all: GB/s':>11}{'x raw':>7}"
        f"{'cold GB/s':>11}{'x raw':>7}"
    )
    for (pml, settings), result in raw.items():
        if result is not None:
            label = f"raw MPI ping-pong ({pml}, {settings})"
            ratio = result["one_gbs"] / ceilings[pml]
            print(f"{label:44}{result['one_s']:9.4f}{result['one_gbs']:7.2f}{ratio:7.2f}")
    for label, pml, result in rows:
        ceiling = ceilings[pml]

        def ratio(gbs: float, ceiling: float | None = ceiling) -> str:
            return f"{gbs / ceiling:7.2f}" if ceiling else "      -"

        print(
            f"{label:44}{result['one_s']:9.4f}{result['one_gbs']:7.2f}{ratio(result['one_gbs'])}"
            f"{result['all_gbs']:11.2f}{ratio(result['all_gbs'])}"
            f"{result['all_cold_gbs']:11.2f}{ratio(result['all_cold_gbs'])}"
        )
    if not any(raw.values()):
        print("raw MPI skipped: mpi4py is not installed (pip install -r bench/requirements.txt)")
    if args.json:
        record = {
            "bench": "transfer",
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "load": [load_start, os.getloadavg()],
            "raw": {f"{pml}, {settings}": r for (pml, settings), r in raw.items()},
            "rows": {label: result for label, _, result in rows},
        }
        with open(args.json, "a") as file:
            file.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
