"""Cluster fixtures: one LocalCluster per test module keeps the suite fast; tests that
break workers on purpose start their own."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))  # the main job's pipeline, shared with the bench


@pytest.fixture(scope="module")
def cluster():
    import rankmesh

    with rankmesh.LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        yield cluster


@pytest.fixture()
def client(cluster):
    import rankmesh

    with rankmesh.Client(cluster) as client:
        yield client


def cluster_processes(cluster) -> list[psutil.Process]:
    """`rankmesh local` and everything below it: workers and their executors."""
    root = psutil.Process(cluster.pid)
    return [root, *root.children(recursive=True)]


def cluster_workers(cluster) -> list[psutil.Process]:
    """The workers of a LocalCluster: `rankmesh local`'s own children. (Not every process
    below it named rankmesh: an executor being started is one until its exec.)"""
    return [p for p in psutil.Process(cluster.pid).children() if p.name() == "rankmesh"]


def assert_all_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    assert not leftovers, f"processes left behind: {leftovers}"


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` (made here) with mount `options` while in the block: a
    tiny disk that fills, a site's shared memory of huge pages."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def pytest_configure(config):
    # Executors are started with this interpreter; keep stray site configuration out.
    os.environ.setdefault("RANKMESH_LOG", "warn")


_INSTALL_TESTS = pytest.StashKey()


def _is_install_test(item) -> bool:
    return item.path.name == "test_install.py"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    # The install tests wait on cold cargo builds as a second user: run them last, so that
    # the builds (started below) compile while the other tests run.
    items.sort(key=_is_install_test)


def pytest_collection_finish(session):
    install = next((item for item in session.items if _is_install_test(item)), None)
    if install is not None and len(session.items) > 1:
        session.config.stash[_INSTALL_TESTS] = install.module
        install.module.Builds.start()


def pytest_sessionfinish(session):
    install = session.config.stash.get(_INSTALL_TESTS, None)
    if install is not None:
        install.Builds.stop()
