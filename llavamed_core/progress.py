"""Progress reporting from the core without printing: a callback that receives events.

The core calls ``progress(ProgressEvent(...))`` as work advances; the CLI turns the events into
Rich progress bars on a terminal and plain log lines elsewhere. Library users may pass any
callable, or ``None`` to ignore progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressEvent", "ProgressCallback", "emit"]


@dataclass
class ProgressEvent:
    """One update of one task.

    Attributes:
        task: short task name shown to the user ("download", "train", "answers", ...).
        done: units completed so far (absolute, not an increment).
        total: units expected in all, or ``None`` when unknown.
        unit: what a unit is ("B" for bytes, "step", "question", ...).
        info: extra figures to show beside the bar (loss, lr, tokens, cost, ...).
        finished: the task is over.
    """

    task: str
    done: float
    total: float | None = None
    unit: str = "it"
    info: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def emit(callback: ProgressCallback | None, task: str, done: float, total: float | None = None,
         unit: str = "it", finished: bool = False, **info: Any) -> None:
    """Send one event to ``callback`` if there is one."""
    if callback is not None:
        callback(ProgressEvent(task, done, total, unit, dict(info), finished))
