"""`rankmesh submit` against the real local SLURM (scripts/local-slurm.sh): the xarray
pipeline on 3 tasks, exit codes, cancel and the walltime drain, end to end."""

import json
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rankmesh
from batch_helpers import (
    BINARY,
    COMPUTES_FOREVER,
    ROOT,
    Rankmesh,
    assert_no_processes_left,
    require_slurm,
)
from rankmesh.errors import WALLTIME_DRAIN_EXIT


@pytest.fixture(autouse=True)
def slurm():
    require_slurm()


@pytest.fixture()
def cli(tmp_path):
    return Rankmesh(tmp_path)


def test_xarray_pipeline_on_three_tasks_matches_threads(cli, tmp_path):
    from xarray_anomaly import anomaly_pipeline, synthetic_dataset

    example = ROOT / "jobscripts" / "examples" / "xarray_job.py"
    job = cli.submit("--ntasks-per-node", "3", "--walltime", "10", str(example), "result.npy")
    waited = cli.wait(job)
    logs = cli("logs", job).stdout
    assert waited.returncode == 0, logs
    status = cli.status(job)
    assert (status["state"], status["exit_code"]) == ("completed", 0)
    assert "2 workers ready" in logs  # 3 tasks: the scheduler and 2 workers
    ours = np.load(tmp_path / "result.npy")
    ds = synthetic_dataset(days=400, chunk_days=100, seed=7)
    theirs = anomaly_pipeline(ds).compute(scheduler="threads").values
    scale = float(np.abs(theirs).max())
    assert scale > 1e-3
    assert float(np.abs(ours - theirs).max()) <= 1e-6 * scale


def test_a_failing_script_fails_the_job_with_its_exit_code(cli, tmp_path):
    (tmp_path / "five.py").write_text("import sys\nprint('about to fail')\nsys.exit(5)\n")
    job = cli.submit("five.py")
    assert cli.wait(job).returncode == 5
    status = cli.status(job)
    assert (status["state"], status["exit_code"]) == ("failed", 5)
    assert "about to fail" in cli("logs", job).stdout
    listed = json.loads(cli("jobs", "--json").stdout)
    assert [(j["id"], j["state"]) for j in listed] == [(job, "failed")]


def test_the_log_and_records_are_private_and_the_jobs_own_files_are_not(cli, tmp_path):
    (tmp_path / "writes.py").write_text("open('result.txt', 'w').write('ok')\nprint('wrote')\n")
    job = cli.submit("writes.py")
    assert cli.wait(job).returncode == 0
    mode = lambda path: stat.S_IMODE(os.lstat(path).st_mode)  # noqa: E731
    state = tmp_path / "state"
    record = json.loads((state / f"{job}.json").read_text())
    assert "wrote" in Path(record["output"]).read_text()
    assert mode(record["output"]) == 0o600, "the job's log"
    assert mode(state) == 0o700
    assert {p.name: mode(p) for p in state.iterdir()} == {
        f"{job}.json": 0o600,
        f"{job}.sh": 0o600,
        f"{job}.exit": 0o600,
    }
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode(tmp_path / "result.txt") == 0o666 & ~umask, "the submitter's umask"


