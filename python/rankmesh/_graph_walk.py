"""The depth-first order in which both the client submits a Dask graph and an executor
runs a fused task's inner graph: each key after its dependencies, one branch finished
before the next is started (what keeps memory low without dask.order)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence


def depth_first(
    outputs: Sequence[Hashable], dependencies: Callable[[Hashable], Iterable[Hashable]]
) -> list[Hashable]:
    """The keys reachable from `outputs` through `dependencies(key)`, each after those."""
    order: list[Hashable] = []
    entered: set[Hashable] = set()
    stack: list[tuple[Hashable, bool]] = [(key, False) for key in reversed(outputs)]
    while stack:
        key, children_done = stack.pop()
        if children_done:
            order.append(key)
            continue
        if key in entered:
            continue
        entered.add(key)
        stack.append((key, True))
        stack.extend((dep, False) for dep in dependencies(key) if dep not in entered)
    return order
