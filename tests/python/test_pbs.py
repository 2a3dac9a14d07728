"""The PBS path end to end through Debian's slurm-wlm-torque: its qsub, qstat and qdel
submit to and query the same local SLURM. This proves rankmesh's qsub/qstat/qdel handling,
the PBS job script and mpirun launch; not a real PBS server (see docs/pbs.md)."""

import pytest
from batch_helpers import COMPUTES_FOREVER, Rankmesh, assert_no_processes_left, require_slurm
from rankmesh.errors import WALLTIME_DRAIN_EXIT

# The wrapper understands Torque's `-l nodes=N:ppn=M`; mpirun reads the allocation.
TORQUE = """
[profile.torque]
system = "pbs"
pbs_resources = "nodes"
launcher = "mpirun"
launcher_flags = ["--bind-to", "none"]
ntasks_per_node = 3
"""


@pytest.fixture(autouse=True)
def torque_wrappers():
    require_slurm(also="qsub")


@pytest.fixture()
def cli(tmp_path):
    return Rankmesh(tmp_path, TORQUE)


def test_a_pbs_job_reports_its_exit_code(cli, tmp_path):
    (tmp_path / "five.py").write_text("import sys\nprint('pbs job ran')\nsys.exit(5)\n")
    job = cli.submit("--profile", "torque", "five.py")
    script = (tmp_path / "state" / f"{job}.sh").read_text()
    assert "#PBS -l nodes=1:ppn=3" in script and "mpirun -n 3 --bind-to none" in script
    assert cli.wait(job).returncode == 5
    status = cli.status(job)
    assert (status["state"], status["exit_code"]) == ("failed", 5)
    assert "pbs job ran" in cli("logs", job).stdout
    assert "2 workers ready" in cli("logs", job).stdout


def test_qdel_cancels_a_running_pbs_job(cli, tmp_path):
    (tmp_path / "forever.py").write_text(
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
    )
    job = cli.submit("--profile", "torque", "forever.py")
    cli.wait_for_output(job, "started")
    assert cli.status(job)["state"] == "running"  # qstat's job_state R
    assert cli("cancel", job).returncode == 0
    assert cli.wait(job).returncode != 0
    assert cli.status(job)["state"] == "cancelled"
    assert_no_processes_left(job)  # the wrapper's jobs are SLURM jobs underneath


def test_a_pbs_job_drains_itself_before_its_walltime(cli, tmp_path):
    # PBS sends no warning signal: rank 0 drains at the time the job script computes.
    cli.config.write_text(TORQUE + 'walltime = "1"\ndrain_seconds = 50\n')
    (tmp_path / "long.py").write_text(COMPUTES_FOREVER)
    job = cli.submit("--profile", "torque", "long.py")
    waited = cli.wait(job)
    assert waited.returncode == WALLTIME_DRAIN_EXIT, cli("logs", job).stdout
    status = cli.status(job)
    assert (status["state"], status["exit_code"]) == ("drained", WALLTIME_DRAIN_EXIT)
    logs = cli("logs", job).stdout
    assert "the drain time the job script set" in logs
    assert "rankmesh.errors.WalltimeDrain" in logs