def test_cancel_stops_a_running_job_and_all_its_processes(cli, tmp_path):
    (tmp_path / "forever.py").write_text(
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
    )
    job = cli.submit("--ntasks-per-node", "3", "forever.py")
    cli.wait_for_output(job, "started")
    assert cli.status(job)["state"] == "running"
    cancelled = cli("cancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cli.wait(job).returncode != 0
    assert cli.status(job)["state"] == "cancelled"
    assert_no_processes_left(job)


COMPUTES_THEN_WAITS = """
import time, rankmesh
client = rankmesh.Client()
assert client.gather(client.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]
print("computed", flush=True)
time.sleep(600)
"""


def test_top_shows_a_running_job_by_its_id_until_it_ends(cli, tmp_path):
    """The job's rank 0 writes its scheduler file (private) into the job records; `top`
    asks the scheduler over its own port, which a login node reaches."""
    (tmp_path / "waits.py").write_text(COMPUTES_THEN_WAITS)
    job = cli.submit("--ntasks-per-node", "3", "waits.py")
    cli.wait_for_output(job, "computed")
    scheduler_file = tmp_path / "state" / f"{job}.scheduler"
    assert stat.S_IMODE(os.lstat(scheduler_file).st_mode) == 0o600
    shown = cli("top", "--once", job)
    assert shown.returncode == 0, shown.stderr
    # Clients: the default one the job sets up for the script, and the script's own.
    assert "workers 2" in shown.stdout and "clients 2" in shown.stdout, shown.stdout
    rows = [line for line in shown.stdout.splitlines() if line.startswith("abs ")]
    assert rows and " 6/6 " in rows[0], shown.stdout
    live = subprocess.Popen(
        [BINARY, "top", "--interval", "0.2", job],
        cwd=tmp_path,
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cli.wait_for_output(job, "computed")  # the live view drew meanwhile
        assert live.poll() is None, live.communicate()
        assert cli("cancel", job).returncode == 0
        out, err = live.communicate(timeout=60)
    finally:
        live.kill()
    assert live.returncode == 0, err
    assert "workers 2" in out and out.rstrip().endswith("rankmesh top: the scheduler is gone")
    cli.wait(job)
    assert not scheduler_file.exists()
    ended = cli("top", "--once", job)
    assert ended.returncode == 1
    assert f"job {job} has ended (cancelled): its scheduler is gone" in ended.stderr
    unknown = cli("top", "--once", "999999")
    assert unknown.returncode == 1 and "job 999999 is unknown" in unknown.stderr


KILL_A_WORKER = """
import glob, os, signal, time, rankmesh
client = rankmesh.Client()
pids = [w["pid"] for w in client.workers()]
assert client.submit(sum, [1, 2]).result() == 3
left = [f for pid in pids for f in glob.glob(f"/dev/shm/rankmesh-{pid}-*")]
print("workers", *pids, "with", len(left), "shared-memory folders", flush=True)
os.kill(pids[0], signal.SIGKILL)
time.sleep(120)
"""


def test_a_job_whose_worker_rank_is_killed_leaves_nothing_on_the_node(cli, tmp_path):
    """The job ends with a message naming the dead rank, and its job script removes every
    rank's /dev/shm and spill folders on every node, though none could clean up."""
    (tmp_path / "kill_a_worker.py").write_text(KILL_A_WORKER)
    job = cli.submit("--ntasks-per-node", "3", "kill_a_worker.py")
    assert cli.wait(job).returncode != 0
    logs = cli("logs", job).stdout
    started = [line for line in logs.splitlines() if line.startswith("workers ")]
    assert started, logs
    words = started[0].split()
    pids, folders = words[1:-4], int(words[-3])
    assert len(pids) == 2 and folders == 2, started
    # Who names the dead rank first is a race: rank 0 ("worker N left while the script
    # ran") or SLURM, which ends the whole step the moment one task dies (the PMIx plugin,
    # and --kill-on-bad-exit), rank 0 included, before it may have run again on a busy
    # node. The killed worker is task 1 or 2, whichever reported its pid first.
    named_by_slurm = re.search(r"srun: error: \S+: task [12]: Killed", logs)
    assert "left while the script ran" in logs or named_by_slurm, logs
    bases = {"/dev/shm", "/tmp", os.environ.get("TMPDIR", "/tmp")}
    for pid in pids:
        for base in bases:
            for pattern in (f"rankmesh-{pid}-*", f"rankmesh-spill-{pid}-*"):
                leftovers = [str(p) for p in Path(base).glob(pattern)]
                assert leftovers == [], leftovers


SPILLS = """
import glob, os, sys, time, rankmesh, dask.array as da, numpy as np
client = rankmesh.Client()
x = da.random.RandomState(3).random((6400, 6400), chunks=(800, 800))  # 312 MiB, 64 chunks
x = client.persist(x)
rankmesh.wait(x)
# Workers report their counters with their memory samples (every 50 ms after a spill).
for _ in range(100):
    workers = client.scheduler_info()["workers"].values()
    if all(w["spilled_total"] for w in workers):
        break
    time.sleep(0.05)
print("limits", *sorted({w["memory_limit"] for w in workers}), flush=True)
print("spilled", sum(w["spilled_total"] for w in workers), flush=True)
print("folders", len(glob.glob(os.path.join(sys.argv[1], "rankmesh-spill-*"))), flush=True)
print("shm", len(glob.glob(os.path.join(sys.argv[2], "rankmesh-*"))), flush=True)
np.save("sum.npy", client.compute(x.sum()).result())
"""


@pytest.fixture
def short_folder():
    """A folder of a short path (executors' sockets live in workers' folders under it)."""
    with tempfile.TemporaryDirectory(prefix="rm-shm-") as folder:
        yield Path(folder)


def test_memory_settings_from_a_profile_hold_in_the_job(tmp_path, short_folder):
    """A site profile's memory limit reaches every worker, its local directory (with a
    variable the job expands) receives the spilled results, its setup's shared-memory base
    the workers' folders, and nothing is left in either."""
    spill = tmp_path / "scratch"
    spill.mkdir(mode=0o700)
    shm = short_folder
    site = (
        '[profile.small]\nmemory_limit = "160MiB"\nlocal_directory = "$SCRATCH_BASE"\n'
        f'setup = ["export RANKMESH_SHM_BASE={shm}"]\n'
    )
    cli = Rankmesh(tmp_path, site)
    cli.env["SCRATCH_BASE"] = str(spill)  # sbatch exports the submitter's environment
    (tmp_path / "spills.py").write_text(SPILLS)
    job = cli.submit(
        "--profile", "small", "--ntasks-per-node", "3", "spills.py", str(spill), str(shm)
    )
    waited = cli.wait(job)
    logs = cli("logs", job).stdout
    assert waited.returncode == 0, logs
    lines = {line.split()[0]: line.split()[1:] for line in logs.splitlines() if line}
    assert lines["limits"] == [str(160 << 20)], logs
    assert int(lines["spilled"][0]) > 0, logs
    assert int(lines["folders"][0]) == 2, logs  # one per worker, where the profile said
    assert int(lines["shm"][0]) == 2, logs
    x = da.random.RandomState(3).random((6400, 6400), chunks=(800, 800))
    assert np.load(tmp_path / "sum.npy") == pytest.approx(x.sum().compute(scheduler="threads"))
    assert list(spill.iterdir()) == []
    assert list(shm.iterdir()) == []


def test_a_job_near_its_walltime_drains_and_exits_with_the_drain_code(tmp_path):
    # SLURM checks time limits about every 30 s: a 50 s warning on a 1-minute job always
    # comes before the kill.
    cli = Rankmesh(tmp_path, '[profile.short]\nwalltime = "1"\ndrain_seconds = 50\n')
    (tmp_path / "long.py").write_text(COMPUTES_FOREVER)
    job = cli.submit("--profile", "short", "long.py")
    assert "--signal=USR1@50" in (tmp_path / "state" / f"{job}.sh").read_text()
    waited = cli.wait(job)
    assert waited.returncode == WALLTIME_DRAIN_EXIT, cli("logs", job).stdout
    status = cli.status(job)
    assert (status["state"], status["exit_code"]) == ("drained", WALLTIME_DRAIN_EXIT)
    logs = cli("logs", job).stdout
    assert "rankmesh.errors.WalltimeDrain" in logs
    assert "Killed" not in logs and "DUE TO TIME LIMIT" not in logs
    assert_no_processes_left(job)


def test_the_python_job_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = Rankmesh(tmp_path)
    for key in ("RANKMESH_STATE_DIR", "RANKMESH_CONFIG"):
        monkeypatch.setenv(key, cli.env[key])
    (tmp_path / "three.py").write_text("import sys\nprint('from python')\nsys.exit(3)\n")
    job = rankmesh.submit("three.py", "x", job_name="api-test", system="slurm")
    assert "#SBATCH --job-name=api-test" in job.script
    assert job.wait() == 3
    assert job.status()["state"] == "failed"
    assert "from python" in job.logs()
    (tmp_path / "sleep.py").write_text(
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
    )
    sleeper = rankmesh.submit("sleep.py", system="slurm")
    cli.wait_for_output(sleeper.id, "started")
    sleeper.cancel()
    sleeper.wait()
    assert sleeper.status()["state"] == "cancelled"
    with pytest.raises(rankmesh.BatchError, match="has already ended \\(failed\\)"):
        job.cancel()
    assert job.status()["state"] == "failed"  # still: the record was not marked cancelled
    with pytest.raises(TypeError, match="nodez"):
        rankmesh.submit("three.py", nodez=2)


def test_an_unknown_partition_shows_sbatchs_refusal_and_a_hint(cli, tmp_path):
    (tmp_path / "ok.py").write_text("pass\n")
    result = cli("submit", "--partition", "nosuchpartition", "ok.py")
    assert result.returncode == 1
    assert "sbatch: error: invalid partition specified: nosuchpartition" in result.stderr
    assert "hint:" in result.stderr
    assert list((tmp_path / "state").glob("*.json")) == []
