"""Another user of the node cannot read, replace or take over a rankmesh cluster.

The cluster runs as the user running the tests (root in CI: the hardest victim, since only
rankmesh's own checks keep root from following a planted link). The attacker is a second,
real Unix user, `rankmesh-attacker`, running Debian's python3 through `setpriv`: it plants
files and links where rankmesh writes, reads what rankmesh created, and connects to every
port without the token. Every attempt must fail, and the cluster must keep computing.
"""

import contextlib
import json
import os
import pwd
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import dask
import dask.array as da
import msgpack
import numpy as np
import psutil
import pytest
import rankmesh
from conftest import cluster_processes, cluster_workers
from rankmesh._rankmesh import PROTOCOL_VERSION, read_scheduler_file
from rankmesh.cluster import find_binary

ATTACKER = "rankmesh-attacker"
SYSTEM_PYTHON = "/usr/bin/python3"
# Where rankmesh makes its folders when neither $XDG_RUNTIME_DIR nor $TMPDIR is set.
BASES = [Path("/tmp"), Path("/dev/shm")]


def _needs(problem: str):
    """Skips outside the test setup; in CI (CI=true) the missing part is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs must test as a second user: {problem}")
    pytest.skip(problem)


class Attacker:
    """Runs Python code as the second user; it gets `args` (JSON) and prints JSON."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid

    def command(self, code: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            SYSTEM_PYTHON,
            "-c",
            textwrap.dedent(code),
        ]

    def run(self, code: str, args: object = None, timeout: float = 60) -> object:
        result = subprocess.run(
            self.command(code),
            input=json.dumps(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def attacker():
    if os.geteuid() != 0:
        _needs("acting as a second user needs root (useradd, setpriv)")
    if not (shutil.which("setpriv") and os.path.exists(SYSTEM_PYTHON)):
        _needs(f"setpriv and {SYSTEM_PYTHON} are needed (scripts/install.sh installs them)")
    try:
        entry = pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER],
            check=True,
        )
        entry = pwd.getpwnam(ATTACKER)
    return Attacker(entry.pw_uid, entry.pw_gid)


# -------------------------------------------------------------------- what rankmesh made


def rankmesh_entries() -> set[Path]:
    """Top-level rankmesh folders and files in the shared bases."""
    return {p for base in BASES for p in base.glob("rankmesh*")}


def everything_under(paths) -> list[Path]:
    found = []
    for top in paths:
        found.append(top)
        if top.is_dir() and not top.is_symlink():
            found.extend(sorted(top.rglob("*")))
    return found


def check_private(paths: list[Path]) -> None:
    for path in paths:
        info = path.lstat()
        assert info.st_uid == os.geteuid(), f"{path} is not ours"
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            assert mode == 0o700, f"folder {path} has mode {mode:o}"
        else:
            assert mode == 0o600, f"{path} has mode {mode:o}"


def make(i):
    return np.full(1_000_000, float(i))  # 8 MB: kept by its executor, a file once gathered


def total(*parts):
    return float(sum(p.sum() for p in parts))


def computes(client) -> None:
    """The cluster still works: a graph's result equals Dask's threaded scheduler's."""
    x = da.random.default_rng(0).random((600, 600), chunks=150)
    graph = (x @ x.T).mean(axis=0)
    expected = graph.compute(scheduler="threads")
    np.testing.assert_allclose(client.compute(graph, sync=True), expected)


# ------------------------------------------------------------------------------ reading

# Attacker code: each attempt is recorded as done or as the OSError that refused it.
ATTEMPTS = """
import json, os, socket, sys
outcome = {}
def attempt(name, action):
    try:
        action()
        outcome[name] = "done"
    except OSError as e:
        outcome[name] = type(e).__name__
"""

READ_EVERYTHING = (
    ATTEMPTS
    + """
paths = json.load(sys.stdin)
for path in paths["files"]:
    attempt(path, lambda: open(path, "rb").read(1))
for path in paths["folders"]:
    attempt(path, lambda: os.listdir(path))
for path in paths["sockets"]:
    attempt(path, lambda: socket.socket(socket.AF_UNIX).connect(path))
for pid in paths["pids"]:
    attempt(f"environ {pid}", lambda: open(f"/proc/{pid}/environ", "rb").read())
cmdlines = []
for pid in paths["pids"]:
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
    except OSError:
        pass
print(json.dumps({"outcome": outcome, "cmdlines": cmdlines}))
"""
)


