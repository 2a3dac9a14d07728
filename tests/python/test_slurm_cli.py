"""`rankmesh submit` refuses bad input with a clear error before anything is submitted;
`--dry-run` and `config show` work without a batch system. No SLURM needed here."""

import json

import pytest
from batch_helpers import ROOT, Rankmesh

EXAMPLE_JOB = ROOT / "jobscripts" / "examples" / "xarray_job.py"

SITE = """
default_profile = "short"
[profile.short]
partition = "debug"
walltime = "10"
[profile.broken_walltime]
walltime = "1:xx"
[profile.no_nodes]
nodes = 0
[profile.memory]
memory_limit = "4GiB"
memory_target = 0.5
memory_pause = false
local_directory = "$LOCAL_SCRATCH/my spill"
[profile.fraction]
memory_limit = 0.25
memory_terminate = 1
[profile.bad_threshold]
memory_spill = 1.5
"""


@pytest.fixture()
def cli(tmp_path):
    (tmp_path / "ok.py").write_text("print('ok')\n")
    return Rankmesh(tmp_path, SITE)


def refused(cli, *args, code=None):
    result = cli("submit", "--system", "slurm", *args)
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code
    assert not list((cli.workdir / "state").glob("*.json")), "a job was recorded"
    return result.stderr


def test_a_malformed_walltime_flag(cli):
    error = refused(cli, "--walltime", "1:xx", "ok.py", code=2)
    assert "malformed walltime '1:xx'" in error and "HH:MM:SS" in error


def test_a_malformed_walltime_in_a_profile_names_the_profile(cli):
    error = refused(cli, "--profile", "broken_walltime", "ok.py")
    assert "walltime (from profile broken_walltime" in error
    assert str(cli.config) in error


def test_negative_nodes(cli):
    error = refused(cli, "--nodes", "-1", "ok.py", code=2)
    assert "invalid value '-1' for '--nodes" in error


def test_zero_nodes_in_a_profile(cli):
    error = refused(cli, "--profile", "no_nodes", "ok.py")
    assert "nodes (from profile no_nodes" in error and "must be ≥ 1" in error


def test_a_single_task_job_is_refused(cli):
    error = refused(cli, "--ntasks-per-node", "1", "ok.py")
    assert "at least 2 tasks" in error


def test_an_unknown_profile_lists_the_known_ones(cli):
    error = refused(cli, "--profile", "gpu", "ok.py")
    assert "unknown profile 'gpu'" in error
    assert "bad_threshold, broken_walltime, fraction, memory, no_nodes, short" in error


def test_a_missing_script(cli):
    error = refused(cli, "missing.py")
    assert f"the script {cli.workdir / 'missing.py'} does not exist" in error


def test_an_unknown_config_key_names_the_key_and_the_file(cli):
    cli.config.write_text('[profile.short]\npartion = "debug"\n')
    error = refused(cli, "ok.py")
    assert "partion" in error and str(cli.config) in error


def test_a_negative_number_in_the_config_names_the_file(cli):
    cli.config.write_text("[profile.short]\nnodes = -2\n")
    error = refused(cli, "--profile", "short", "ok.py")
    assert "nodes" in error and str(cli.config) in error


def test_no_batch_system_on_path_says_what_was_looked_for(cli, tmp_path):
    cli.env["PATH"] = str(tmp_path / "empty")
    result = cli("submit", "ok.py")
    assert result.returncode == 1
    assert "looked for sbatch (SLURM) and qsub (PBS) on PATH" in result.stderr
    result = cli("submit", "--system", "pbs", "ok.py")
    assert "PBS was asked for, but its `qsub` is not on PATH" in result.stderr


