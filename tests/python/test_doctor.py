"""`rankmesh doctor` on this machine and inside a job of the local SLURM: its JSON fields
against what the machine says for itself, and its exit code when a part cannot work."""

import json
import os
import resource
import subprocess
import time

import psutil
import pytest
import rankmesh
from batch_helpers import BINARY, require_slurm
from test_topology import host_takes_free_memory_back

CHECKS = [
    "build",
    "mpi",
    "open_mpi",
    "topology",
    "batch",
    "shared_memory",
    "local_directory",
    "open_files",
]


def doctor(*args: str, env: dict | None = None) -> tuple[int, dict]:
    ran = subprocess.run(
        [BINARY, "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return ran.returncode, json.loads(ran.stdout)


def by_name(report: dict) -> dict:
    return {check["name"]: check for check in report["checks"]}


def test_the_report_matches_what_this_machine_says_of_itself():
    code, report = doctor()
    assert code == 0, report
    assert report["version"] == rankmesh.__version__
    assert isinstance(report["protocol"], int) and report["status"] == "ok"
    checks = by_name(report)
    assert [c["name"] for c in report["checks"]] == CHECKS
    mpi = checks["mpi"]["facts"]
    assert mpi["library"].startswith("Open MPI v")  # Debian's MPI, as installed
    assert mpi["threading"] in ("Serialized", "Multiple") and mpi["processes"] == 1
    assert mpi["launched"] is False
    open_mpi = checks["open_mpi"]["facts"]
    assert {"ob1"} <= set(open_mpi["pml"]) and {"self", "tcp", "vader"} <= set(open_mpi["btl"])
    assert any(
        line.startswith("btl_vader_single_copy_mechanism=")
        for line in open_mpi["rankmesh_run_adds"]
    )
    topology = checks["topology"]["facts"]
    assert topology["cpus"] == psutil.cpu_count(logical=True)
    assert topology["cores"] == psutil.cpu_count(logical=False)
    shm = checks["shared_memory"]["facts"]
    statvfs = os.statvfs("/dev/shm")
    assert shm["path"] == "/dev/shm" and shm["total_bytes"] == statvfs.f_blocks * statvfs.f_frsize
    assert shm["huge_pages"] == dev_shm_huge_pages()
    assert shm["free_page_reporting"] == host_takes_free_memory_back()
    local = checks["local_directory"]["facts"]
    without_journal = local.get("file_system") == "ext4 without a journal"
    assert without_journal == (ext4_journal_task(local["path"]) == "<none>"), local
    files = checks["open_files"]["facts"]
    assert (files["soft"], files["hard"]) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert checks["build"]["facts"]["features"] == ["mpi", "hwloc", "batch"]


def ext4_journal_task(folder: str) -> str | None:
    """What the kernel says of the journal of the ext4 on top at `folder` (`<none>`: it has
    none); None if that is not an ext4."""
    folder = os.path.realpath(folder)
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split(" - ")[1].split()) for line in f]
    above = [m for m in mounts if folder == m[0] or folder.startswith(m[0].rstrip("/") + "/")]
    point, (kind, source, *_) = max(reversed(above), key=lambda m: len(m[0]))  # on top
    if kind != "ext4":
        return None
    device = os.path.basename(os.path.realpath(source))
    with open(f"/sys/fs/ext4/{device}/journal_task") as f:
        return f.read().strip()


def dev_shm_huge_pages() -> str:
    """The `huge=` option of the mount on top at /dev/shm, as its tmpfs has it."""
    with open("/proc/self/mountinfo") as f:
        on_top = [line.split(" - ")[1] for line in f if line.split()[4] == "/dev/shm"][-1]
    options = dict(o.partition("=")[::2] for o in on_top.split()[2].split(","))
    return options.get("huge", "never")


def test_the_shared_memory_base_given_is_checked_and_its_huge_pages_named(tmp_path):
    from conftest import tmpfs

    with tmpfs(tmp_path / "huge", "size=2g,mode=1777,huge=within_size") as base:
        code, report = doctor(env=dict(os.environ, RANKMESH_SHM_BASE=str(base)))
    shm = by_name(report)["shared_memory"]
    assert code == 0 and shm["status"] == "ok", shm
    assert shm["facts"]["path"] == str(base) and shm["facts"]["huge_pages"] == "within_size"
    assert "hint" not in shm, "nothing to do about it"
    unsafe = tmp_path / "open-to-all"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    code, report = doctor(env=dict(os.environ, RANKMESH_SHM_BASE=str(unsafe)))
    shm = by_name(report)["shared_memory"]
    assert code == 1 and shm["status"] == "fail", shm
    assert "lets other users replace" in shm["facts"]["error"]
    assert "RANKMESH_SHM_BASE" in shm["hint"]


def test_the_text_report_names_every_part():
    ran = subprocess.run([BINARY, "doctor"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    for name in CHECKS:
        assert f"] {name}: " in ran.stdout, ran.stdout
    assert "[  ok] mpi: Open MPI v" in ran.stdout


def test_a_spill_folder_that_cannot_be_written_fails_the_report(tmp_path):
    # Under a file, so that nobody can create it (Open MPI makes its session folder in
    # $TMPDIR, creating a missing one).
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "spill"
    env = dict(os.environ, TMPDIR=str(unwritable))
    env.pop("SLURM_TMPDIR", None)
    code, report = doctor(env=env)
    assert code == 1 and report["status"] == "fail"
    local = by_name(report)["local_directory"]
    assert local["status"] == "fail" and local["facts"]["path"] == str(unwritable)
    assert "--local-directory" in local["hint"]


def test_a_required_part_that_is_missing_fails_the_report():
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd"):
        pytest.skip("this machine has a GPU")
    code, report = doctor("--require", "gpu")
    assert code == 1
    topology = by_name(report)["topology"]
    assert topology["status"] == "fail" and topology["facts"]["gpus"] == 0
    unknown = subprocess.run(
        [BINARY, "doctor", "--require", "infiniband"], capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 2 and "invalid value 'infiniband'" in unknown.stderr


def test_inside_a_slurm_job_the_report_names_the_job(tmp_path):
    require_slurm()
    out = tmp_path / "doctor.json"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--output",
            str(tmp_path / "job.log"),
            "--wrap",
            f"{BINARY} doctor --json > {out}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if not queued.stdout.strip():
            break
        time.sleep(0.5)
    report = json.loads(out.read_text())
    checks = by_name(report)
    assert f"SLURM_JOB_ID={job}" in checks["batch"]["facts"]["job"], checks["batch"]
    assert checks["batch"]["summary"].endswith("inside a job")
    assert checks["mpi"]["status"] == "ok", checks["mpi"]