def test_nothing_rankmesh_creates_is_readable_by_another_user(attacker):
    before = rankmesh_entries()
    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        parts = client.map(make, range(4))
        # A consumer needs parts from both workers: some cross to the other worker (copied
        # from its executor), and gathering them copies each out of its executor into a
        # shared-memory file to be sent.
        assert client.submit(total, *parts).result(timeout=60) == sum(1e6 * i for i in range(4))
        assert [float(p[-1]) for p in client.gather(parts)] == [0.0, 1.0, 2.0, 3.0]
        created = everything_under(rankmesh_entries() - before)
        pids = [p.pid for p in cluster_processes(cluster)]
        token = read_scheduler_file(cluster.scheduler_file)[1]

        kinds = {"files": [], "folders": [], "sockets": []}
        for path in created:
            mode = path.lstat().st_mode
            kind = "folders" if stat.S_ISDIR(mode) else "files"
            kind = "sockets" if stat.S_ISSOCK(mode) else kind
            kinds[kind].append(str(path))
        assert cluster.scheduler_file in kinds["files"]
        assert any(p.endswith(".sock") for p in kinds["sockets"]), "executor sockets"
        objects = [f for f in kinds["files"] if Path(f).parent.name.startswith("rankmesh-")]
        assert len(objects) >= 4, f"shared-memory objects: {kinds}"
        check_private(created)

        seen = attacker.run(READ_EVERYTHING, {**kinds, "pids": pids})
        allowed = {k: v for k, v in seen["outcome"].items() if v not in ("PermissionError",)}
        assert allowed == {}, f"another user got at: {allowed}"
        assert all(token not in cmdline for cmdline in seen["cmdlines"]), "token on a command line"
        computes(client)
    assert rankmesh_entries() - before == set(), "left behind"


# ----------------------------------------------------------------------------- planting

PLANT = """
import json, os, sys
job = json.load(sys.stdin)
planted = []
for path, kind in job["paths"]:
    try:
        if kind == "folder":
            os.mkdir(path, 0o777)
            os.chmod(path, 0o777)
        elif job["as"] == "file":
            with open(path, "w") as f:
                f.write("planted")
            os.chmod(path, 0o666)
        else:
            os.symlink(job["target"], path)
        planted.append(path)
    except OSError:
        pass  # its parent is not ours to write in
print(json.dumps(planted))
"""

REMOVE = """
import json, os, shutil, sys
for path in json.load(sys.stdin):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
print("[]")
"""


def run_a_cluster() -> set[Path]:
    """Starts a cluster, computes with large objects, stops it; what it created."""
    before = rankmesh_entries()
    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        parts = client.map(make, range(4))
        assert client.submit(total, *parts).result(timeout=60) == sum(1e6 * i for i in range(4))
        created = set(everything_under(rankmesh_entries() - before))
        computes(client)
    return created


def plan(created: set[Path]) -> list[tuple[str, str]]:
    """Where to plant: every folder rankmesh made (as the attacker's own folder, so the
    paths inside can be planted too) and every file in it, parents first."""
    return [(str(p), "folder" if p.is_dir() else "file") for p in sorted(created)]


