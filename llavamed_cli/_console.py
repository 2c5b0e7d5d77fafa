"""Every Rich object the CLI uses: stdout/stderr consoles, tables, JSON output, progress.

stdout carries results (tables, paths, ``--json``); stderr carries logs, progress, warnings and
errors. On a terminal progress is a Rich bar; elsewhere (CI, pipes) it is a plain log line at most
every few seconds, because a Rich bar on a non-TTY prints nothing until it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from llavamed_core.progress import ProgressEvent

# Rich resolves sys.stdout / sys.stderr at write time, so these follow redirections (CliRunner).
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed run (only rank 0 prints)."""
    return os.environ.get("RANK", "0") in ("", "0")


def print_error(message: str, hint: str | None = None) -> None:
    """Print ``Error: ...`` and ``Hint: ...`` on stderr, one line each."""
    err.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]Hint:[/] {hint}", markup=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print a warning line on stderr (rank 0 only)."""
    if is_rank_zero():
        err.print(f"[yellow]Warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    """Print an informational line on stderr (rank 0 only)."""
    if is_rank_zero():
        err.print(message, soft_wrap=True, markup=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (plain text, no Rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Build a Rich table from column names and rows of values (numbers right-aligned)."""
    rows = [list(r) for r in rows]
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) or r[i] in ("", None, "-")
                                     for r in rows)
        t.add_column(name, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a table on stdout (rank 0 only)."""
    if is_rank_zero():
        out.print(table(title, columns, rows))


class _Reporter:
    """Callable progress sink: Rich bars on a TTY, plain lines every ``interval`` s otherwise."""

    def __init__(self, progress: Progress | None, interval: float):
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._last: dict[str, float] = {}
        self._interval = interval

    def __call__(self, ev: ProgressEvent) -> None:
        if not is_rank_zero():
            return
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in ev.info.items())
        if self._progress is not None:
            if ev.task not in self._tasks:
                self._tasks[ev.task] = self._progress.add_task(ev.task, total=ev.total, extra="")
            self._progress.update(self._tasks[ev.task], completed=ev.done, total=ev.total,
                                  extra=extra)
            return
        now = time.monotonic()
        if ev.finished or now - self._last.get(ev.task, 0.0) >= self._interval:
            self._last[ev.task] = now
            total = f"/{_fmt(ev.total)}" if ev.total else ""
            err.print(f"[{ev.task}] {_fmt(ev.done)}{total} {ev.unit}  {extra}".rstrip(),
                      markup=False, soft_wrap=True)


@contextlib.contextmanager
def progress(interval: float = 5.0) -> Iterator[_Reporter]:
    """A progress callback for core functions, shown on stderr.

    Yields:
        A callable accepting :class:`ProgressEvent`.
    """
    if err.is_terminal and is_rank_zero():
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                       console=err, transient=False)
        with bar:
            yield _Reporter(bar, interval)
    else:
        yield _Reporter(None, interval)
