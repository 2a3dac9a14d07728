"""Topology-aware workers: `rankmesh topology` prints the plan, worker ranks under mpirun
bind to it (read back inside tasks from /proc/self/status), and tasks run where their
inputs are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rankmesh
from rankmesh.cluster import find_binary
from test_mpi_run import MPIRUN, job_tag, write  # noqa: F401 (job_tag: autouse fixture)

BINARY = find_binary()
DATA = Path(__file__).resolve().parents[1] / "data" / "topology"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="Open MPI's mpirun is not installed")


def topology(*args):
    return subprocess.run(
        [BINARY, "topology", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def planned(*args):
    """`rankmesh topology` output as {worker index: (threads, numa, gpus, cpus, shared)}."""
    result = topology(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    plan = {}
    for line in lines[header + 1 :]:
        fields = line.split()
        if not fields[0].isdigit():
            break
        rank, threads, numa, gpus, cpus = fields[:5]
        plan[int(rank)] = (int(threads), numa, gpus, cpus, "(shared)" in line)
    return plan


def test_prints_the_plan_of_a_saved_128_core_node():
    plan = planned("--xml", DATA / "synthetic-2pack-8numa-128core.xml", "--ranks-per-node", 2)
    assert plan == {
        0: (64, "0,1,2,3", "-", "0-127", False),
        1: (64, "4,5,6,7", "-", "128-255", False),
    }
    # One per NUMA node when no rank count is given.
    assert len(planned("--xml", DATA / "synthetic-2pack-8numa-128core.xml")) == 8


def test_gpu_plan_gives_each_rank_the_gpus_near_its_cores():
    plan = planned("--xml", DATA / "power8-4gpu.xml", "--worker-per", "gpu")
    # hwloc's saved POWER8 keeps 4 cores per package, with 2 GPUs behind each package.
    assert plan == {
        0: (2, "0", "cuda:0", "0-1,8-9", False),
        1: (2, "0", "cuda:1", "16-17,24-25", False),
        2: (2, "1", "cuda:2", "80-81,88-89", False),
        3: (2, "1", "cuda:3", "96-97,104-105", False),
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--xml", "/nonexistent/node.xml"], "cannot read the topology of /nonexistent/node.xml"),
        (["--ranks-per-node", "0"], "0 is not in 1.."),
        (
            ["--worker-per", "gpu", "--xml", DATA / "synthetic-2pack-8numa-128core.xml"],
            "no NVIDIA or AMD GPU",
        ),
        (["--worker-per", "rack"], "invalid value 'rack'"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, tmp_path):
    result = topology(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_no_bind_and_a_placement_mode_conflict():
    result = subprocess.run(
        [BINARY, "run", "--no-bind", "--worker-per", "core", "script.py"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "'--no-bind' cannot be used with '--worker-per <WORKER_PER>'" in result.stderr


def test_an_xml_that_is_not_a_topology_is_refused(tmp_path):
    bad = write(tmp_path, "bad.xml", "<html>not a topology</html>")
    result = topology("--xml", bad)
    assert result.returncode != 0
    assert f"cannot read the topology of {bad}" in result.stderr


PROBE = """
import json, os, sys, time
import rankmesh

def probe(i):
    time.sleep(0.2)  # long enough that every worker gets some of the tasks
    status = open("/proc/self/status").read().splitlines()
    cpus = next(line.split()[1] for line in status if line.startswith("Cpus_allowed_list"))
    threads = {v: os.environ.get(v) for v in %(vars)r}
    return int(os.environ["OMPI_COMM_WORLD_RANK"]), rankmesh.get_worker().id, cpus, threads

with rankmesh.Client() as client:
    seen = client.gather(client.map(probe, range(%(tasks)d)))
    reported = {w["id"]: w["topology"] for w in client.workers()}