def test_planted_files_and_links_at_every_path_are_never_used(attacker, tmp_path):
    recorded = run_a_cluster()
    assert recorded, "a cluster creates files"
    # The attacker's own target: a link to it must never be followed.
    target_dir = Path(tempfile.mkdtemp(prefix="attacker-", dir="/tmp"))
    os.chmod(target_dir, 0o777)
    target = target_dir / "target"
    attacker.run(
        "import json, sys; open(json.load(sys.stdin), 'w').write('theirs'); print('[]')",
        str(target),
    )
    layout = plan(recorded)
    try:
        for kind in ("file", "link"):
            job = {"paths": layout, "as": kind, "target": str(target)}
            planted = attacker.run(PLANT, job)
            assert planted, "the attacker could plant at the paths rankmesh used"
            before = {p: os.lstat(p) for p in planted}
            again = run_a_cluster()
            assert again, "the cluster ran"
            assert not again & set(map(Path, planted)), "rankmesh reused a planted path"
            for path, info in before.items():
                now = os.lstat(path)
                assert (now.st_uid, now.st_mtime_ns, now.st_size) == (
                    info.st_uid,
                    info.st_mtime_ns,
                    info.st_size,
                ), f"{path} was touched"
            assert target.read_text() == "theirs"
            assert sorted(os.listdir(target_dir)) == ["target"]
            attacker.run(REMOVE, sorted(planted, reverse=True))
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


# -------------------------------------------------------------- an explicit shared path

FAKE_SCHEDULER = """
import json, os, socket, sys
job = json.load(sys.stdin)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
listener.settimeout(3)
address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
with open(job["path"], "w") as f:
    json.dump({"address": address, "token": "theirs", "pid": 1}, f)
os.chmod(job["path"], 0o644)
print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
try:
    listener.accept()
    sys.stderr.write("VICTIM CONNECTED\\n")
except socket.timeout:
    pass
"""


