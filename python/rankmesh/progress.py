"""Progress of futures and persisted collections, as `distributed.progress`: one line in a
terminal, a bar per task prefix in a notebook (ipywidgets when installed, text otherwise).

Unlike `distributed`, the bars count the futures given (for a persisted collection, its
chunks), grouped by prefix, not every task upstream of them: the client knows the state of
what it holds, and rankmesh's scheduler runs no Python to feed more."""

from __future__ import annotations

import sys
import time
from typing import Any

from dask.utils import key_split

from .futures import Future, futures_of
from .helper_threads import start_helper_thread

__all__ = ["progress"]

BAR_WIDTH = 40


class _Tracker:
    """Which of the futures have ended, by prefix, asked of their client."""

    def __init__(self, futures: list[Future]) -> None:
        if not futures:
            raise ValueError("progress() needs futures or persisted collections")
        self.client = futures[0].client
        self.prefix_of = {f.task_id: key_split(f.key) for f in futures}
        self.futures = futures  # held, so the tasks stay wanted while watched
        self.pending = set(self.prefix_of)
        self.done: dict[str, int] = dict.fromkeys(self.prefix_of.values(), 0)
        self.erred: dict[str, int] = dict.fromkeys(self.prefix_of.values(), 0)
        self.total: dict[str, int] = dict.fromkeys(self.prefix_of.values(), 0)
        for prefix in self.prefix_of.values():
            self.total[prefix] += 1
        self.started = time.monotonic()

    def wait(self, interval: float) -> None:
        """Waits up to `interval` for tasks to end and counts those that did."""
        if not self.pending:
            return
        for task_id in self.client._wait_ids(list(self.pending), interval, "ALL"):
            self.pending.discard(task_id)
            prefix = self.prefix_of[task_id]
            if self.client._task_state(task_id) == "finished":
                self.done[prefix] += 1
            else:
                self.erred[prefix] += 1

    @property
    def finished(self) -> bool:
        return not self.pending

    def fraction(self) -> float:
        ended = len(self.prefix_of) - len(self.pending)
        return ended / len(self.prefix_of)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython()
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def _text_line(tracker: _Tracker) -> str:
    fraction = tracker.fraction()
    filled = int(BAR_WIDTH * fraction)
    elapsed = time.monotonic() - tracker.started
    erred = sum(tracker.erred.values())
    tail = f" | {erred} erred" if erred else ""
    bar = "#" * filled + " " * (BAR_WIDTH - filled)
    return f"\r[{bar}] | {fraction:4.0%} Completed | {elapsed:5.1f}s{tail}"


def _text(tracker: _Tracker, interval: float, stream: Any) -> None:
    while True:
        tracker.wait(interval)
        stream.write(_text_line(tracker))
        stream.flush()
        if tracker.finished:
            stream.write("\n")
            stream.flush()
            return


class ProgressWidget:
    """A bar per task prefix (ipywidgets), updated from a thread until every future ended;
    shown as a notebook cell's output."""

    def __init__(self, tracker: _Tracker, interval: float) -> None:
        import ipywidgets

        self.tracker = tracker
        self.bars = {
            prefix: ipywidgets.IntProgress(
                value=0, min=0, max=total, description=prefix, bar_style="info"
            )
            for prefix, total in tracker.total.items()
        }
        self.labels = {prefix: ipywidgets.Label() for prefix in self.bars}
        rows = [ipywidgets.HBox([self.bars[p], self.labels[p]]) for p in self.bars]
        self.elapsed = ipywidgets.Label()
        self.widget = ipywidgets.VBox([self.elapsed, *rows])
        self._draw()
        self.thread = start_helper_thread(self._follow, "rankmesh-progress", (interval,))

    def _draw(self) -> None:
        tracker = self.tracker
        for prefix, bar in self.bars.items():
            done, erred = tracker.done[prefix], tracker.erred[prefix]
            bar.value = done + erred
            if erred:
                bar.bar_style = "danger"
            elif bar.value == bar.max:
                bar.bar_style = "success"
            erred_text = f", {erred} erred" if erred else ""
            self.labels[prefix].value = f"{done} / {bar.max}{erred_text}"
        elapsed = time.monotonic() - tracker.started
        state = "Finished" if tracker.finished else "Computing"
        self.elapsed.value = f"{state}: {elapsed:.1f}s"

    def _follow(self, interval: float) -> None:
        while not self.tracker.finished:
            self.tracker.wait(interval)
            self._draw()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def progress(
    *futures: Any,
    notebook: bool | None = None,
    multi: bool = True,
    complete: bool = True,
    interval: float = 0.1,
    **kwargs: Any,
) -> ProgressWidget | None:
    """Shows the progress of futures (or persisted collections, or lists of them). In a
    terminal it draws one line until all ended and returns None. In a notebook it returns a
    widget with a bar per task prefix that keeps itself up to date (ipywidgets), or draws
    the line if ipywidgets is not installed. `multi` and `complete` are accepted for
    `distributed` compatibility: the widget always has a bar per prefix."""
    tracker = _Tracker(futures_of(list(futures)))
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        try:
            return ProgressWidget(tracker, interval)
        except ImportError:
            pass
    _text(tracker, interval, sys.stdout)
    return None
