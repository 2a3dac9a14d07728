"""Work that survives losing a part of the cluster: an executor or a whole worker killed in
the middle of a graph is replaced, its tasks rerun and its lost results recomputed from their
lineage, with results equal to Dask's threaded scheduler; a task that kills every worker it
runs on fails with KilledWorker, and the cluster goes on."""

import glob
import os
import random
import re
import signal
import time

import dask
import numpy as np
import psutil
import pytest
import rankmesh
from conftest import cluster_processes, cluster_workers


def produce(i):
    # 1,000 of these sleep 5 s in all: at least 1.7 s on three one-thread workers however
    # fast the machine, so a kill 0.3-1.2 s in lands in the middle (at 1 ms a fast VM
    # finished the graph first).
    time.sleep(0.005)
    return np.full(20_000, float(i))  # 160 kB: kept by the executor, not written


def combine(a, b):
    time.sleep(0.001)
    return a + b


def graph(n=1000):
    """2,000 tasks: 1,000 producers, then a reduction tree over them."""
    layer = [dask.delayed(produce)(i) for i in range(n)]
    while len(layer) > 1:
        pairs = [layer[i : i + 2] for i in range(0, len(layer), 2)]
        layer = [dask.delayed(combine)(*p) if len(p) == 2 else p[0] for p in pairs]
    return dask.delayed(np.sum)(layer[0])


def executors(cluster) -> list[psutil.Process]:
    return [p for p in cluster_processes(cluster) if p.name() != "rankmesh"]


def wait_for_workers(client, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) != n:
        assert time.monotonic() < deadline, client.scheduler_info()
        time.sleep(0.05)


def test_an_executor_killed_in_the_middle_of_a_graph_costs_nothing_but_time():
    expected = graph().compute(scheduler="threads")
    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        rng = random.Random(7)
        for attempt in range(10):
            future = client.compute(graph())
            time.sleep(rng.uniform(0.3, 1.2))
            victim = rng.choice(executors(cluster))
            os.kill(victim.pid, signal.SIGKILL)
            assert future.result(timeout=300) == expected, f"attempt {attempt}"
            del future
        # Each killed executor took the results it kept with it: computed again.
        assert client.scheduler_info()["recomputed_tasks"] > 0
        # The replacements work, and nothing of their predecessors' files is left behind.
        assert client.compute(graph(), sync=True) == expected
        for folder in worker_folders(cluster):
            generations = {}
            for name in os.listdir(folder):
                if match := re.match(r"(\d+)\.(\d+)", name):
                    generations.setdefault(match[1], set()).add(match[2])
            assert all(len(g) == 1 for g in generations.values()), (folder, generations)


def worker_folders(cluster) -> list[str]:
    workers = [p.pid for p in cluster_workers(cluster)]
    folders = [f for pid in workers for f in glob.glob(f"/dev/shm/rankmesh-{pid}-*")]
    assert len(folders) == 2
    return folders


def test_a_worker_killed_in_the_middle_of_a_graph_costs_nothing_but_time():
    expected = graph().compute(scheduler="threads")
    with rankmesh.LocalCluster(n_workers=3) as cluster, rankmesh.Client(cluster) as client:
        rng = random.Random(11)
        for attempt in range(10):
            wait_for_workers(client, 3)
            future = client.compute(graph())
            time.sleep(rng.uniform(0.3, 1.2))
            assert future.status == "pending", "the kill must land in the middle"
            os.kill(rng.choice(cluster_workers(cluster)).pid, signal.SIGKILL)
            assert future.result(timeout=300) == expected, f"attempt {attempt}"
            del future
        # The dead workers were replaced, and the replacements work.
        wait_for_workers(client, 3)
        assert client.compute(graph(), sync=True) == expected


def kill_my_worker():
    import os
    import signal

    os.kill(os.getppid(), signal.SIGKILL)  # the executor's parent is its worker


def test_a_task_that_kills_its_workers_fails_with_killed_worker_and_the_cluster_goes_on():
    with rankmesh.LocalCluster(n_workers=3) as cluster, rankmesh.Client(cluster) as client:
        wait_for_workers(client, 3)
        with pytest.raises(rankmesh.KilledWorker, match="allowed_failures = 3") as info:
            client.submit(kill_my_worker).result(timeout=120)
        named = set(re.findall(r"worker (\d+) \(", info.value.message))
        assert len(named) == 3, info.value.message
        wait_for_workers(client, 3)
        assert client.submit(sum, range(10)).result(timeout=60) == 45
        assert client.compute(graph(100), sync=True) == graph(100).compute(scheduler="threads")


def note_worker_then_sleep(path):
    with open(path, "a") as f:
        f.write(f"{os.getppid()}\n")  # the executor's parent is its worker
    time.sleep(2)
    return "done"


def test_workers_stopped_on_purpose_count_nothing_against_a_task(tmp_path):
    """SIGTERM (what a batch system's scancel sends) is a planned departure: with
    allowed_failures=1 a single death would fail the task, three SIGTERMs do not."""
    log = tmp_path / "workers"
    with (
        rankmesh.LocalCluster(n_workers=2, allowed_failures=1) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        future = client.submit(note_worker_then_sleep, str(log))
        stopped = []
        for attempt in range(3):
            deadline = time.monotonic() + 60
            while len(runs := log.read_text().split() if log.exists() else []) <= attempt:
                assert time.monotonic() < deadline, runs
                time.sleep(0.02)
            stopped.append(int(runs[-1]))
            os.kill(stopped[-1], signal.SIGTERM)
        assert future.result(timeout=60) == "done"
        assert len(set(stopped)) == 3, stopped


def test_scattered_data_lost_with_every_worker_is_placed_again():
    """Unlike `distributed` (FutureLost), rankmesh keeps what was scattered at the
    scheduler, so data lost with its workers is placed again and what used it recomputed."""
    arrays = [np.full(50_000, float(i)) for i in range(20)]  # 400 kB each: shared memory
    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        wait_for_workers(client, 2)
        scattered = client.scatter(arrays)
        sums = client.map(np.sum, scattered)
        assert client.gather(sums) == [a.sum() for a in arrays]
        for worker in cluster_workers(cluster):
            os.kill(worker.pid, signal.SIGKILL)
        back = client.gather(scattered, timeout=120)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
        assert client.gather(sums, timeout=120) == [a.sum() for a in arrays]
        assert client.scheduler_info()["recomputed_tasks"] >= len(arrays)
