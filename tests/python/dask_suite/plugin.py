"""pytest plugin: Dask's own tests with every computation on one cluster.

Load it from the repository root with ``python -m pytest -p tests.python.dask_suite.plugin``
(``-m`` puts the current folder on sys.path, so ``tests.python.dask_suite`` imports as a
namespace package) and point pytest at Dask's test modules in the installed package::

    python -m pytest -p tests.python.dask_suite.plugin --dask-suite=rankmesh \\
        -p no:cacheprovider .venv/lib/python3.11/site-packages/dask/tests/test_delayed.py

``--dask-suite`` (or $DASK_SUITE_SYSTEM) is ``rankmesh`` (the default: a
`rankmesh.LocalCluster`, 2 workers of 1 thread) or ``distributed`` (a
`distributed.LocalCluster`, 2 worker processes of 1 thread). One cluster serves the whole
session; it is closed at the end, killed if it has not stopped within
``--dask-suite-close-timeout`` seconds.

Routing. Dask picks a scheduler in `dask.base.get_scheduler`, called by compute, persist and
compute_as_if_collection. The plugin replaces it, so that no argument, configuration or
collection default (``scheduler="sync"``, as `dask.array.utils.assert_eq` passes,
"threads", "processes", an Executor, `dask.get`, `dask.threaded.get`...) chooses anything
but the cluster. It lets through only what it cannot route without changing what a test
means, and reports it instead of skipping it:

- a scheduler *function* of the test's own (``scheduler=my_get``), or a client of another
  cluster the test started: the test usually checks that its function or cluster was
  used; listed as the test's "own scheduler";
- Dask's local schedulers called directly (``dask.get(dsk, keys)``, a local callback):
  they all run `dask.local.get_async`, which the plugin counts; listed as "local scheduler".

The scheduler the plugin hands out is the cluster client's own bound ``get`` (the client is
a subclass that counts), so code that looks at its owner behaves as for a user who made
that client the default: dask.base.persist calls the client's ``persist``, and
`dask.utils.get_scheduler_lock` (``store(lock=True)``, ``to_zarr(mode="w")``) answers what
Dask, and rankmesh's hooks into it if the installed rankmesh has them, answer for it.
`distributed` mode makes its client the default (``set_as_default=True``); rankmesh mode
calls ``Client.as_default()`` (its scheduler and the task-based rechunk and shuffle).

Every computation that reaches the cluster is counted (`get` and `persist` separately);
the terminal summary prints the counts, so a routing failure shows as a zero. With
``--dask-suite-report=PATH`` (or $DASK_SUITE_REPORT) the plugin also writes a JSON report:
per test its outcome, the first line of its error, and its routed and local computations.

Unless a timeout is given (``--timeout``, $PYTEST_TIMEOUT or an ini file), each test gets
``DEFAULT_TIMEOUT`` seconds from pytest-timeout, so a hang fails one test, not the run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

SYSTEMS = ("rankmesh", "distributed")
DEFAULT_TIMEOUT = 180
N_WORKERS = 2
THREADS_PER_WORKER = 1

# Markers Dask's own pytest configuration (not installed with the package) declares.
DASK_MARKERS = {
    "gpu": "needs a GPU",
    "network": "needs the network",
    "slow": "slow",
    "flaky": "flaky (pytest-rerunfailures)",
    "skip_with_pyarrow_strings": "skipped with pyarrow strings",
    "xfail_with_pyarrow_strings": "xfailed with pyarrow strings",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dask-suite", "Dask's tests on a cluster (tests/python/dask_suite)")
    group.addoption(
        "--dask-suite",
        dest="dask_suite_system",
        choices=SYSTEMS,
        default=None,
        help="where computations go: rankmesh (default) or distributed; also $DASK_SUITE_SYSTEM",
    )
    group.addoption(
        "--dask-suite-report",
        dest="dask_suite_report",
        default=None,
        help="write a JSON report (per test: outcome, error, routed computations); "
        "also $DASK_SUITE_REPORT",
    )
    group.addoption(
        "--dask-suite-close-timeout",
        dest="dask_suite_close_timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the cluster to close before killing it (default 60)",
    )


# ------------------------------------------------------------------------------ state


class _Suite:
    """What the session routed and where: one instance, `_SUITE`."""

    def __init__(self, system: str) -> None:
        self.system = system
        self.lock = threading.Lock()
        self.cluster: Any = None
        self.client: Any = None  # a counting_client() instance while the cluster is up
        self.address = ""
        self.start_s = 0.0
        self.restarts: list[str] = []
        self.tests: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] = self._record("<outside tests>")
        self.outside = self.current
        self.gets = 0
        self.persists = 0

    @staticmethod
    def _record(nodeid: str) -> dict[str, Any]:
        return {
            "nodeid": nodeid,
            "outcome": None,
            "message": "",
            "duration": 0.0,
            "routed": 0,
            "local": Counter(),
            "custom": [],
        }

    def count(self, kind: str) -> None:
        with self.lock:
            if kind == "get":
                self.gets += 1
            else:
                self.persists += 1
            self.current["routed"] += 1

    def enter(self, nodeid: str) -> None:
        self.current = self.tests.setdefault(nodeid, self._record(nodeid))

    def leave(self) -> None:
        self.current = self.outside


_SUITE: _Suite | None = None


def counting_client(base: type, suite: _Suite) -> type:
    """A subclass of the system's Client whose `get` and `persist` count what reaches the
    cluster. The routed scheduler is this client's own bound `get`, so whatever looks at
    its owner (dask.base.persist for `persist`, dask.utils.get_scheduler_lock and
    rankmesh's own recognition of its client for the lock to use) sees a real client."""

    class CountingClient(base):
        def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
            suite.count("get")
            return super().get(dsk, keys, **kwargs)

        def persist(self, collections: Any, *args: Any, **kwargs: Any) -> Any:
            suite.count("persist")
            return super().persist(collections, *args, **kwargs)

    CountingClient.__qualname__ = f"Counting{base.__qualname__}"
    CountingClient.__module__ = __name__
    return CountingClient


# ---------------------------------------------------------------------------- patches

_ORIGINAL: dict[str, Any] = {}


def _replace_everywhere(original: Any, replacement: Any, name: str) -> None:
    """Rebinds `name` in every loaded dask module that holds `original` (modules imported
    later take the patched attribute of the defining module)."""
    for module in list(sys.modules.values()):
        module_name = getattr(module, "__name__", "") or ""
        if not (module_name == "dask" or module_name.startswith("dask.")):
            continue
        if getattr(module, name, None) is original:
            setattr(module, name, replacement)


def _install_patches() -> None:
    import dask.base
    import dask.local
    import dask.multiprocessing
    import dask.threaded
    import dask.utils

    if _ORIGINAL:
        return
    original_get_scheduler = dask.base.get_scheduler
    original_get_async = dask.local.get_async
    _ORIGINAL.update(get_scheduler=original_get_scheduler, get_async=original_get_async)
    named = dask.base.named_schedulers
    local_gets = set(map(id, named.values())) | {id(dask.get), id(dask.local.get_sync)}

    def get_scheduler(get=None, scheduler=None, collections=None, cls=None):
        suite = _SUITE
        client = suite.client if suite is not None else None
        if client is None or get:
            return original_get_scheduler(get, scheduler, collections, cls)
        if scheduler is None:
            return client.get
        if isinstance(scheduler, str):
            name = scheduler.lower()
            if name in named or name in ("dask.distributed", "distributed"):
                return client.get
            return original_get_scheduler(get, scheduler, collections, cls)  # raises
        if callable(scheduler):
            owner = getattr(scheduler, "__self__", None)
            if id(scheduler) in local_gets or owner is client:
                return client.get
            if type(scheduler).__name__ == "partial" and id(scheduler.func) in local_gets:
                return client.get
            with suite.lock:
                suite.current["custom"].append(getattr(scheduler, "__qualname__", repr(scheduler)))
            return scheduler
        if "Client" in type(scheduler).__name__ and scheduler is not client:
            # Another cluster's client, which the test started: its data lives there.
            with suite.lock:
                suite.current["custom"].append(type(scheduler).__qualname__)
            return original_get_scheduler(get, scheduler, collections, cls)
        # An Executor, or this cluster's client.
        return client.get

    def get_async(*args: Any, **kwargs: Any) -> Any:
        suite = _SUITE
        if suite is not None:
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            with suite.lock:
                suite.current["local"][caller] += 1
        return original_get_async(*args, **kwargs)

    _replace_everywhere(original_get_scheduler, get_scheduler, "get_scheduler")
    _replace_everywhere(original_get_async, get_async, "get_async")


# --------------------------------------------------------------------------- clusters


class _DistributedCluster:
    """distributed_cluster.py run as a child process: the scheduler and its workers live
    outside the pytest process (see that module for why)."""

    def __init__(self, n_workers: int, threads: int, timeout: float = 120) -> None:
        import subprocess

        from rankmesh.cluster import _die_with_parent

        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_cluster.py")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen(
            [sys.executable, script, str(n_workers), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self._process.pid
        self.scheduler_address = ""
        found = threading.Event()

        def read() -> None:
            assert self._process.stdout is not None
            for line in self._process.stdout:
                if line.startswith("ADDRESS "):
                    self.scheduler_address = line.split()[1]
                    found.set()
                else:
                    sys.stdout.write(line)
            found.set()

        threading.Thread(target=read, name="dask-suite-cluster-stdout", daemon=True).start()
        found.wait(timeout)
        if not self.scheduler_address:
            self.close()
            raise RuntimeError(f"the distributed cluster did not start within {timeout} s")

    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self, timeout: float = 30) -> None:
        import subprocess

        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the script closes the cluster and exits
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def _start_cluster(suite: _Suite) -> None:
    started = time.monotonic()
    if suite.system == "rankmesh":
        os.environ.setdefault("RANKMESH_LOG", "warn")
        import rankmesh

        suite.cluster = rankmesh.LocalCluster(
            n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER
        )
        # As a rankmesh user would: its scheduler, and the task-based rechunk and shuffle.
        suite.client = counting_client(rankmesh.Client, suite)(suite.cluster).as_default()
        suite.address = suite.client.address
    else:
        import distributed

        suite.cluster = _DistributedCluster(N_WORKERS, THREADS_PER_WORKER)
        client_class = counting_client(distributed.Client, suite)
        suite.client = client_class(suite.cluster.scheduler_address, set_as_default=True)
        suite.client.wait_for_workers(N_WORKERS, timeout=60)
        suite.address = suite.cluster.scheduler_address
    suite.start_s = time.monotonic() - started


def _cluster_alive(suite: _Suite) -> bool:
    if suite.cluster is None:
        return False
    if suite.system == "rankmesh":
        return suite.cluster._process.poll() is None
    return suite.cluster.alive() and suite.client.status == "running"


def _close_cluster(suite: _Suite, deadline_s: float) -> str:
    """Closes client and cluster within deadline_s, else kills the cluster's processes.
    Returns what happened."""
    if suite.cluster is None:
        return "no cluster"
    import psutil

    client, cluster = suite.client, suite.cluster
    suite.client = suite.cluster = None
    try:
        root = psutil.Process(cluster.pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    errors: list[str] = []

    def close() -> None:
        for thing in (client, cluster):
            try:
                if thing is client and suite.system == "distributed":
                    thing.close(timeout=max(1, int(deadline_s / 3)))
                else:
                    thing.close()
            except BaseException as error:  # reported below
                errors.append(f"{type(thing).__name__}.close: {error!r}")

    started = time.monotonic()
    closer = threading.Thread(target=close, name="dask-suite-close", daemon=True)
    closer.start()
    closer.join(deadline_s)
    # Workers and executors leave moments after the process that started them.
    left = max(1.0, deadline_s - (time.monotonic() - started))
    _, alive = psutil.wait_procs(processes, timeout=min(left, 15.0))
    if closer.is_alive() or alive:
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        what = "close timed out" if closer.is_alive() else "close left processes"
        return f"{what}: killed {len(alive)} processes"
    return "closed" + (f" with errors: {errors}" if errors else "")


# ------------------------------------------------------------------------------ hooks


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global _SUITE
    for name, description in DASK_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description} (Dask's marker)")
    system = config.getoption("dask_suite_system") or os.environ.get(
        "DASK_SUITE_SYSTEM", "rankmesh"
    )
    if system not in SYSTEMS:
        raise pytest.UsageError(f"--dask-suite / DASK_SUITE_SYSTEM: {system!r} not in {SYSTEMS}")
    if (
        config.getoption("timeout", None) is None
        and not os.environ.get("PYTEST_TIMEOUT")
        and not config.getini("timeout")
    ):
        config.option.timeout = DEFAULT_TIMEOUT
    _SUITE = _Suite(system)
    _install_patches()


def pytest_sessionstart(session: pytest.Session) -> None:
    suite = _SUITE
    if suite is None or session.config.option.collectonly:
        return
    try:
        _start_cluster(suite)
    except Exception as error:
        pytest.exit(f"dask-suite: could not start a {suite.system} cluster: {error!r}", 3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    suite = _SUITE
    if suite is None or suite.client is None:
        return (yield)
    if not _cluster_alive(suite):
        # Reported in the summary; the rest of the run still means something.
        suite.restarts.append(item.nodeid)
        _close_cluster(suite, 10)
        _start_cluster(suite)
    suite.enter(item.nodeid)
    try:
        return (yield)
    finally:
        suite.leave()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    suite = _SUITE
    if suite is None:
        return
    record = suite.tests.setdefault(report.nodeid, suite._record(report.nodeid))
    record["duration"] += report.duration
    xfail = hasattr(report, "wasxfail")
    outcome = None
    if report.when == "call":
        if report.passed:
            outcome = "xpassed" if xfail else "passed"
        elif report.skipped:
            outcome = "xfailed" if xfail else "skipped"
        else:
            outcome = "failed"
    elif report.failed:
        outcome = "error"
    elif report.skipped and report.when == "setup":
        outcome = "xfailed" if xfail else "skipped"
    if outcome is None or record["outcome"] in ("failed", "error"):
        return
    record["outcome"] = outcome
    if outcome in ("failed", "error", "skipped"):
        record["message"] = _first_line(report)


def _first_line(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return str(longrepr[2]).splitlines()[0] if longrepr[2] else ""
    if hasattr(longrepr, "errorstring"):  # a fixture that could not be found or set up
        lines = str(longrepr.errorstring).strip().splitlines()
        return lines[0] if lines else ""
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        lines = crash.message.splitlines()
        return lines[0] if lines else ""
    text = str(longrepr).strip().splitlines()
    return text[-1] if text else ""


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config):
    suite = _SUITE
    if suite is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"dask-suite: {suite.system}")
    ran = [r for r in suite.tests.values() if r["outcome"] is not None]
    routed_tests = [r for r in ran if r["routed"]]
    write(
        f"cluster {suite.address or '(none)'} ({N_WORKERS} workers x {THREADS_PER_WORKER} "
        f"thread, started in {suite.start_s:.1f} s)"
    )
    write(
        f"routed computations: {suite.gets + suite.persists} "
        f"(get: {suite.gets}, persist: {suite.persists}) in {len(routed_tests)} of "
        f"{len(ran)} tests; outside tests: {suite.outside['routed']}"
    )
    local = [r for r in ran if r["local"]]
    write(f"not routed, a local scheduler ran (dask.local.get_async): {len(local)} tests")
    for record in local:
        callers = ", ".join(f"{name} x{n}" for name, n in sorted(record["local"].items()))
        write(f"  {record['nodeid']} [{record['outcome']}]: {callers}")
    custom = [r for r in ran if r["custom"]]
    write(f"not routed, the test's own scheduler function: {len(custom)} tests")
    for record in custom:
        names = ", ".join(sorted(set(record["custom"])))
        write(f"  {record['nodeid']} [{record['outcome']}]: {names}")
    if suite.restarts:
        write(f"cluster found dead and restarted before: {suite.restarts}", red=True)
    if suite.gets + suite.persists == 0 and ran:
        write("NO computation reached the cluster: routing is broken", red=True)
    _write_report(config, suite)


def _write_report(config: pytest.Config, suite: _Suite) -> None:
    path = config.getoption("dask_suite_report") or os.environ.get("DASK_SUITE_REPORT")
    if not path:
        return
    tests = {}
    for nodeid, record in suite.tests.items():
        tests[nodeid] = {**record, "local": dict(record["local"])}
    report = {
        "system": suite.system,
        "address": suite.address,
        "routed": suite.gets + suite.persists,
        "routed_get": suite.gets,
        "routed_persist": suite.persists,
        "routed_outside_tests": suite.outside["routed"],
        "restarts": suite.restarts,
        "tests": tests,
    }
    with open(path, "w") as file:
        json.dump(report, file, indent=1, default=str)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _SUITE
    suite = _SUITE
    if suite is None:
        return
    outcome = _close_cluster(suite, config.getoption("dask_suite_close_timeout"))
    if suite.address:
        print(f"dask-suite: {suite.system} cluster {outcome}", file=sys.stderr)
    _SUITE = None
