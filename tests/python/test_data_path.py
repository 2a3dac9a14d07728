"""Large results live in shared memory: written once by the producing executor, read in
place by consumers on the same worker and after a network fetch, freed when released."""

import glob
import os
import time

import numpy as np
import rankmesh


def make(i):
    return np.full(1_000_000, float(i))


def backing_objects(*arrays):
    """What each array's memory ultimately belongs to, and whether it is writable."""
    found = []
    for array in arrays:
        owner = array
        while getattr(owner, "base", None) is not None:
            owner = owner.base
        if isinstance(owner, memoryview):
            owner = owner.obj
        found.append((type(owner).__name__, bool(array.flags.writeable)))
    return found


def shm_files(worker_pids):
    return [f for pid in worker_pids for f in glob.glob(f"/dev/shm/rankmesh-{pid}-*/*")]


def test_large_inputs_are_mapped_not_copied_and_freed_on_release():
    from conftest import cluster_processes

    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        worker_pids = [p.pid for p in cluster_processes(cluster) if p.name() == "rankmesh"][1:]
        parts = client.map(make, range(6))
        # Six 8 MB inputs spread over both workers: some arrive over the network.
        assert client.submit(backing_objects, *parts).result(timeout=60) == [("mmap", True)] * 6
        gathered = client.gather(parts)
        np.testing.assert_array_equal(gathered[3], np.full(1_000_000, 3.0))
        assert gathered[0].flags.writeable
        assert len(shm_files(worker_pids)) >= 6
        del parts
        client.submit(len, "flush releases").result(timeout=60)
        deadline = time.monotonic() + 10
        while shm_files(worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm_files(worker_pids) == []
    for pid in worker_pids:
        assert not glob.glob(f"/dev/shm/rankmesh-{pid}-*"), "shared-memory folder left behind"
        assert not os.path.exists(f"/proc/{pid}")
