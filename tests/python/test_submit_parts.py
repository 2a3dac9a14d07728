"""A graph bigger than one submit part (about 4 MiB) goes to the scheduler in parts, which
run as they arrive: a result of an early part that only a later part uses must survive
until that part is in (before protocol 21 it could be forgotten first, and the later part
was rejected as naming an unknown task). Whether a leaf finishes before the next part
arrives is a race here; the scheduler's unit tests pin the order down. This checks the
parts end to end through the real client."""

import dask
from dask import delayed

BLOB = 200_000  # bytes each leaf carries in its payload: 120 leaves make 5 parts or more
LEAVES = 120


def checksum(blob: bytes, salt: int) -> int:
    return sum(blob[::997]) + salt


def add(values) -> int:
    return sum(values)


def graph():
    leaves = [delayed(checksum)(bytes([i % 251]) * BLOB, i) for i in range(LEAVES)]
    pairs = [delayed(add)(leaves[i : i + 2]) for i in range(0, LEAVES, 2)]
    return delayed(add)(pairs)


def test_a_graph_sent_in_parts_gives_the_threaded_result(client):
    expected = dask.compute(graph(), scheduler="threads")[0]
    for _ in range(3):
        assert client.compute(graph()).result(timeout=120) == expected
