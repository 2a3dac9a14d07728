"""Work that survives losing a part of the cluster: an executor killed in the middle of a
graph is replaced and its tasks rerun, with results equal to Dask's threaded scheduler."""

import glob
import os
import random
import re
import signal
import time

import dask
import numpy as np
import psutil
import rankmesh
from conftest import cluster_processes


def produce(i):
    time.sleep(0.002)
    return np.full(20_000, float(i))  # 160 kB: written to shared memory by the executor


def combine(a, b):
    time.sleep(0.002)
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
        # The replacements work, and nothing of their predecessors' files is left behind.
        assert client.compute(graph(), sync=True) == expected
        for folder in worker_folders(cluster):
            generations = {}
            for name in os.listdir(folder):
                if match := re.match(r"(\d+)\.(\d+)", name):
                    generations.setdefault(match[1], set()).add(match[2])
            assert all(len(g) == 1 for g in generations.values()), (folder, generations)


def worker_folders(cluster) -> list[str]:
    workers = [p.pid for p in cluster_processes(cluster) if p.name() == "rankmesh"]
    folders = [f for pid in workers for f in glob.glob(f"/dev/shm/rankmesh-{pid}-*")]
    assert len(folders) == 2
    return folders
