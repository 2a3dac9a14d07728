"""An executor reports results of short tasks together, and none waits behind a long task:
what a task made reaches the client while the executor runs the next one."""

import os
import time

import rankmesh


def step(kind: str, marker: str) -> bool:
    """ "quick": returns at once; "wait": runs until `marker` exists (at most 30 s) and
    says whether it came."""
    if kind == "quick":
        return True
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(marker):
            return True
        time.sleep(0.01)
    return False


def test_a_result_reaches_the_client_while_its_executor_runs_a_long_task(tmp_path):
    marker = str(tmp_path / "seen")
    with (
        rankmesh.LocalCluster(n_workers=1, threads_per_worker=1) as cluster,
        rankmesh.Client(cluster) as client,
    ):
        # Once the worker has seen how short these tasks are, it hands its executor
        # several at a time: in this order, one submit, the long task behind the first.
        assert client.gather(client.map(step, ["quick"] * 10, [marker] * 10)) == [True] * 10
        first, long_task, last = client.map(step, ["quick", "wait", "quick"], [marker] * 3)
        assert first.result(timeout=20) is True, "the first result came while the next ran"
        assert not long_task.done()
        open(marker, "w").close()
        assert long_task.result(timeout=60) is True, "it saw the marker, made after"
        assert last.result(timeout=60) is True
        # Many short tasks: every result comes, whether reported alone or together.
        futures = client.map(step, ["quick"] * 2000, [marker] * 2000)
        assert client.gather(futures) == [True] * 2000
