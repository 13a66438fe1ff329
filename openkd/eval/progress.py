"""Progress bars for `openkd eval`: one per model and pass, with rows/s and tokens/s."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from openkd.console import console
from openkd.generate.progress import RateColumn


@contextlib.contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yields `advance(rows, tokens)`."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(None, "rows"),
        RateColumn("tokens", "tok"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, tokens=0)
        seen = {"tokens": 0}

        def advance(rows: int, tokens: int) -> None:
            seen["tokens"] += tokens
            progress.update(task, advance=rows, tokens=seen["tokens"])

        yield advance
