"""Progress for people: one look for every bar (training, evaluation, comparisons) and a quiet mode.

:func:`rich_bars` builds the rich progress display every command uses; :class:`Progress`
shows long waits (feature extraction, classifier training, prior fitting) as bars on a
console, as text lines, or not at all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any


def rich_bars(console, *after: str, head: str = "{task.description}", remaining: bool = True, **options: Any):
    """Return a rich ``Progress``: ``head``, bar, done/total, elapsed, time left, then the ``after`` text columns.

    ``options`` go to ``rich.progress.Progress`` (``transient``, ``disable``, ...).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    columns = [TextColumn(head), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns += [TextColumn("left"), TimeRemainingColumn()]
    columns += [TextColumn(text) for text in after]
    return Bars(*columns, console=console, **options)



class Progress:
    """Progress for people on long waits: text lines and rich progress bars; quiet without an output.

    Args:
        console: a rich Console to draw bars on (``None``: no bars).
        lines: where text lines go when there is no console (e.g. ``print``); ``None``: nowhere.

    A ``Progress`` is itself a ``log(text)`` callable, so it can be handed to code that
    only prints lines; code that knows it calls :meth:`task` or :meth:`track` for a bar
    with a description, a count and the estimated time left. Bars share one live display,
    so tasks may nest (a classifier trained while features wait).
    """

    def __init__(self, console=None, *, lines: Callable[[str], None] | None = None):
        self.console = console
        self.lines = lines
        self._bars = None
        self._open = 0

    @property
    def quiet(self) -> bool:
        return self.console is None and self.lines is None

    def __call__(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        elif self.lines is not None:
            self.lines(text)

    def _start_bars(self):
        from rich.errors import LiveError

        if self._bars is None:
            bars = rich_bars(self.console)
            try:
                bars.start()
            except LiveError:  # another live display that cannot nest (older rich): lines only
                return None
            self._bars = bars
        return self._bars

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Show a bar while the block runs; the block calls the yielded ``advance(n=1)``."""

        def no_bar(n: int = 1) -> None:
            pass

        if self.quiet:
            yield no_bar
            return
        bars = self._start_bars() if self.console is not None else None
        if bars is None:
            start = time.perf_counter()
            self(f"{description} ...")
            yield no_bar
            self(f"{description}: done in {time.perf_counter() - start:.1f} s")
            return
        self._open += 1
        task_id = bars.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bars.advance(task_id, n)

        try:
            yield advance
            bars.update(task_id, completed=bars.tasks[task_id].total or 0)
        finally:
            self._open -= 1
            if self._open == 0:
                bars.stop()
                self._bars = None

    def track(self, items: Iterable, description: str, total: int | None = None) -> Iterator:
        """Yield from ``items`` with a bar that advances once per item."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        with self.task(description, total) as advance:
            for item in items:
                yield item
                advance(1)


def as_progress(target) -> Progress:
    """Make a :class:`Progress` of ``None`` (quiet), a rich Console, a ``log(text)`` callable or a Progress."""
    if target is None:
        return Progress()
    if isinstance(target, Progress):
        return target
    if hasattr(target, "print") and hasattr(target, "is_terminal"):  # a rich Console
        return Progress(target)
    if callable(target):
        return Progress(lines=target)
    raise TypeError(f"progress must be None, a rich Console or a callable, not {type(target).__name__}")


def progress_task(log, description: str, total: int | None):
    """``log.task(...)`` when ``log`` is a :class:`Progress`; a line and a no-op otherwise (plain callables)."""
    if isinstance(log, Progress):
        return log.task(description, total)
    if log is not None:
        log(f"{description} ...")
    return contextlib.nullcontext(lambda n=1: None)
