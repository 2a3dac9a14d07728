"""A `distributed.LocalCluster` in a process of its own, for the plugin's distributed mode.

The plugin does not start the cluster inside the pytest process: `distributed.utils_test`
(used by some of Dask's tests) terminates every multiprocessing child of the test process
and fails the test that "leaked" them, which would be the session cluster's workers. Run
as a script, this starts the cluster, prints ``ADDRESS <scheduler address>`` and runs until
its standard input closes or it gets SIGTERM; then it closes the cluster and exits.
"""

from __future__ import annotations

import signal
import sys
import threading


def main() -> None:
    import distributed

    n_workers, threads = int(sys.argv[1]), int(sys.argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=None,
    ) as cluster:
        print(f"ADDRESS {cluster.scheduler_address}", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