def run_local(scheduler_file, script) -> subprocess.CompletedProcess:
    command = [find_binary(), "local", "-n", "1", "--python", sys.executable]
    command += ["--scheduler-file", str(scheduler_file), str(script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_scheduler_file_in_a_shared_folder(attacker):
    shared = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))
    os.chmod(shared, 0o1777)  # like /tmp: everyone may create, nobody may rename others'
    binary = find_binary()
    script = shared / "job.py"
    script.write_text("print('ran')\n")
    script.chmod(0o644)
    try:
        decoy = shared / "decoy"
        attacker.run(
            PLANT.replace('job["paths"]', '[(job["decoy"], "file")]'),
            {"decoy": str(decoy), "as": "file"},
        )
        planted = [(str(shared / "link.json"), "file"), (str(shared / "theirs.json"), "file")]
        attacker.run(PLANT, {"paths": planted[:1], "as": "link", "target": str(decoy)})
        attacker.run(PLANT, {"paths": planted[1:], "as": "file"})
        for path, why in [(planted[0][0], "symbolic link"), (planted[1][0], "belongs to user id")]:
            result = run_local(path, script)
            assert result.returncode != 0 and "ran" not in result.stdout
            assert why in result.stderr, result.stderr
        assert decoy.read_text() == "planted"
        assert (shared / "theirs.json").read_text() == "planted"

        # A scheduler file someone else wrote is never trusted: it would send the client,
        # and the code it submits, to their scheduler.
        fake = shared / "fake.json"
        listener = subprocess.Popen(
            attacker.command(FAKE_SCHEDULER),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        listener.stdin.write(json.dumps({"path": str(fake)}))
        listener.stdin.close()
        json.loads(listener.stdout.readline())
        with pytest.raises(PermissionError, match="belongs to user id"):
            rankmesh.Client(scheduler_file=str(fake))
        worker = subprocess.run(
            [binary, "worker", "--scheduler-file", str(fake)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode != 0 and "belongs to user id" in worker.stderr
        listener.wait(timeout=30)
        assert "VICTIM CONNECTED" not in listener.stderr.read()

        # Our own file there is written whole and private.
        ours = shared / "ours.json"
        result = run_local(ours, script)
        assert result.returncode == 0 and "ran" in result.stdout, result.stderr
        assert sorted(p.name for p in shared.iterdir()) == sorted(
            ["job.py", "decoy", "link.json", "theirs.json", "fake.json"]
        ), "no temporary file left (the scheduler file goes when the cluster stops)"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_job_records_refuse_a_folder_that_is_not_ours(attacker, tmp_path):
    binary = find_binary()
    shared = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))
    os.chmod(shared, 0o1777)
    try:
        theirs = shared / "theirs"
        link = shared / "link"
        attacker.run(PLANT, {"paths": [(str(theirs), "folder")], "as": "file"})
        attacker.run(PLANT, {"paths": [(str(link), "file")], "as": "link", "target": str(theirs)})
        for folder, why in [(theirs, "belongs to user id"), (link, "symbolic link")]:
            env = dict(os.environ, RANKMESH_STATE_DIR=str(folder))
            result = subprocess.run([binary, "jobs"], capture_output=True, text=True, env=env)
            assert result.returncode != 0 and why in result.stderr, result.stderr
        assert os.listdir(theirs) == []
        # The default folder is made private, parents included.
        home = tmp_path / "home"
        env = dict(os.environ, HOME=str(home))
        env.pop("XDG_STATE_HOME", None)
        env.pop("RANKMESH_STATE_DIR", None)
        result = subprocess.run([binary, "jobs"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        check_private([home / ".local/state/rankmesh", home / ".local/state/rankmesh/jobs"])
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_shared_memory_base_that_is_not_ours_stops_the_worker(
    attacker, shared_tmp, capfd, monkeypatch
):
    """`RANKMESH_SHM_BASE` naming another user's folder, or a link to it, is refused when
    the worker starts, with the reason; nothing is made in it."""
    theirs = shared_tmp / "theirs"
    link = shared_tmp / "link"
    attacker.run(PLANT, {"paths": [(str(theirs), "folder")], "as": "file"})
    attacker.run(PLANT, {"paths": [(str(link), "file")], "as": "link", "target": str(theirs)})
    for base in (theirs, link):
        monkeypatch.setenv("RANKMESH_SHM_BASE", str(base))
        with pytest.raises(RuntimeError, match="while starting"):
            rankmesh.LocalCluster(n_workers=1)
        assert "belongs to user id" in capfd.readouterr().err
    assert os.listdir(theirs) == []


# ------------------------------------------------------ spill folders in a shared folder

SPILL_PREFIX = "rankmesh-spill"
# Two workers of 200 MiB keep 120 MiB of results each in memory (the 0.6 target).
SPILLING = {"n_workers": 2, "memory_limit": "200MiB"}


def spilling_array():
    """384 MiB of float64 in 16 MiB chunks: more than two workers keep in memory."""
    return da.random.default_rng(0).random((6_144, 8_192), chunks=(1_024, 2_048))


@pytest.fixture
def shared_tmp():
    """A fresh folder like a shared /tmp or $TMPDIR: everyone may create in it, nobody may
    rename or remove what others made (sticky)."""
    shared = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))
    os.chmod(shared, 0o1777)
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


def spill_folders(local_directory: Path) -> set[Path]:
    return set(local_directory.glob(f"{SPILL_PREFIX}*"))


def wait_until_spilled(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info()["workers"]
        if sum(w["spilled_bytes"] for w in workers.values()) > 0:
            return
        assert time.monotonic() < deadline, f"nothing spilled: {workers}"
        time.sleep(0.1)


def check_spilling_into_own_folders(cluster, folders: set[Path]) -> None:
    """One fresh private folder per worker, `rankmesh-spill-{pid}-{random}`, with files."""
    workers = {p.pid for p in cluster_workers(cluster)}
    assert len(workers) == 2 and len(folders) == 2, (workers, folders)
    pids = set()
    for folder in folders:
        assert folder.is_dir() and not folder.is_symlink(), folder
        prefix, pid, suffix = folder.name.rsplit("-", 2)
        assert prefix == SPILL_PREFIX and len(suffix) == 12, folder
        pids.add(int(pid))
    assert pids == workers
    check_private(everything_under(folders))
    assert any(f.is_file() for folder in folders for f in folder.iterdir()), "spill files"


def compare_with_threads(client, persisted, x) -> None:
    """Spilled results read back right, within a worker and sent to the other."""
    expected = x.mean(axis=0).compute(scheduler="threads")
    np.testing.assert_allclose(client.compute(persisted.mean(axis=0), sync=True), expected)


TAMPER_WITH_SPILL = (
    ATTEMPTS
    + """
job = json.load(sys.stdin)
own = os.path.join(job["shared"], "attacker-file")
with open(own, "w") as f:
    f.write("planted")
for folder in job["folders"]:
    attempt(f"list {folder}", lambda: os.listdir(folder))
    attempt(f"enter {folder}", lambda: os.stat(os.path.join(folder, "0")))
    attempt(f"create in {folder}", lambda: open(os.path.join(folder, "new"), "x").close())
    attempt(f"link in {folder}", lambda: os.symlink(own, os.path.join(folder, "link")))
    attempt(f"move into {folder}", lambda: os.rename(own, os.path.join(folder, "moved")))
    attempt(f"rename {folder}", lambda: os.rename(folder, folder + "-moved"))
    attempt(f"remove {folder}", lambda: os.rmdir(folder))
    attempt(f"chmod {folder}", lambda: os.chmod(folder, 0o777))
for path in job["files"]:
    attempt(f"read {path}", lambda: open(path, "rb").read(1))
    attempt(f"write {path}", lambda: open(path, "r+b").write(b"x"))
    attempt(f"replace {path}", lambda: os.replace(own, path))
    attempt(f"remove {path}", lambda: os.unlink(path))
print(json.dumps(outcome))
"""
)


@contextlib.contextmanager
def spilling_cluster(local_directory):
    """A cluster that has spilled part of a persisted array into `local_directory`."""
    x = spilling_array()
    with (
        rankmesh.LocalCluster(**SPILLING, local_directory=local_directory) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        persisted = client.persist(x)
        rankmesh.wait(persisted)
        wait_until_spilled(client)
        yield cluster, client, persisted, x


def test_spill_folders_in_a_shared_folder_are_private_and_removed(attacker, shared_tmp):
    """While workers spill into a folder everyone may write in, another user can neither
    list, enter nor change their spill folders, nor read, replace or remove a spilled
    file; folders are 0700 and files 0600, ours; all are gone when the cluster closes."""
    with spilling_cluster(shared_tmp) as (cluster, client, persisted, x):
        folders = spill_folders(shared_tmp)
        check_spilling_into_own_folders(cluster, folders)
        files = [f for folder in folders for f in folder.iterdir()]
        job = {"shared": str(shared_tmp), "folders": sorted(map(str, folders))}
        outcome = attacker.run(TAMPER_WITH_SPILL, {**job, "files": sorted(map(str, files))})
        assert len(outcome) == 8 * len(folders) + 4 * len(files)
        allowed = {k: v for k, v in outcome.items() if v != "PermissionError"}
        assert allowed == {}, f"another user got at: {allowed}"
        assert spill_folders(shared_tmp) == folders
        check_private(everything_under(folders))
        compare_with_threads(client, persisted, x)
        del persisted
    assert spill_folders(shared_tmp) == set(), "spill folders left behind"
    assert sorted(os.listdir(shared_tmp)) == ["attacker-file"]


def dead_pid() -> int:
    """A process id no process has now: a folder named with it looks like a dead
    worker's, which the next worker sweeps."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 1, 300, -1) if not psutil.pid_exists(p))


def snapshot(paths) -> dict[str, tuple]:
    """Each path as it is, links not followed: owner, mode, inode, size, times, content."""
    seen = {}
    for path in paths:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = sorted(os.listdir(path))
        key = (info.st_uid, info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns)
        seen[str(path)] = (*key, content)
    return seen


def test_planted_spill_folders_and_links_are_never_used_or_swept(attacker, shared_tmp):
    """Spill folder names are random (`rankmesh-spill-{pid}-{12 random}`), so the attacker
    plants what it can before the cluster starts: links and folders with the prefix, named
    as a dead worker's (which the next worker sweeps), one of them its own folder with a
    link where the first spill file would go. Workers spill into fresh private folders of
    their own, compute Dask's result, and leave every planted thing, the attacker's link
    target and our own folder a link points at, as they were."""
    target = shared_tmp / "attacker-target"
    attacker.run(PLANT, {"paths": [(str(target), "folder")], "as": "file"})
    attacker.run(PLANT, {"paths": [(str(target / "theirs"), "file")], "as": "file"})
    ours = shared_tmp / "victim"  # what a followed link would let the sweep delete
    ours.mkdir(mode=0o700)
    (ours / "ours").write_text("ours")

    dead = f"{SPILL_PREFIX}-{dead_pid()}-"
    links = {SPILL_PREFIX: target, f"{dead}{'L' * 12}": target, f"{dead}{'V' * 12}": ours}
    for name, points_to in links.items():
        job = {"paths": [(str(shared_tmp / name), "file")], "as": "link", "target": str(points_to)}
        attacker.run(PLANT, job)
    folder = shared_tmp / f"{dead}{'D' * 12}"
    attacker.run(PLANT, {"paths": [(str(folder), "folder")], "as": "file"})
    attacker.run(PLANT, {"paths": [(str(folder / "planted"), "file")], "as": "file"})
    attacker.run(
        PLANT,
        {"paths": [(str(folder / "0"), "file")], "as": "link", "target": str(target / "theirs")},
    )
    attacker.run(PLANT, {"paths": [(str(shared_tmp / f"{dead}{'F' * 12}"), "file")], "as": "file"})

    planted = spill_folders(shared_tmp)
    assert len(planted) == 5, planted
    before = snapshot(everything_under(sorted(planted | {target, ours})))
    assert before[str(target / "theirs")][-1] == b"planted"
    assert all(before[str(p)][0] != os.geteuid() for p in planted), "the attacker's"

    with spilling_cluster(shared_tmp) as (cluster, client, persisted, x):
        check_spilling_into_own_folders(cluster, spill_folders(shared_tmp) - planted)
        compare_with_threads(client, persisted, x)
        assert snapshot(everything_under(sorted(planted | {target, ours}))) == before
        del persisted
    assert spill_folders(shared_tmp) == planted, "our spill folders removed, none other"
    assert snapshot(everything_under(sorted(planted | {target, ours}))) == before


# -------------------------------------------------------------------------------- ports

KNOCK = """
import json, socket, struct, sys
job = json.load(sys.stdin)
hello = bytes.fromhex(job["hello"])
outcome = {}
def frame(payload):
    return struct.pack(">I", len(payload)) + payload
def read_all(s):
    s.settimeout(15)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, "closed"
            data += chunk
    except socket.timeout:
        return data, "open"
    except ConnectionResetError:
        return data, "closed"
for port in job["ports"]:
    result = {}
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(frame(hello))
        data, state = read_all(s)
        result["wrong token"] = [data.hex(), state]
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(b"\\xff" * 1_000_000)
        except OSError:
            pass
        result["garbage"] = [b"".hex(), read_all(s)[1]]
    with socket.create_connection(("127.0.0.1", port)) as s:
        # A message as an authenticated peer would send it, without the hello.
        s.sendall(frame(bytes.fromhex(job["submit"])))
        data, state = read_all(s)
        result["no hello"] = [data.hex(), state]
    outcome[str(port)] = result
print(json.dumps(outcome))
"""


def hello(token: str, role: str = "Client") -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, role, token])


def listening_ports(cluster) -> list[int]:
    ports = set()
    for process in cluster_processes(cluster):
        for connection in process.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                ports.add(connection.laddr.port)
    return sorted(ports)


HTTP_KNOCK = """
import json, sys, urllib.error, urllib.request
job = json.load(sys.stdin)
codes = {}
for path in job["paths"]:
    for name, headers in [("none", {}), ("wrong", {"Authorization": "Bearer " + job["wrong"]}),
                          ("cookie", {"Cookie": job["cookie"]})]:
        request = urllib.request.Request(job["base"] + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                codes[path + " " + name] = [response.status, response.read(200).decode()]
        except urllib.error.HTTPError as refused:
            codes[path + " " + name] = [refused.code, ""]
print(json.dumps(codes))
"""


def test_every_port_refuses_a_connection_without_the_token(attacker):
    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        dashboard = int(client.dashboard_link.split("/status")[0].rsplit(":", 1)[1])
        ports = [port for port in listening_ports(cluster) if port != dashboard]
        assert len(ports) == 3, "the scheduler and two data servers"
        # The dashboard speaks HTTP: another user gets 403 on every page, whatever it sends.
        paths = ["/", "/status", "/events", "/health", "/metrics", "/json/counts.json"]
        job = {
            "base": client.dashboard_link.split("/status")[0],
            "paths": paths + ["/status?token=guess"],
            "wrong": "0" * 64,
            "cookie": f"rankmesh-token-{dashboard}={'0' * 64}",
        }
        codes = attacker.run(HTTP_KNOCK, job)
        assert {tuple(v) for v in codes.values()} == {(403, "")}, codes
        future = client.submit(make, 3)
        assert future.result(timeout=60)[0] == 3.0
        job = {
            "ports": ports,
            "hello": hello("not-the-token").hex(),
            "submit": msgpack.packb({"Submit": [[], [], []]}).hex(),
        }
        outcome = attacker.run(KNOCK, job)
        refused = struct.pack(">I", len(msgpack.packb({"Refused": ["wrong cluster token"]})))
        for port, tries in outcome.items():
            data, state = tries["wrong token"]
            reply = bytes.fromhex(data)
            assert state == "closed", f"port {port} kept a wrong token's connection"
            assert reply[4:] == msgpack.packb({"Refused": ["wrong cluster token"]}), (
                f"port {port} answered {reply!r}"
            )
            assert reply[:4] == refused
            assert tries["garbage"][1] == "closed"
            data, state = tries["no hello"]
            assert state == "closed" and b"Accepted" not in bytes.fromhex(data)
        # Still serving its owner.
        assert future.result(timeout=60)[0] == 3.0
        computes(client)


# ------------------------------------------------------------------------------- floods


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def watch(process: psutil.Process, log: Path, seconds: float = 5) -> tuple[float, int]:
    """CPU seconds the process used and log lines it wrote over the next `seconds`."""
    lines, cpu = len(log.read_text().splitlines()), cpu_seconds(process)
    time.sleep(seconds)
    return cpu_seconds(process) - cpu, len(log.read_text().splitlines()) - lines


def open_idle(port: int, count: int, hello_frame: bytes = b"") -> list[socket.socket]:
    """`count` connections that send `hello_frame` (or nothing) and then stay idle."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sockets.append(s)
    if hello_frame:
        for s in sockets:
            s.setblocking(True)
            s.sendall(hello_frame)
    return sockets


def test_more_connections_than_the_file_limit(tmp_path):
    """An attacker holding more connections than the scheduler's file limit (1,100 against
    `ulimit -n 256`) neither makes it spin nor fills its log, and token holders keep
    computing: connections in their handshake are capped (a quarter of the limit, the
    oldest evicted), failed accepts back off, and per-connection problems are logged at
    most once per 10 s and kind."""
    limit = 256
    scheduler_file = tmp_path / "scheduler.json"
    log = tmp_path / "cluster.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [
                find_binary(),
                "local",
                "-n",
                "1",
                "--python",
                sys.executable,
                "--scheduler-file",
                str(scheduler_file),
            ],
            stdin=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        address, token, _ = read_scheduler_file(str(scheduler_file))
        port = int(address.rsplit(":", 1)[1])
        scheduler = psutil.Process(process.pid)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
        with rankmesh.Client(scheduler_file=str(scheduler_file)) as client:
            computes(client)
            # 1. Idle strangers, more than the limit: the handshake cap holds them off.
            held += open_idle(port, 1100)
            time.sleep(1)
            cpu, lines = watch(scheduler, log)
            assert cpu < 2.5, f"the scheduler spun: {cpu:.2f} s of CPU in 5 s"
            assert lines < 20, f"{lines} log lines in 5 s"
            computes(client)
            with rankmesh.Client(scheduler_file=str(scheduler_file)) as newcomer:
                computes(newcomer)
            # 2. Descriptors used up by token holders, strangers on top: accept fails
            #    with EMFILE, which evicts strangers or backs off instead of spinning.
            frame = hello(token)
            held += open_idle(port, limit, struct.pack(">I", len(frame)) + frame)
            held += open_idle(port, 300)
            time.sleep(1)
            cpu, lines = watch(scheduler, log)
            assert cpu < 2.5, f"the scheduler spun: {cpu:.2f} s of CPU in 5 s"
            assert lines < 20, f"{lines} log lines in 5 s"
            assert "Too many open files" in log.read_text(), "the limit was reached"
            computes(client)
            for s in held:
                s.close()
            held = []
            with rankmesh.Client(scheduler_file=str(scheduler_file)) as newcomer:
                computes(newcomer)
    finally:
        for s in held:
            s.close()
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------- callables


def closure(i: int):
    """A callable that travels by value (it is not importable) and holds 100 kB of its own."""
    payload = i.to_bytes(4, "little") * 25_000

    def count():
        return len(payload) + i

    return count


def executor_functions():
    """Functions the executor running this holds (it runs as __main__, `-m rankmesh.executor`)."""
    import gc

    return [len(o.functions) for o in gc.get_objects() if type(o).__name__ == "TaskRunner"]


def settled(read, seconds: float = 1, tries: int = 20):
    """A reading that stayed within 1% over `seconds` (the processes trim after 1 s idle)."""
    last = read()
    for _ in range(tries):
        time.sleep(seconds)
        now = read()
        if all(abs(n - b) <= 0.01 * b for n, b in zip(now, last, strict=True)):
            return now
        last = now
    return last


def test_callables_are_freed_once_their_tasks_are():
    """2,000 distinct 100 kB closures: the scheduler, the worker and the executor hold
    them while their tasks live, and scheduler and worker memory returns to within 10% of
    its baseline after. The baseline is taken after 2,000 tasks of an importable function
    submitted the same way, so that it holds what any 2,000 tasks leave (~0.6 MB of
    allocator state in a process of ~9 MB) and the check isolates the callables."""
    with rankmesh.LocalCluster(n_workers=1) as cluster:
        scheduler = psutil.Process(cluster.pid)
        worker = next(p for p in scheduler.children() if p.name() == "rankmesh")

        def rss() -> tuple[int, int]:
            return scheduler.memory_info().rss, worker.memory_info().rss

        with rankmesh.Client(cluster) as client:
            assert client.submit(closure(9999)).result(timeout=60) == 109_999
            futures = [client.submit(abs, -i) for i in range(2000)]
            assert client.gather(futures) == list(range(2000))
            del futures
        baseline = settled(rss)
        with rankmesh.Client(cluster) as client:
            futures = [client.submit(closure(i)) for i in range(2000)]
            assert client.gather(futures) == [100_000 + i for i in range(2000)]
            peak = rss()
            assert client.submit(executor_functions).result(timeout=60) == [2000]
            del futures
        growth = [p - b for p, b in zip(peak, baseline, strict=True)]
        assert min(growth) > 100e6, f"the closures were held: {growth} bytes more"
        now = settled(rss)
        assert all(n <= 1.1 * b for n, b in zip(now, baseline, strict=True)), (
            f"scheduler and worker RSS {now}, baseline {baseline}, peak {peak}"
        )
        with rankmesh.Client(cluster) as client:
            deadline = time.monotonic() + 30
            while client.submit(executor_functions, pure=False).result(timeout=60) != [0]:
                assert time.monotonic() < deadline, "the executor kept the functions"
                time.sleep(0.2)


def test_a_closure_outlives_the_futures_it_was_shipped_with():
    """A function travelling by value is released with the last future that used it and
    shipped again when used again; one used by unheld graph tasks goes once they are done.
    Results match Dask's threaded scheduler."""
    offset = 10

    def shifted(x):
        return x + offset

    with rankmesh.LocalCluster(n_workers=2) as cluster, rankmesh.Client(cluster) as client:
        a, b = (w["id"] for w in client.workers())
        seen = []
        for i in range(4):
            x = client.submit(shifted, i, workers=[a])
            seen.append(client.submit(shifted, x, workers=[b]).result(timeout=60))
            del x  # released with the next call, before the next submit is sent
        assert seen == [i + 2 * offset for i in range(4)]
        for k in range(3):
            graph = dask.delayed(lambda v, k=k: v * k)(da.arange(10, chunks=5).sum())
            assert graph.compute() == graph.compute(scheduler="threads")
        computes(client)
