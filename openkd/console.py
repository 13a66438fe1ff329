"""The single place user-facing output goes through: a rich console on stderr, rank 0 only."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def is_main_process() -> bool:
    """True on the process that should talk to the user (global rank 0, or no launcher)."""
    return os.environ.get("RANK", "0") == "0"


console = Console(stderr=True, highlight=False, emoji=False, quiet=not is_main_process())


def info(message: str) -> None:
    # Unwrapped: a log line is one line, so it can be grepped in a Slurm log.
    console.print(message, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)


def error(message: str) -> None:
    """Errors are printed by every rank: a failure on rank 3 must not be silent. The message is
    escaped: it quotes user input (paths, templates), which must not be read as rich markup."""
    Console(stderr=True, highlight=False, emoji=False).print(
        f"[bold red]error:[/] {escape(message)}", soft_wrap=True
    )


def summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_rate(n: float) -> str:
    return f"{n:,.1f}"


def stdout_line(text: str) -> None:
    """Machine-readable results (paths) go to stdout so scripts can capture them."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
