"""`mpirun -n N rankmesh run script.py`: rank 0 hosts the scheduler and the script, the
other ranks are workers; the job's exit code is the script's and no process outlives it."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from browser import read_report
from rankmesh.cluster import find_binary

# Open MPI's mpirun by default; scripts/check-mpich.sh runs these tests again under MPICH's
# Hydra with a build against MPICH (RANKMESH_TEST_MPI=mpich, RANKMESH_BINARY=that build).
if os.environ.get("RANKMESH_TEST_MPI") == "mpich":
    MPIRUN = shutil.which("mpiexec.mpich")
    LAUNCHER_FLAGS = ["-bind-to", "none"]
else:
    MPIRUN = shutil.which("mpirun")
    LAUNCHER_FLAGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="the MPI launcher is not installed")
BINARY = find_binary()
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


TRANSPORTS = pytest.mark.parametrize("transport", ["mpi", "tcp"])


# Every process a test starts carries this in its environment (ranks inherit mpirun's),
# so leftovers are found without mistaking other jobs on the machine for them.
JOB_TAG = "RANKMESH_TEST_JOB"


@pytest.fixture(autouse=True)
def job_tag(monkeypatch):
    tag = uuid.uuid4().hex
    monkeypatch.setenv(JOB_TAG, tag)
    yield tag
    assert_nothing_left(tag)


def mpirun(n, script, *args, transport="mpi", timeout=120, env=None, flags=(), **popen):
    command = [MPIRUN, *LAUNCHER_FLAGS, "-n", str(n), BINARY, "run", *flags]
    command += ["--transport", transport, "--python", sys.executable]
    command += [str(script), *map(str, args)]
    if popen:
        return subprocess.Popen(command, text=True, env=env, **popen)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def job_processes(tag):
    """This test's processes besides pytest itself."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(JOB_TAG) == tag:
                found.append(process)
        except psutil.Error:
            pass  # gone meanwhile, or not ours to read
    return found


def assert_nothing_left(tag, timeout=15):
    deadline = time.monotonic() + timeout
    while job_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job_processes(tag) == [], "processes outlived the job"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@TRANSPORTS
def test_xarray_pipeline_under_mpirun_matches_threads(tmp_path, transport):
    script = write(
        tmp_path,
        "pipeline.py",
        "import sys, dask, numpy as np\n"
        f"sys.path.insert(0, {os.path.abspath(EXAMPLES)!r})\n"
        "from xarray_anomaly import anomaly_pipeline, synthetic_dataset\n"
        "assert type(dask.config.get('scheduler').__self__).__module__ == 'rankmesh.client'\n"
        "ds = synthetic_dataset(days=400, chunk_days=100, seed=4)\n"
        "ours = anomaly_pipeline(ds).compute()  # the job's cluster is the default\n"
        "theirs = anomaly_pipeline(ds).compute(scheduler='threads')\n"
        "scale = float(np.abs(theirs.values).max())\n"
        "diff = float(np.abs(ours.values - theirs.values).max())\n"
        "print('scale', scale, 'diff', diff)\n"
        "sys.exit(0 if scale > 1e-3 and diff <= 1e-6 * scale else 1)\n",
    )
    result = mpirun(4, script, transport=transport)
    assert result.returncode == 0, result.stdout + result.stderr


@TRANSPORTS
def test_script_exit_code_is_the_jobs(tmp_path, transport):
    script = write(tmp_path, "exit3.py", "import sys\nsys.exit(3)\n")
    result = mpirun(4, script, transport=transport)
    assert result.returncode == 3, result.stderr


