"""`performance_report`: a self-contained HTML report of what the cluster did during a
block, as `distributed.performance_report`."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = ["performance_report"]

# Workers report their counters once a second: the report waits for the last ones.
SETTLE_S = 1.2


def _get(client: Any, path: str) -> bytes:
    if client._dashboard is None:
        raise RuntimeError(
            "performance_report needs the cluster's dashboard: connect through a scheduler "
            "file or LocalCluster of a cluster started with one (not --no-dashboard)"
        )
    base, token = client._dashboard
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


@contextlib.contextmanager
def performance_report(
    filename: str | os.PathLike = "dask-report.html", client: Any = None, **kwargs: Any
) -> Iterator[None]:
    """Writes `filename` when the block ends: the task stream, each worker's memory over
    time and the time per task prefix, from the block's start (the scheduler samples once
    a second; at the end it waits SETTLE_S for every worker's last counters). Unlike
    `distributed`, it is drawn by rankmesh's own page (no Bokeh), the file is readable by
    its owner only, and `stacklevel`, `mode` and `storage_options` are accepted and
    ignored."""
    if client is None:
        from .client import get_client

        client = get_client()
    started = json.loads(_get(client, "/json/snapshot.json"))["now_ms"]
    yield
    time.sleep(SETTLE_S)
    from ._rankmesh import write_private

    write_private(os.fspath(filename), _get(client, f"/report.html?since_ms={started}"))