def test_dry_run_prints_the_script_and_submits_nothing(cli, tmp_path):
    cli.env["PATH"] = str(tmp_path / "empty")  # no sbatch: nothing could be submitted
    result = cli(
        "submit",
        "--dry-run",
        "--system",
        "slurm",
        "--ntasks-per-node",
        "3",
        "ok.py",
        "--flag",
        "a b",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks-per-node=3" in script
    assert "#SBATCH --partition=debug" in script  # from the default profile
    assert "#SBATCH --time=00:10:00" in script
    assert f"{tmp_path / 'ok.py'} --flag 'a b'" in script
    assert not list((tmp_path / "state").glob("*"))
    pbs = json.loads(cli("submit", "--dry-run", "--json", "--system", "pbs", "ok.py").stdout)
    assert pbs["system"] == "pbs" and "#PBS -q debug" in pbs["script"]


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_memory_settings_in_a_profile_reach_the_workers_and_the_sweep(cli, system):
    result = cli("submit", "--dry-run", "--system", system, "--profile", "memory", "ok.py")
    assert result.returncode == 0, result.stderr
    run = next(line for line in result.stdout.splitlines() if " run --python " in line)
    flags = "--memory-limit 4GiB --memory-target 0.5 --memory-pause false"
    # The job's shell expands the variable on the node; the space stays quoted.
    directory = '--local-directory "$LOCAL_SCRATCH/my spill"'
    assert f"{flags} {directory} {cli.workdir / 'ok.py'}" in run, run
    sweeps = [line for line in result.stdout.splitlines() if " sweep" in line]
    assert sweeps and all(f"sweep {directory}" in line for line in sweeps), sweeps


def test_memory_flags_override_the_profile(cli):
    result = cli(
        "submit",
        *("--dry-run", "--system", "slurm", "--profile", "fraction"),
        *("--memory-limit", "300MiB", "--memory-pause", "0.9", "ok.py"),
    )
    assert result.returncode == 0, result.stderr
    assert "--memory-limit 300MiB --memory-pause 0.9 --memory-terminate 1 " in result.stdout
    shown = cli("config", "show", "--profile", "fraction").stdout
    assert "memory_limit = 0.25" in shown and f"# profile fraction ({cli.config})" in shown


def test_a_bad_memory_setting_names_the_setting_and_where_it_came_from(cli):
    error = refused(cli, "--profile", "bad_threshold", "ok.py")
    assert "memory_spill (from profile bad_threshold" in error, error
    assert "`1.5` is not a fraction of the memory limit" in error, error
    error = refused(cli, "--memory-limit", "lots", "ok.py", code=2)
    assert "invalid value 'lots' for '--memory-limit" in error, error
    assert "is not a size" in error, error


def test_config_show_says_where_each_value_comes_from(cli):
    result = cli("config", "show", "--profile", "short")
    assert result.returncode == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines() if " = " in line}
    assert lines["partition"].endswith(f"# profile short ({cli.config})")
    assert lines["nodes"].endswith("# default")
    assert str(cli.config) in result.stdout.splitlines()[0]


def test_python_dry_run_returns_the_script():
    import rankmesh

    with pytest.raises(rankmesh.BatchError, match="does not exist"):
        rankmesh.submit("missing.py", system="slurm", dry_run=True)


@pytest.mark.parametrize("profile", ["cpu", "gpu", "conda", "pbspro", "torque", "local"])
def test_the_example_profiles_render(tmp_path, profile):
    cli = Rankmesh(tmp_path, (ROOT / "jobscripts" / "examples" / "config.toml").read_text())
    result = cli("submit", "--dry-run", "--profile", profile, str(EXAMPLE_JOB), "out.npy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash\n")
    assert f"{EXAMPLE_JOB} out.npy" in result.stdout


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_a_report_flag_reaches_the_jobs_run_line_as_an_absolute_path(cli, system):
    result = cli("submit", "--dry-run", "--system", system, "--report", "out/my job.html", "ok.py")
    assert result.returncode == 0, result.stderr
    run = next(line for line in result.stdout.splitlines() if " run --python " in line)
    assert f"--report '{cli.workdir / 'out/my job.html'}' {cli.workdir / 'ok.py'}" in run, run
