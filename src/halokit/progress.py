"""Progress bars (rich) that are silent on non-main processes, and plain log lines where no bar can be drawn."""

from __future__ import annotations

import contextlib
import time
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

BAR_WIDTH = 30


def make_progress(console: Console | None = None) -> Progress:
    """A bar with count, elapsed time, ETA and a free-text field ``info`` for live metrics."""
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
                    TimeElapsedColumn(),
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


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
    """The training loop's progress: a live bar where rich can redraw (a terminal, a notebook); elsewhere (a
    log file, CI, a batch job's output, a dumb terminal) one plain line per logged step, because there rich
    draws a bar only once, when it stops, so a long run would print nothing until it ends.

    ``update(step, info)`` at each logged step (``info``: the metrics in brief), ``advance(step)`` after
    every step. A line reads ``kto step 40/200 (20 %) 0:01:10 elapsed, ETA 0:04:40 | loss=0.4912 ...``;
    the ETA extrapolates the steps this process has run (a resumed run's earlier steps do not count).
    """

    def __init__(self, console: Console, description: str, total: int, completed: int = 0):
        self.console, self.description, self.total = console, description, total
        self.first, self.started = completed, time.perf_counter()
        self.bar = make_progress(console) if console.is_interactive or console.is_jupyter else None
        self.task = self.bar.add_task(description, total=total, completed=completed, info="") if self.bar else None

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:  # cut the metrics to the terminal's width, or rich squeezes the bar out instead
            # description, bar, "n/total", elapsed and ETA clocks, "ETA", and a space after each column
            fixed = len(self.description) + BAR_WIDTH + 2 * len(str(self.total)) + 1 + 7 + 3 + 7 + 7
            room = max(12, self.console.width - fixed)
            self.bar.update(self.task, info=info if len(info) <= room else info[:room - 1] + "…")
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.first
        eta = _clock(elapsed / done * (self.total - step)) if done > 0 else "?"
        self.console.print(f"{self.description} step {step}/{self.total} ({100 * step // max(self.total, 1)} %) "
                           f"{_clock(elapsed)} elapsed, ETA {eta} | {info}")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
