"""Worker plugins (`Client.register_plugin`), set up in every executor process.

rankmesh's workers are not Python: a plugin's `setup(worker)` runs in each executor
process of each worker (one per thread), when it is registered and in every executor that
starts later (a replacement after a crash or a memory restart included), before that
executor runs a task. `worker` is the `WorkerContext` of `get_worker()`, not a
`distributed.Worker`. A plugin whose setup raises is reported on the executor's standard
error and skipped; the tasks still run.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback
from typing import Any

__all__ = ["UploadFile", "WorkerPlugin"]


class WorkerPlugin:
    """Subclass and override `setup` and `teardown`, as `distributed.WorkerPlugin`."""

    name: str | None = None

    def setup(self, worker: Any) -> None:
        pass

    def teardown(self, worker: Any) -> None:
        pass


class UploadFile(WorkerPlugin):
    """`Client.upload_file`: a .py, .zip, .egg or .whl file written into the worker's
    private folder and put on each executor's import path (with `load`, a module is
    imported, or reloaded if it was already)."""

    def __init__(self, filename: str | os.PathLike, load: bool = True) -> None:
        self.filename = os.path.basename(os.fspath(filename))
        self.load = load
        with open(filename, "rb") as f:
            self.data = f.read()
        self.name = f"upload-file-{self.filename}"

    def setup(self, worker: Any) -> None:
        folder = os.path.join(os.environ.get("RANKMESH_SHM_DIR", tempfile.gettempdir()), "code")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, self.filename)
        # The worker's executors all write it: each its own file, renamed into place.
        fd, partial = tempfile.mkstemp(dir=folder, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            f.write(self.data)
        os.replace(partial, path)
        entry = folder if self.filename.endswith(".py") else path
        if entry not in sys.path:
            sys.path.insert(0, entry)
        importlib.invalidate_caches()
        if self.load and self.filename.endswith(".py"):
            module_name = self.filename[: -len(".py")]
            module = sys.modules.get(module_name)
            if module is not None:
                importlib.reload(module)
            else:
                importlib.import_module(module_name)


class PluginHost:
    """The plugins set up in this executor process, by name."""

    def __init__(self) -> None:
        self._plugins: dict[str, Any] = {}

    def update(self, setup: list[tuple[str, bytes]], teardown: list[str]) -> None:
        import pickle

        from .worker import get_worker

        worker = get_worker()
        for name in teardown:
            self._teardown(name, worker)
        for name, pickled in setup:
            self._teardown(name, worker)  # one of the same name is replaced
            try:
                plugin = pickle.loads(pickled)
                setup_plugin = getattr(plugin, "setup", None)
                if setup_plugin is not None:
                    setup_plugin(worker=worker)
                self._plugins[name] = plugin
            except Exception:  # noqa: BLE001 - reported, and the executor goes on
                print(f"rankmesh: worker plugin {name!r} failed to set up:", file=sys.stderr)
                traceback.print_exc()

    def _teardown(self, name: str, worker: Any) -> None:
        plugin = self._plugins.pop(name, None)
        teardown = getattr(plugin, "teardown", None)
        if teardown is None:
            return
        try:
            teardown(worker=worker)
        except Exception:  # noqa: BLE001 - reported, and the executor goes on
            print(f"rankmesh: worker plugin {name!r} failed to tear down:", file=sys.stderr)
            traceback.print_exc()
