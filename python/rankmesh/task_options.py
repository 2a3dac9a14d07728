"""What `submit`'s keywords and Dask's annotations (`dask.annotate`) ask of tasks, in the
form the scheduler takes: a priority, worker restrictions, retries, resources.

Dask's priorities run higher first; rankmesh's scheduler runs the lowest value first, so a
user priority p becomes -p in the high bits and the task's order among equals (Dask's
`order`, or its place in a `map`) stays in the low bits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

Key = Hashable
# Worker ids for a `workers=` value (ids, addresses, host names).
WorkerIds = Callable[[Any], list[int]]

_ORDER_BITS = 32
SUPPORTED = ("priority", "workers", "retries", "allow_other_workers", "resources")
# (retries, allow_other_workers, resources) as the native client takes them
Options = tuple[int, bool, list[tuple[str, float]]]


def refuse_actors(actor: bool) -> None:
    """An error now rather than a silently ignored request."""
    if actor:
        raise NotImplementedError("rankmesh has no actors; use a future holding the object")


def resource_pairs(resources: Any) -> list[tuple[str, float]]:
    """{"GPU": 1, "MEM": 8e9} as the scheduler takes it; anything else is a clear error."""
    if not resources:
        return []
    if not isinstance(resources, dict):
        raise TypeError(f"resources must be a dict of name to amount, not {resources!r}")
    pairs = []
    for name, amount in resources.items():
        if not isinstance(amount, int | float) or amount < 0:
            raise ValueError(f"resources[{name!r}] must be a number of 0 or more, not {amount!r}")
        pairs.append((str(name), float(amount)))
    return pairs


def priority(user_priority: Any, order: int) -> int:
    """The scheduler's priority for a task of `user_priority` (higher runs first, as in
    Dask) at position `order` among tasks of equal user priority."""
    return -int(user_priority or 0) * (1 << _ORDER_BITS) + order


class TaskAnnotations:
    """Per-key options from Dask's annotations by type ({"retries": {key: 2}, ...}), merged
    over defaults (submit's keywords)."""

    def __init__(
        self,
        by_type: Mapping[str, Mapping[Key, Any]],
        worker_ids: WorkerIds,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        defaults = dict(defaults or {})
        self._by_type = {name: by_type[name] for name in SUPPORTED if by_type.get(name)}
        self._defaults = {name: defaults[name] for name in SUPPORTED if defaults.get(name)}
        self._worker_ids = worker_ids
        self._resolved: dict[Any, list[int]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_type or self._defaults)

    def _get(self, name: str, key: Key) -> Any:
        values = self._by_type.get(name)
        if values is not None and key in values:
            return values[key]
        return self._defaults.get(name)

    def priority(self, key: Key, order: int) -> int:
        return priority(self._get("priority", key), order)

    def restriction(self, key: Key) -> list[int] | None:
        workers = self._get("workers", key)
        if not workers:
            return None
        cache_key = workers if isinstance(workers, Hashable) else repr(workers)
        ids = self._resolved.get(cache_key)
        if ids is None:
            ids = self._resolved[cache_key] = self._worker_ids(workers)
        return ids

    def options(self, key: Key) -> Options | None:
        """(retries, allow_other_workers, resources) where any is set, else None."""
        retries = int(self._get("retries", key) or 0)
        loose = bool(self._get("allow_other_workers", key))
        resources = resource_pairs(self._get("resources", key))
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        return (retries, loose, resources) if retries or loose or resources else None


def annotations_of(dsk: Any) -> dict[str, dict[Key, Any]]:
    """Annotations by type of what `dask.compute` hands a scheduler: an expression, a
    HighLevelGraph, or a plain graph (none)."""
    annotations = getattr(dsk, "__dask_annotations__", None)
    if callable(annotations):
        return dict(annotations())
    return {}
