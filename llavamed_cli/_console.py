"""Every Rich object the CLI uses: stdout/stderr consoles, tables, the result (:class:`Output`), progress.

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
    from rich.markup import escape  # messages hold paths and TOML tables: "[train.align]" is text

    err.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]Hint:[/] {escape(hint)}", markup=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print a warning line on stderr (rank 0 only)."""
    if is_rank_zero():
        from rich.markup import escape

        err.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    """Print an informational line on stderr (rank 0 only)."""
    if is_rank_zero():
        err.print(message, soft_wrap=True, markup=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (plain text, no Rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


class Output:
    """A command's result on stdout, in one of two modes (the ``hf`` CLI's ``Output`` pattern).

    With ``--json`` the result is exactly one JSON document (:meth:`result`) and the human forms
    (:meth:`table`, :meth:`text`) print nothing; without it :meth:`result` prints nothing and the
    human forms print. Logs, progress, warnings and errors go to stderr in both modes, so a
    script reading ``--json`` output gets one parsable document and nothing else.

    Args:
        json_mode: the command's ``--json`` flag.
    """

    def __init__(self, json_mode: bool):
        self.json_mode = bool(json_mode)
        self._sent = False

    def result(self, data: Any) -> None:
        """With ``--json``, print ``data`` as the command's one JSON document; otherwise nothing.

        Raises:
            RuntimeError: a second document (a bug in the command, never the user's input).
        """
        if not self.json_mode:
            return
        if self._sent:
            raise RuntimeError("a command prints one JSON document")
        self._sent = True
        print_json(data)

    def table(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              caption: str | None = None) -> None:
        """Without ``--json``, print a table (:func:`print_table`); with it, nothing."""
        if not self.json_mode:
            print_table(title, columns, rows, caption)

    def text(self, line: str) -> None:
        """Without ``--json``, print a plain line on stdout (rank 0 only); with it, nothing."""
        if not self.json_mode and is_rank_zero():
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


_PATH_WIDTH = 40  # paths longer than this are shortened from the middle in tables


def shorten_path(text: str, width: int = _PATH_WIDTH) -> str:
    """``/home/ann/runs/…/vqa-rad/answers.jsonl`` style: keep the first component and as many of the
    last ones as fit in ``width``, with ``...`` in between (the file name is always kept)."""
    if len(text) <= width or "/" not in text:
        return text
    parts = text.split("/")
    head = "/".join(parts[:2]) if parts[0] == "" else parts[0]
    tail: list[str] = [parts[-1]]
    for part in reversed(parts[1 + (parts[0] == ""):-1]):
        if len(head) + len("/.../") + len("/".join([part, *tail])) > width:
            break
        tail.insert(0, part)
    short = f"{head}/.../{'/'.join(tail)}"
    return short if len(short) < len(text) else text


def _shorten_paths(text: str) -> str:
    """Shorten every long path-like word of ``text`` (a title or a cell) from the middle."""
    return " ".join(shorten_path(w) if "/" in w and len(w) > _PATH_WIDTH else w for w in text.split(" "))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          caption: str | None = None) -> Table:
    """Build a Rich table from column names and rows of values (numbers right-aligned).

    Made to fit 80 columns without cutting anything: a header is never narrower than its longest
    word, long paths (in cells and the title) are shortened from the middle, and a cell that still
    does not fit wraps (never ``…``).
    """
    rows = [list(r) for r in rows]
    t = Table(title=_shorten_paths(title) if title else title, title_justify="left",
              caption=caption, caption_justify="left")
    cells = [[_shorten_paths(_fmt(v)) for v in r] for r in rows]

    def longest(texts: Iterable[str]) -> int:
        return max((len(w) for text in texts for w in text.split()), default=0)

    # No header word is split across lines, nor a cell's word while the table fits 80 columns
    # (the widest minimums give way first, never below the header's longest word).
    floors = [longest([str(name)]) for name in columns]
    mins = [max(f, min(longest(c[i] for c in cells), 24)) for i, f in enumerate(floors)]
    room = 80 - (3 * len(columns) + 1)  # 80 less the borders and padding
    while sum(mins) > room and any(m > f for m, f in zip(mins, floors)):
        i = max((i for i in range(len(mins)) if mins[i] > floors[i]), key=lambda i: mins[i])
        mins[i] -= 1
    # Too wide for 80 columns: narrow the widest columns first (down to those minimums).
    natural = [max([len(str(name)), *(len(c[i]) for c in cells)]) for i, name in enumerate(columns)]
    widths: list[int | None] = [None] * len(columns)
    if sum(natural) > room:
        fit = list(natural)
        while sum(fit) > room and any(w > m for w, m in zip(fit, mins)):
            i = max((i for i in range(len(fit)) if fit[i] > mins[i]), key=lambda i: fit[i])
            fit[i] -= 1
        widths = list(fit)
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) or r[i] in ("", None, "-")
                                     for r in rows)
        t.add_column(name, justify="right" if numeric else "left", overflow="fold",
                     min_width=mins[i] or None, width=widths[i])
    for c in cells:
        t.add_row(*c)
    return t


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                caption: str | None = None) -> None:
    """Print a table on stdout (rank 0 only); ``caption`` is a note printed under it."""
    if is_rank_zero():
        out.print(table(title, columns, rows, caption))


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
