"""A task's failure reaches the caller as its own exception, and the cluster keeps serving."""

import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import pytest
import rankmesh


class ResearchError(Exception):
    """An exception class of the user's own."""


def raise_value_error(_):
    raise ValueError("boom")


def raise_key_error(_):
    return {}["missing-key"]


def raise_research_error(_):
    raise ResearchError("bad sample", 42)


@pytest.mark.parametrize(
    ("func", "exc_type", "text"),
    [
        (raise_value_error, ValueError, "boom"),
        (raise_key_error, KeyError, "missing-key"),
        (raise_research_error, ResearchError, "bad sample"),
    ],
)
def test_task_exception_keeps_type_message_and_frames(client, func, exc_type, text):
    future = client.submit(func, 1)
    with pytest.raises(exc_type) as info:
        future.result(timeout=60)
    assert text in str(info.value)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert func.__name__ in frames
    assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6


def test_dependents_of_a_failed_task_fail_with_its_exception(client):
    bad = client.submit(raise_value_error, 1)
    downstream = client.submit(lambda x: x + 1, bad)
    with pytest.raises(ValueError, match="boom"):
        downstream.result(timeout=60)


def test_exception_inside_dask_compute(client):
    import dask
    from dask import delayed

    with pytest.raises(KeyError):
        dask.compute(delayed(raise_key_error)(0), scheduler=client.get)
    assert dask.compute(delayed(sum)([1, 2]), scheduler=client.get) == (3,)


def test_unpicklable_result_is_a_clear_error(client):
    future = client.submit(lambda: threading.Lock())
    with pytest.raises(Exception, match="(?i)pickle"):
        future.result(timeout=60)
    assert client.submit(len, "abc").result(timeout=60) == 3


def test_missing_module_on_workers_is_a_clear_error(client):
    def needs_module():
        import a_module_that_is_not_installed  # noqa: F401

    with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_installed"):
        client.submit(needs_module).result(timeout=60)
    assert client.submit(len, "ab").result(timeout=60) == 2


def test_ctrl_c_while_waiting_leaves_the_client_usable(client):
    slow = client.submit(time.sleep, 30)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        slow.result()
    assert time.monotonic() - started < 10
    slow.cancel()
    assert client.submit(len, "abcd").result(timeout=60) == 4


def test_executor_crash_fails_that_task_only(tmp_path):
    from conftest import assert_all_gone, cluster_processes

    def segfault():
        os.kill(os.getpid(), signal.SIGSEGV)

    cluster = rankmesh.LocalCluster(n_workers=2, threads_per_worker=1)
    try:
        with rankmesh.Client(cluster) as client:
            fine = client.map(lambda x: x + 1, range(50))
            crash = client.submit(segfault)
            with pytest.raises(Exception, match="SIGSEGV") as info:
                crash.result(timeout=120)
            assert "3 times" in str(info.value)
            assert "in segfault" in str(info.value)  # the task's own stack, from the dead executor
            assert client.gather(fine) == list(range(1, 51))
            assert client.submit(sum, range(10)).result(timeout=60) == 45
            # rankmesh local, 2 workers and 2 executors, the crashed one replaced.
            deadline = time.monotonic() + 30
            while len(processes := cluster_processes(cluster)) < 5:
                assert time.monotonic() < deadline, processes
                time.sleep(0.1)
    finally:
        cluster.close()
    assert_all_gone(processes)


def test_killed_python_leaves_no_cluster_behind(tmp_path):
    from conftest import assert_all_gone

    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys, time, rankmesh\n"
        "cluster = rankmesh.LocalCluster(n_workers=2)\n"
        "print(cluster.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    import psutil

    local = psutil.Process(int(owner.stdout.readline()))
    deadline = time.monotonic() + 30
    while len(local.children(recursive=True)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    processes = [local, *local.children(recursive=True)]
    assert len(processes) == 5
    owner.kill()
    owner.wait()
    assert_all_gone(processes)


def test_executors_that_cannot_start_fail_tasks_with_the_reason(tmp_path):
    """A worker whose Python cannot run rankmesh (not installed in the environment the
    compute nodes see, say) fails its tasks within seconds, saying why, and tries the
    executors again ever more slowly rather than thousands of times a second."""
    from rankmesh.cluster import find_binary

    python = tmp_path / "python-without-rankmesh"
    python.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'rankmesh'\" >&2\nexit 1\n"
    )
    python.chmod(0o700)
    scheduler_file = tmp_path / "scheduler.json"
    log = tmp_path / "cluster.log"
    command = [find_binary(), "local", "-n", "1", "--threads-per-worker", "2", "--python"]
    command += [str(python), "--no-dashboard", "--scheduler-file", str(scheduler_file)]
    with open(log, "w") as out:
        cluster = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and cluster.poll() is None, log.read_text()
            time.sleep(0.1)
        with rankmesh.Client(scheduler_file=str(scheduler_file)) as client:
            started = time.monotonic()
            with pytest.raises(rankmesh.TaskError, match="ExecutorCannotStart") as info:
                client.submit(abs, -1).result(timeout=60)
            said = str(info.value)
            assert "exited with status 1 before connecting" in said
            assert "No module named 'rankmesh'" in said, "what the Python itself said"
            assert "--python" in said
            assert time.monotonic() - started < 30
            time.sleep(2)
        tries = log.read_text().count("executor died")
        # Two slots, each retried after 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s: about a dozen.
        assert 6 <= tries <= 30, f"{tries} executor starts"
    finally:
        cluster.terminate()
        cluster.wait(timeout=30)


def test_executor_exit_and_memory_limit_are_reported(tmp_path):
    def exit_now():
        os._exit(1)

    def allocate(n_bytes):
        import numpy as np

        block = np.ones(n_bytes, dtype=np.uint8)
        time.sleep(2)  # long enough for the memory watch to see it
        return int(block[0])

    with (
        rankmesh.LocalCluster(n_workers=1, memory_limit="400MB") as cluster,
        rankmesh.Client(cluster) as client,
    ):
        with pytest.raises(Exception, match="exited with status 1"):
            client.submit(exit_now).result(timeout=120)
        with pytest.raises(Exception, match="memory limit"):
            client.submit(allocate, 1_000_000_000).result(timeout=120)
        assert client.submit(allocate, 1000).result(timeout=60) == 1


def test_a_departing_client_frees_the_cluster_for_others(cluster, tmp_path):
    log = tmp_path / "ran.txt"

    def record(i):
        time.sleep(0.05)
        with open(log, "a") as f:
            f.write(f"{i}\n")

    first = rankmesh.Client(cluster)
    first.map(record, range(400))  # ~10 s of work per worker
    first.close()
    with rankmesh.Client(cluster) as second:
        assert second.submit(abs, -3).result(timeout=60) == 3
    ran = len(log.read_text().splitlines()) if log.exists() else 0
    assert ran < 400, "the departed client's tasks kept running"


def test_connection_errors_are_public_and_share_a_base(cluster):
    from rankmesh import ConnectionLost, HandshakeRefused, RankmeshError

    assert issubclass(ConnectionLost, RankmeshError)
    assert issubclass(HandshakeRefused, RankmeshError)
    with pytest.raises(HandshakeRefused, match="wrong cluster token"):
        rankmesh.Client(cluster.address, token="not-the-token")