json.dump({"seen": seen, "reported": reported}, open(sys.argv[1], "w"))
"""


def run_probe(tmp_path, n, *run_args, mpirun_args=("--bind-to", "none"), tasks=24):
    script = write(tmp_path, "probe.py", PROBE % {"vars": THREAD_VARS, "tasks": tasks})
    out = tmp_path / "seen.json"
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", *mpirun_args, "-n", str(n)]
    command += [BINARY, "run", "--python", sys.executable, *map(str, run_args), script, out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())
    by_rank = {}
    for rank, worker, cpus, threads in record["seen"]:
        by_rank.setdefault(rank, set()).add((worker, cpus, tuple(sorted(threads.items()))))
    assert sorted(by_rank) == list(range(1, n)), "every worker rank ran tasks"
    for rank, seen in by_rank.items():
        assert len(seen) == 1, f"rank {rank}'s executors disagree: {seen}"
    seen = {rank: seen.pop() for rank, seen in by_rank.items()}
    for worker, cpus, _ in seen.values():
        reported = record["reported"][str(worker)]
        if reported is not None:  # placed workers report what the tasks saw
            assert reported["cpus"] == cpus
            assert reported["cores"] == physical_cores(cpus)
            assert reported["numa_nodes"] == [0] and reported["numa_memory"] > 0
    return seen, result.stderr


def thread_env(value):
    return tuple(sorted((v, str(value)) for v in THREAD_VARS))


def cores_of(cpus):
    """CPU numbers of a kernel list such as `0-3,8`."""
    numbers = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def physical_cores(cpus):
    """How many distinct cores the CPUs of a kernel list belong to (from sysfs)."""
    topology = "/sys/devices/system/cpu/cpu{}/topology/{}"
    cores = set()
    for cpu in cores_of(cpus):
        ids = (open(topology.format(cpu, key)).read() for key in ("physical_package_id", "core_id"))
        cores.add(tuple(ids))
    return len(cores)


@needs_mpirun
def test_four_ranks_bind_to_the_numa_plan(tmp_path):
    # 3 workers: on a 2-core machine they share a core; each still matches its plan.
    plan = planned("--ranks-per-node", 3)
    seen, _ = run_probe(tmp_path, 4)
    for rank, (_, cpus, threads) in seen.items():
        assert cpus == plan[rank - 1][3], f"rank {rank}"
        assert threads == thread_env(1), "one executor per core, one thread each"
    assert len({worker for worker, _, _ in seen.values()}) == 3


@needs_mpirun
def test_ranks_never_share_a_core_when_cores_suffice(tmp_path):
    plan = planned("--ranks-per-node", 2, "--worker-per", "core")
    seen, _ = run_probe(tmp_path, 3, "--worker-per", "core")
    cpus = [cores_of(seen[rank][1]) for rank in (1, 2)]
    assert [seen[rank][1] for rank in (1, 2)] == [plan[0][3], plan[1][3]]
    assert not cpus[0] & cpus[1], f"ranks share a core: {cpus}"


@needs_mpirun
def test_a_worker_with_one_executor_gives_it_every_core_of_its_place(tmp_path):
    plan = planned("--ranks-per-node", 1, "--worker-per", "node")
    seen, _ = run_probe(tmp_path, 2, "--worker-per", "node", "--threads-per-worker", 1, tasks=4)
    _, cpus, threads = seen[1]
    assert cpus == plan[0][3]
    assert threads == thread_env(plan[0][0])


@needs_mpirun
def test_a_launchers_binding_is_kept_with_a_warning(tmp_path):
    # mpirun binds 2 ranks to a core each; the plan wants the whole node for the worker.
    whole_node = planned("--ranks-per-node", 1, "--worker-per", "node")[0][3]
    seen, stderr = run_probe(
        tmp_path, 2, "--worker-per", "node", mpirun_args=("--bind-to", "core"), tasks=4
    )
    _, cpus, _ = seen[1]
    if cpus == whole_node:
        pytest.skip("mpirun did not bind (a 1-core machine?)")
    assert len(cores_of(cpus)) < len(cores_of(whole_node))
    assert "keeping the launcher's binding" in stderr


@needs_mpirun
def test_unbound_workers_keep_the_whole_node(tmp_path):
    whole_node = planned("--ranks-per-node", 1, "--worker-per", "node")[0][3]
    seen, _ = run_probe(tmp_path, 3, "--no-bind", tasks=8)
    assert {cpus for _, cpus, _ in seen.values()} == {whole_node}


@needs_mpirun
def test_worker_data_on_one_node_goes_through_mpis_shared_memory(tmp_path, monkeypatch):
    # Only Open MPI's self and shared-memory (vader) transports are allowed, so a 32 MB
    # array can move between the two worker ranks only through shared memory (sent over
    # MPI as between nodes: by default ranks on one node link each other's files).
    monkeypatch.setenv("OMPI_MCA_btl", "self,vader")
    monkeypatch.setenv("RANKMESH_LOG", "rankmesh::transport=debug")
    script = write(
        tmp_path,
        "across.py",
        "import numpy as np, rankmesh\n"
        "with rankmesh.Client() as client:\n"
        "    first, second = client.workers()\n"
        "    made = client.submit(np.full, 4_000_000, 2.0, workers=first['id'])\n"
        "    total = client.submit(lambda x: float(x.sum()), made, workers=second['id'])\n"
        "    assert total.result(timeout=60) == 8_000_000.0\n",
    )
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "3"]
    command += [BINARY, "run", "--transport", "mpi", "--no-same-node-links"]
    command += ["--python", sys.executable, script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker data goes over TCP" not in result.stderr, "MPI must carry it"
    assert "fetched over MPI" in result.stderr


def make(i):
    return rankmesh.get_worker().id, np.full(200_000, i)  # 1.6 MB: a shared-memory object


def where(made):
    return made[0], rankmesh.get_worker().id


def test_a_task_runs_where_its_input_is(client):
    inputs = client.map(make, range(100))
    holders = [worker for worker, _ in client.gather(inputs)]
    assert len(set(holders)) == 2, "inputs should sit on both workers"
    for made in inputs:
        holder, ran_on = client.submit(where, made).result()
        assert ran_on == holder


def test_get_worker_outside_a_task_says_so(monkeypatch):
    monkeypatch.delenv("RANKMESH_WORKER_ID", raising=False)
    with pytest.raises(ValueError, match="only inside a task"):
        rankmesh.get_worker()


@needs_mpirun
def test_gpu_workers_without_gpus_get_a_clear_error(tmp_path):
    script = write(tmp_path, "noop.py", "print('never runs')\n")
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "2"]
    command += [BINARY, "run", "--python", sys.executable, "--worker-per", "gpu", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--worker-per gpu, but the topology has no NVIDIA or AMD GPU" in result.stderr
    assert "never runs" not in result.stdout


def host_takes_free_memory_back():
    """Whether a virtio balloon here reports free pages to its host (its feature bit 5)."""
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            kind = (device / "device").read_text().strip()
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if kind == "0x0005" and features[5:6] == "1":
            return True
    return False


def numpy_huge_page_advice():
    import numpy

    return os.environ.get("NUMPY_MADVISE_HUGEPAGE"), numpy._core.multiarray._get_madvise_hugepage()


def test_executors_ask_numpy_for_small_pages_only_where_the_host_takes_memory_back(
    client, monkeypatch
):
    variable, advised = client.submit(numpy_huge_page_advice, pure=False).result()
    if host_takes_free_memory_back():
        assert (variable, advised) == ("0", False)
    else:
        assert variable is None
    # A value the user set is kept.
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    with rankmesh.LocalCluster(n_workers=1, dashboard_address=None) as cluster:
        with rankmesh.Client(cluster) as chosen:
            assert chosen.submit(numpy_huge_page_advice).result() == ("1", True)


def transparent_huge_pages_mode():
    """The system's THP mode: "always", "madvise" or "never" (None where it has none)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def heap_on_huge_pages():
    """This process's GLIBC_TUNABLES, and whether its malloc heap holds huge pages once 64
    MiB of 1 MiB blocks are on it (in an executor they come from the heap: its mmap
    threshold is half its kept heap)."""
    blocks = [bytearray(b"x" * (1 << 20)) for _ in range(64)]
    huge_kb = 0
    in_heap = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0]:  # a mapping's first line: its range, ..., its name
            in_heap = fields[-1] == "[heap]"
        elif in_heap and fields[0] == "AnonHugePages:":
            huge_kb += int(fields[1])
    del blocks
    return os.environ.get("GLIBC_TUNABLES"), huge_kb > 0


