"""Progress bars (rich) that are silent on non-main processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(console: Console | None = None) -> Progress:
    """A bar with count, elapsed time, ETA and a free-text field ``info`` for live metrics."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True,
                 console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """``with progress_bar("x", total=n) as advance: advance(1)``; a no-op when not ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    with make_progress(console) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda n: bar.advance(task, n)
