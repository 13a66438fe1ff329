"""Progress bars for `openkd generate`: rows/s and tokens/s while the teacher works."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from openkd.console import console, fmt_rate


class RateColumn(ProgressColumn):
    """`<n> <unit>/s` from a task field (or completed rows), over the task's elapsed time."""

    def __init__(self, field: str | None, unit: str) -> None:
        super().__init__()
        self.field, self.unit = field, unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        amount = task.fields.get(self.field, 0) if self.field else task.completed
        rate = amount / elapsed if elapsed > 0 else 0.0
        return Text(f"{fmt_rate(rate)} {self.unit}/s", style="progress.data.speed")


class LabelProgress:
    """The bar counts rows decided (labelled, failed, skipped as done or repeated); the rates
    count answers and their tokens only."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._task = progress.add_task("labelling", total=total, answers=0, tokens=0)
        self.started = time.monotonic()

    def update(self, decided: int, answers: int, tokens: int) -> None:
        self._progress.update(self._task, completed=decided, answers=answers, tokens=tokens)


@contextlib.contextmanager
def labelling(total: int) -> Iterator[LabelProgress]:
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn("answers", "rows"),
        RateColumn("tokens", "tok"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield LabelProgress(progress, total)


@contextlib.contextmanager
def reading(total: int, description: str = "reading prompts") -> Iterator[Callable[[int], None]]:
    """A short-lived bar for the planning pass over a large dataset."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextlib.contextmanager
def rows_and_tokens(
    description: str, total: int, *, transient: bool = False, remaining: bool = False
) -> Iterator[Callable[[int, int], None]]:
    """Yields `advance(rows, tokens)` of a bar with rows/s and tokens/s (eval, export)."""
    columns: list[ProgressColumn] = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(None, "rows"),
        RateColumn("tokens", "tok"),
        TimeElapsedColumn(),
    ]
    if remaining:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=transient) as progress:
        task = progress.add_task(description, total=total, tokens=0)
        seen = {"tokens": 0}

        def advance(rows: int, tokens: int) -> None:
            seen["tokens"] += tokens
            progress.update(task, advance=rows, tokens=seen["tokens"])

        yield advance