def tunables_and_heap_in_a_cluster(monkeypatch, tunables):
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    with rankmesh.LocalCluster(n_workers=1, dashboard_address=None) as cluster:
        with rankmesh.Client(cluster) as client:
            return client.submit(heap_on_huge_pages).result()


def test_executors_heap_is_on_huge_pages_except_where_the_host_takes_memory_back(
    client, monkeypatch
):
    mode = transparent_huge_pages_mode()
    madvise = mode == "madvise"
    tunables, on_huge_pages = client.submit(heap_on_huge_pages, pure=False).result()
    if host_takes_free_memory_back():
        assert tunables is None
        assert not (madvise and on_huge_pages)
        # The user may ask for them all the same; their tunables pass on as they are.
        tunables, on_huge_pages = tunables_and_heap_in_a_cluster(
            monkeypatch, "glibc.malloc.hugetlb=1"
        )
        assert tunables == "glibc.malloc.hugetlb=1"
        assert on_huge_pages or mode not in ("madvise", "always")
        tunables, _ = tunables_and_heap_in_a_cluster(monkeypatch, "glibc.malloc.arena_max=4")
        assert tunables == "glibc.malloc.arena_max=4"
    else:
        assert tunables == "glibc.malloc.hugetlb=1"
        assert on_huge_pages or mode not in ("madvise", "always")
        # The user's own choice of that tunable wins; their other tunables stay.
        tunables, on_huge_pages = tunables_and_heap_in_a_cluster(
            monkeypatch, "glibc.malloc.hugetlb=0"
        )
        assert tunables == "glibc.malloc.hugetlb=0"
        assert not (madvise and on_huge_pages)
        tunables, _ = tunables_and_heap_in_a_cluster(monkeypatch, "glibc.malloc.arena_max=4")
        assert tunables == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