def test_the_script_runs_once_every_worker_rank_has_registered(tmp_path):
    # Its interpreter starts early (imports overlap the workers' start); its code does not.
    script = write(
        tmp_path, "first.py", "import rankmesh\nprint(len(rankmesh.Client().workers()))\n"
    )
    result = mpirun(4, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3"]


def test_more_ranks_than_cores_start_compute_and_leave_nothing(tmp_path):
    # Issue 19: a job oversubscribed many times over (16 ranks; the test VM has 2 cores).
    ranks = 16
    script = write(
        tmp_path,
        "many.py",
        "import json, os, dask.array as da, rankmesh\n"
        "client = rankmesh.Client()\n"
        "squares = client.gather(client.map(lambda i: i * i, range(1000)))\n"
        "x = (da.arange(200_000, chunks=1_000) % 7) ** 2  # 200 chunks over the workers\n"
        "print(json.dumps({\n"
        "    'workers': client.workers(),\n"
        "    'squares': squares,\n"
        "    'sum': int(x.sum().compute()),\n"
        "    'sum_threads': int(x.sum().compute(scheduler='threads')),\n"
        "    'scheduler_file': os.environ['RANKMESH_SCHEDULER_FILE'],\n"
        "}))\n",
    )
    result = mpirun(ranks, script, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert sorted(w["rank"] for w in seen["workers"]) == list(range(1, ranks))
    assert seen["squares"] == [i * i for i in range(1000)]
    assert seen["sum"] == seen["sum_threads"] == sum((i % 7) ** 2 for i in range(200_000))
    # Every rank of the node computes the same placement: one of them says it is shared.
    assert result.stderr.count("more worker ranks than cores") <= 1, result.stderr
    # Processes: the job_tag fixture. Files: the scheduler file's folder, and each worker
    # rank's shared-memory folder (named after its pid).
    assert not os.path.exists(os.path.dirname(seen["scheduler_file"]))
    pids = [w["pid"] for w in seen["workers"]]
    assert [f for pid in pids for f in glob.glob(f"/dev/shm/rankmesh-{pid}-*")] == []


def test_the_report_of_a_job_shows_every_worker_in_a_browser(tmp_path):
    script = write(
        tmp_path,
        "job.py",
        "import dask.array as da, rankmesh\n"
        "client = rankmesh.Client()\n"
        "x = da.random.random((2000, 2000), chunks=200) + 1\n"
        "print(float(x.mean().compute()) > 1)\n",
    )
    report = tmp_path / "job.html"
    result = mpirun(4, script, flags=("--report", str(report)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
    seen = read_report(report, tmp_path / "report.png")
    assert seen["errors"] == []
    assert sorted(seen["workers"]) == ["1", "2", "3"], seen  # ranks 1-3
    assert seen["lines"] == 3 and seen["bars"] >= 100, seen
    # The reduction moved chunks between worker ranks, over MPI.
    assert " over mpi" in seen["moved"] and ": 0 B" not in seen["moved"], seen["moved"]
    assert "transfer" in seen["stream_legend"], seen["stream_legend"]


@TRANSPORTS
def test_script_exception_shows_its_traceback(tmp_path, transport):
    script = write(
        tmp_path, "fail.py", "def analysis():\n    raise ValueError('bad input')\nanalysis()\n"
    )
    result = mpirun(4, script, transport=transport)
    assert result.returncode != 0
    assert "ValueError: bad input" in result.stderr and "analysis" in result.stderr


def test_outside_mpi_it_says_how_to_launch():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
    result = subprocess.run(
        [BINARY, "run", "script.py"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 1
    assert "mpirun -n N rankmesh run" in result.stderr


@TRANSPORTS
def test_sigterm_to_mpirun_stops_every_rank(tmp_path, transport):
    script = write(
        tmp_path,
        "wait.py",
        "import time\nprint('started', flush=True)\ntime.sleep(120)\n",
    )
    job = mpirun(4, script, transport=transport, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout.readline().strip() == "started"
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=30)  # every rank gone: the job_tag fixture checks
    if os.environ.get("RANKMESH_TEST_MPI") != "mpich":
        # Hydra's mpiexec, killed, exits 0 whatever its ranks did (seen with MPICH 4.0).
        assert job.returncode != 0


def rank_of(process):
    """The MPI rank of a launched process, as Open MPI or Hydra (PMI) tells it."""
    env = process.environ()
    return env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK"))


def start_long_job(tmp_path, job_tag, transport="mpi"):
    """A 4-rank job busy with tasks for a while; returns it and its worker rank 2."""
    script = write(
        tmp_path,
        "long.py",
        "import time, rankmesh\n"
        "client = rankmesh.Client()\n"
        "print('started', flush=True)\n"
        "client.gather(client.map(time.sleep, [0.5] * 200))\n",
    )
    job = mpirun(4, script, transport=transport, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout.readline().strip() == "started"
    victim = next(p for p in job_processes(job_tag) if p.name() == "rankmesh" and rank_of(p) == "2")
    return job, victim


@TRANSPORTS
def test_a_killed_worker_rank_ends_the_job_with_a_clear_error(tmp_path, transport, job_tag):
    job, victim = start_long_job(tmp_path, job_tag, transport)
    started = time.monotonic()
    victim.kill()
    out, err = job.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert job.returncode != 0
    # Rank 0 names the lost rank and host, unless the launcher ended the job first with
    # its own report (mpirun: "... exited on signal 9 (Killed)"; Hydra, on stdout:
    # "... Killed (signal 9)").
    ours = f"worker rank 2 on {socket.gethostname()}"
    assert ours in err or "signal 9" in out + err, out + err


def test_a_worker_rank_that_leaves_cleanly_still_ends_the_job(tmp_path, job_tag):
    # SIGTERM to one rank only: it exits on its own terms, so the launcher sees no crash;
    # rank 0 notices and ends the job rather than let the script run without it.
    job, victim = start_long_job(tmp_path, job_tag)
    victim.terminate()
    out, err = job.communicate(timeout=60)
    assert job.returncode != 0
    assert f"worker rank 2 on {socket.gethostname()} (pid {victim.pid}) left" in err, out + err


def test_a_stuck_worker_rank_cannot_hold_the_job_at_exit(tmp_path, job_tag):
    # A rank that never reaches MPI_Finalize (stopped here; in life a driver or a dead file
    # system) would keep every other rank waiting in it: they give up after a deadline.
    script = write(
        tmp_path,
        "short.py",
        "import time, rankmesh\n"
        "client = rankmesh.Client()\n"
        "print('started', flush=True)\n"
        "time.sleep(2)\n",
    )
    job = mpirun(3, script, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout.readline().strip() == "started"
    ranks = {rank_of(p): p for p in job_processes(job_tag) if p.name() == "rankmesh"}
    ranks["2"].suspend()
    started = time.monotonic()
    # The others wait without taking the cores (Open MPI's own wait in MPI_Finalize would:
    # on more ranks than cores, those still stopping got slower, the more ranks were done).
    time.sleep(8)  # the script ends after 2 s; rank 0 waits after the scheduler, 3-8 s
    before = {rank: cpu_seconds(ranks[rank]) for rank in ["0", "1"]}
    time.sleep(5)
    used = {rank: cpu_seconds(ranks[rank]) - before[rank] for rank in ["0", "1"]}
    assert all(seconds < 0.25 for seconds in used.values()), used  # 10-15% of a core before
    out, err = job.communicate(timeout=90)
    assert time.monotonic() - started < 60
    assert job.returncode != 0
    assert "MPI_Finalize did not return" in err, out + err


def cpu_seconds(process):
    times = process.cpu_times()
    return times.user + times.system


def test_initialize_keeps_dask_mpi_habits(tmp_path):
    script = write(
        tmp_path,
        "habit.py",
        "import sys, dask, dask.array as da, rankmesh\n"
        "rankmesh.initialize()\n"
        "default = type(dask.config.get('scheduler').__self__).__module__\n"
        "print('total', int(da.arange(1000, chunks=100).sum().compute()), default)\n"
        "sys.exit(int(sys.argv[1]))\n",
    )
    command = [MPIRUN, *LAUNCHER_FLAGS, "-n", "3"]
    env = dict(os.environ, PATH=f"{os.path.dirname(BINARY)}:{os.environ['PATH']}")
    result = subprocess.run(
        [*command, sys.executable, str(script), "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 4, result.stderr
    assert result.stdout.count(f"total {sum(range(1000))} rankmesh.client") == 1


def test_serve_keeps_a_cluster_for_external_clients(tmp_path):
    import rankmesh

    scheduler_file = tmp_path / "scheduler.json"
    command = [MPIRUN, *LAUNCHER_FLAGS, "-n", "3"]
    command += [BINARY, "run", "--python", sys.executable, "--serve"]
    job = subprocess.Popen([*command, "--scheduler-file", str(scheduler_file)], text=True)
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert scheduler_file.stat().st_mode & 0o777 == 0o600
        for _ in range(2):  # clients come and go; the cluster stays
            with rankmesh.Client(scheduler_file=str(scheduler_file)) as client:
                assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
                assert len(client.workers()) == 2
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=30)


def test_serve_needs_a_scheduler_file():
    result = subprocess.run([BINARY, "run", "--serve"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--scheduler-file" in result.stderr


# Open MPI's UCX layer, as on InfiniBand clusters; without IB devices it needs every transport.
UCX_PML = {"OMPI_MCA_pml": "ucx", "OMPI_MCA_pml_ucx_tls": "any", "OMPI_MCA_pml_ucx_devices": "any"}

# Every worker rank of these tests is on one node, where ranks link each other's results
# by default: the tests of a transport's own data path send them over it, as between nodes.
NO_LINKS = ("--no-same-node-links",)
# The data path under test: MPI as between nodes, MPI with same-node links (the default
# of `rankmesh run`), TCP (which links too).
DATA_PATHS = pytest.mark.parametrize(
    ("transport", "flags"),
    [("mpi", NO_LINKS), ("mpi", ()), ("tcp", ())],
    ids=["mpi", "mpi-linked", "tcp"],
)
SAME_NODE = "fetched from a peer on this host"


@pytest.mark.parametrize(
    ("transport", "mca", "flags"),
    [("mpi", {}, NO_LINKS), ("mpi", UCX_PML, NO_LINKS), ("mpi", {}, ()), ("tcp", {}, ())],
    ids=["mpi", "ucx", "mpi-linked", "tcp"],
)
def test_large_arrays_move_between_worker_ranks(tmp_path, transport, mca, flags):
    if mca and os.environ.get("RANKMESH_TEST_MPI") == "mpich":
        pytest.skip("the UCX PML is Open MPI's")
    script = write(
        tmp_path,
        "arrays.py",
        "import numpy as np, rankmesh\n"
        "client = rankmesh.Client()\n"
        "a, b = client.workers()\n"
        "def make(i):\n"
        "    return np.arange(4_000_000, dtype=np.float64) * (i + 1)\n"
        "def checksum(*arrays):\n"
        "    return [float(x[-1]) for x in arrays]\n"
        "# Six 32 MB results on rank 1, all needed by one task on rank 2: all of them cross.\n"
        "parts = client.map(make, range(6), workers=[a])\n"
        "print('last', client.submit(checksum, *parts, workers=[b]).result())\n"
        "print('ranks', sorted([a['rank'], b['rank']]))\n",
    )
    # An explicitly selected PML that cannot start aborts the job: passing proves it ran.
    env = {**os.environ, **mca, "RANKMESH_LOG": "rankmesh::transport=debug"}
    result = mpirun(3, script, transport=transport, env=env, flags=flags)
    assert result.returncode == 0, result.stderr
    expected = [3_999_999.0 * (i + 1) for i in range(6)]
    assert f"last {expected}" in result.stdout
    assert "ranks [1, 2]" in result.stdout
    # Which path the six arrays took: MPI's, or (all six) a copy straight from the
    # holder's executor or a link to its file.
    links = flags != NO_LINKS
    assert ("fetched over MPI" in result.stderr) == (transport == "mpi" and not links)
    counts = [
        line.split("received=")[1].split()[0]
        for line in result.stderr.splitlines()
        if SAME_NODE in line
    ]
    assert sum(map(int, counts)) == (6 if links else 0), result.stderr


@DATA_PATHS
def test_worker_ranks_fetch_from_each_other_at_once(tmp_path, transport, flags):
    # Both ranks ask and answer at the same time, many fetches in flight each way.
    script = write(
        tmp_path,
        "crossing.py",
        "import numpy as np, rankmesh\n"
        "client = rankmesh.Client()\n"
        "a, b = client.workers()\n"
        "def make(i):\n"
        "    return np.full(1_000_000, float(i))\n"
        "on_a = client.map(make, range(6), workers=[a])\n"
        "on_b = client.map(make, range(6, 12), workers=[b])\n"
        "rankmesh.wait(on_a + on_b)\n"
        "crossed = [client.submit(np.sum, x, workers=[b]) for x in on_a]\n"
        "crossed += [client.submit(np.sum, x, workers=[a]) for x in on_b]\n"
        "print('sums', [int(s) for s in client.gather(crossed)])\n",
    )
    result = mpirun(3, script, transport=transport, flags=flags)
    assert result.returncode == 0, result.stderr
    assert f"sums {[i * 1_000_000 for i in range(12)]}" in result.stdout


@TRANSPORTS
def test_a_received_arrays_memory_carries_the_next_one_of_its_size(tmp_path, transport):
    # Each array after the first lands in the shared memory the one before left, its old
    # bytes still there, and over MPI with no trip to allocate: only new bytes may show.
    script = write(
        tmp_path,
        "reuse.py",
        "import numpy as np, rankmesh\n"
        "client = rankmesh.Client()\n"
        "a, b = client.workers()\n"
        "def make(i):\n"
        "    return np.full(1_000_000, float(i))\n"
        "def spread(x):\n"
        "    return [float(x.min()), float(x.max())]\n"
        "seen = []\n"
        "for i in range(5):\n"
        "    x = client.submit(make, i, workers=[a])\n"
        "    seen.append(client.submit(spread, x, workers=[b]).result())\n"
        "    del x  # released with the next call, before the next array is fetched\n"
        "print('seen', seen)\n",
    )
    env = {**os.environ, "RANKMESH_LOG": "rankmesh::transport=debug"}
    result = mpirun(3, script, transport=transport, env=env, flags=NO_LINKS)
    assert result.returncode == 0, result.stderr
    assert f"seen {[[float(i)] * 2 for i in range(5)]}" in result.stdout
    assert "\x1b[" not in result.stderr, "a log read from a file has no colour codes"
    if transport == "mpi":
        fetches = [line for line in result.stderr.splitlines() if "fetched over MPI" in line]
        assert len(fetches) == 5, result.stderr
        allocated = [line for line in fetches if "allocating=None" not in line]
        assert len(allocated) == 1, "only the first needs fresh memory"


def test_an_input_a_task_keeps_is_not_overwritten_by_the_next_array_received(tmp_path):
    # Over MPI a released array's memory carries the next one of its size (above); a task
    # that keeps its input past its end (here in a module global) holds those pages, so
    # they must not be reused while it does.
    script = write(
        tmp_path,
        "kept.py",
        "import sys, numpy as np, rankmesh\n"
        "client = rankmesh.Client()\n"
        "a, b = client.workers()\n"
        "def make(i):\n"
        "    return np.full(1_000_000, float(i))\n"
        "def keep(x):\n"
        "    sys.modules['numpy'].kept_by_test = x\n"
        "    return float(x[0])\n"
        "def kept():\n"
        "    x = sys.modules['numpy'].kept_by_test\n"
        "    return [float(x.min()), float(x.max())]\n"
        "def spread(x):\n"
        "    return [float(x.min()), float(x.max())]\n"
        "first = client.submit(make, 1, workers=[a])\n"
        "print('held', client.submit(keep, first, workers=[b]).result())\n"
        "del first\n"
        "seen = []\n"
        "for i in range(2, 5):\n"
        "    x = client.submit(make, i, workers=[a])\n"
        "    seen.append(client.submit(spread, x, workers=[b]).result())\n"
        "    del x\n"
        "print('seen', seen)\n"
        "print('kept', client.submit(kept, workers=[b], pure=False).result())\n",
    )
    result = mpirun(3, script, flags=["--threads-per-worker", "1", *NO_LINKS])
    assert result.returncode == 0, result.stderr
    assert "held 1.0" in result.stdout
    assert f"seen {[[float(i)] * 2 for i in range(2, 5)]}" in result.stdout
    assert "kept [1.0, 1.0]" in result.stdout, result.stdout


OPEN_MPI_SETTINGS = (
    "OMPI_MCA_pml",
    "OMPI_MCA_btl_vader_single_copy_mechanism",
    "OMPI_MCA_btl_vader_max_send_size",
    "OMPI_MCA_mpi_yield_when_idle",
)


def settings_seen_by_workers(tmp_path, env=None, flags=()):
    """What tasks on each worker rank (which inherit its environment) see of the Open MPI
    settings rankmesh fills in."""
    script = write(
        tmp_path,
        "settings.py",
        "import os, rankmesh\n"
        "client = rankmesh.Client()\n"
        f"names = {OPEN_MPI_SETTINGS!r}\n"
        "def seen():\n"
        "    return [os.environ.get(name) for name in names]\n"
        "ids = [w['id'] for w in client.workers()]\n"
        "print('seen', client.gather([client.submit(seen, workers=[i]) for i in ids]))\n",
    )
    result = mpirun(3, script, env=env, flags=flags)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("seen "))


def settings_printed(env):
    printed = subprocess.run(
        [BINARY, "mpi-settings"], capture_output=True, text=True, env=env, check=True
    ).stdout
    return dict(line.split("=", 1) for line in printed.splitlines())


def test_open_mpi_settings_reach_every_worker_rank_unless_chosen_or_declined(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in OPEN_MPI_SETTINGS}
    chosen = {**base, "OMPI_MCA_btl_vader_single_copy_mechanism": "cma"}
    for env in (base, chosen):
        printed = settings_printed(env)
        # What `rankmesh mpi-settings` says is what the ranks run with; a value somebody
        # chose stays theirs.
        expected = [printed.get(name, env.get(name)) for name in OPEN_MPI_SETTINGS]
        assert settings_seen_by_workers(tmp_path, env) == f"seen {[expected, expected]}"
    if os.environ.get("RANKMESH_TEST_MPI") != "mpich":
        printed = settings_printed(base)
        assert printed["OMPI_MCA_btl_vader_single_copy_mechanism"] == "none"
        assert printed["OMPI_MCA_btl_vader_max_send_size"] == "131072"
        assert printed["OMPI_MCA_mpi_yield_when_idle"] == "0"
        # With a single copy, large messages are not cut into fragments.
        printed = settings_printed(chosen)
        assert "OMPI_MCA_btl_vader_single_copy_mechanism" not in printed
        assert "OMPI_MCA_btl_vader_max_send_size" not in printed
    untouched = settings_seen_by_workers(tmp_path, base, flags=["--no-mpi-tuning"])
    assert untouched == f"seen {[[None] * len(OPEN_MPI_SETTINGS)] * 2}"
