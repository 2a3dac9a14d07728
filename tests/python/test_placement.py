"""`workers=`: tasks run only where the caller says, and fail clearly where that cannot be."""

import os

import numpy as np
import pytest
from rankmesh.errors import TaskError


def worker_pid(*_):
    return os.getppid()  # an executor's parent is its worker


def array_sum(x):
    return float(x.sum())


def test_restricted_tasks_run_on_the_named_worker_and_fetch_inputs_there(client):
    first, second = client.workers()
    for target, spec in [(first, first["id"]), (second, second["data_address"])]:
        pids = client.gather(client.map(worker_pid, range(20), workers=spec))
        assert set(pids) == {target["pid"]}
    # Made on one worker, summed on the other: the input crosses between them.
    made = client.submit(np.arange, 1_000_000, dtype=np.float64, workers=[first])
    total = client.submit(array_sum, made, workers=second["id"])
    where = client.submit(worker_pid, total, workers=second["id"])
    assert total.result(timeout=60) == float(np.arange(1_000_000).sum())
    assert where.result(timeout=60) == second["pid"]


def test_a_task_restricted_to_no_connected_worker_fails_instead_of_waiting(client):
    future = client.submit(worker_pid, workers=[10_000])
    with pytest.raises(TaskError, match="NoWorkerError") as raised:
        future.result(timeout=30)
    assert "[10000]" in raised.value.message
    with pytest.raises(ValueError, match="no worker at 'tcp://192.0.2.1:1'"):
        client.submit(worker_pid, workers="tcp://192.0.2.1:1")
    with pytest.raises(TypeError, match="workers="):
        client.submit(worker_pid, workers=[1.5])
