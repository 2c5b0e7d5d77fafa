"""The loss history of a training run: ``history.jsonl``, a terminal sparkline and ``loss.png``.

Every logged optimizer step becomes one JSON line as it happens (``step``, ``epoch``, ``loss``,
``lr``, ``grad_norm``, ``tokens_per_s``), and every evaluation one more (``step``, ``epoch``,
``eval_loss``, ``eval_tokens``). The file lives in the run folder while training (``<out>.run/``)
and is copied beside the output checkpoint at the end, with ``loss.png`` drawn from it.

The rows come from the Trainer's ``log_history``, which every resumable checkpoint holds: a run
resumed from ``checkpoint-K`` rewrites the file from that checkpoint's rows (steps ``1..K``, so a
row logged after ``K`` by the killed run goes) and appends from ``K+1`` on, with no step twice or
missing.

Nothing here imports torch; matplotlib is an optional extra (``pip install 'llavamed[plot]'``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io import atomic_write, atomic_write_bytes

__all__ = ["HISTORY_FILE", "PLOT_FILE", "history_row", "history_rows", "write_history", "append_history",
           "read_history", "sparkline", "plot_history"]

HISTORY_FILE = "history.jsonl"
PLOT_FILE = "loss.png"
_BARS = "▁▂▃▄▅▆▇█"
# Trainer log key → history key (the Trainer calls the learning rate "learning_rate").
_TRAIN_KEYS = {"epoch": "epoch", "loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm",
               "tokens_per_s": "tokens_per_s"}
_EVAL_KEYS = {"epoch": "epoch", "eval_loss": "eval_loss", "eval_tokens": "eval_tokens"}


def _number(value: Any) -> Any:
    """A JSON-ready number (tensors and numpy scalars become floats; NaN and inf become ``None``)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def history_row(entry: dict[str, Any]) -> dict[str, Any] | None:
    """One Trainer ``log_history`` entry as a history row, or ``None`` for entries that are not a
    training step or an evaluation (the end-of-training ``train_runtime`` summary, …)."""
    if "step" not in entry:
        return None
    if "loss" in entry:
        keys = _TRAIN_KEYS
    elif "eval_loss" in entry:
        keys = _EVAL_KEYS
    else:
        return None
    row: dict[str, Any] = {"step": int(entry["step"])}
    for src, dst in keys.items():
        if src in entry:
            row[dst] = _number(entry[src])
    return row


def history_rows(log_history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history rows of a whole ``log_history`` (order kept)."""
    return [row for row in map(history_row, log_history) if row is not None]


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_history(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as the whole history file, atomically."""
    with atomic_write(path) as f:
        f.write("".join(_line(r) for r in rows))
    return Path(path)


def append_history(path: Path, row: dict[str, Any]) -> None:
    """Append one row (one ``write`` of one whole line, flushed: a kill leaves whole lines)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_line(row))
        f.flush()


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a history file; a last line cut short by a kill is left out."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def sparkline(values: Sequence[float | None], width: int = 40) -> str:
    """A one-line chart of ``values`` in the block characters ``▁▂▃▄▅▆▇█``.

    Longer series are cut into ``width`` equal spans and each span shows its mean; ``None`` and
    non-finite values are left out. The lowest value draws ``▁``, the highest ``█``; a flat series
    draws ``▄`` throughout.

    Args:
        values: the series (e.g. the loss of each logged step).
        width: the most characters to draw.

    Returns:
        The chart (``""`` for no finite values).
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite or width < 1:
        return ""
    if len(finite) > width:
        spans = [finite[len(finite) * i // width: len(finite) * (i + 1) // width] for i in range(width)]
        finite = [sum(s) / len(s) for s in spans]
    lo, hi = min(finite), max(finite)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return _BARS[3] * len(finite)
    top = len(_BARS) - 1
    return "".join(_BARS[min(top, int(round((v - lo) / (hi - lo) * top)))] for v in finite)


def plot_history(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Draw the training loss (and the eval loss, if any) against the step as a PNG.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed (the caller says so in one line).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
