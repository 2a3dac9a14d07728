"""Run a function on a module right after its first import, or at once if it is loaded.

rankmesh adjusts a few third-party modules (see `in_memory_targets`) without importing
them itself: executors that never touch Dask arrays must not pay for importing them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

Hook = Callable[[ModuleType], None]

_pending: dict[str, list[Hook]] = {}


def when_imported(name: str, hook: Hook) -> None:
    """Calls hook(module) once `name` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    if not any(isinstance(finder, _HookFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookFinder())
    _pending.setdefault(name, []).append(hook)


class _HookFinder(importlib.abc.MetaPathFinder):
    """Finds hooked modules with the finders after it and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 - importlib's
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


class _HookedLoader(importlib.abc.Loader):
    """The module's own loader, then its hooks; everything else is the original's."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in _pending.pop(self._name, []):
            hook(module)

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)
