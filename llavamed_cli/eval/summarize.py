"""``llavamed eval summarize``: runs side by side — VQA runs and chat-benchmark review files — each
figure with a 95 % bootstrap interval, and each run against the first as a paired difference.

Example::

    llavamed eval summarize runs/eval-base runs/eval-tuned              # two `eval vqa` folders
    llavamed eval summarize reviews_modelA.jsonl reviews_modelB.jsonl --format markdown
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from . import app


class Format(str, Enum):
    """Output formats (a real choice: help lists them, Tab completes them)."""

    table = "table"
    markdown = "markdown"
    csv = "csv"
    latex = "latex"
    json = "json"


@app.command("summarize")
def summarize(
    runs: Annotated[list[Path], typer.Argument(help="`eval vqa` output folders (results.json, answers.jsonl, run.json) and/or `eval gpt-score` review files; the first is the baseline of the differences.")],
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="qa50 questions for review files: take type and domain from here, and count questions without a review.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="table, markdown, csv, latex or json.")] = "table",
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write a bar chart with the intervals to this PNG file (needs matplotlib, the 'plot' extra).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples per 95 % interval (0: no intervals).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap draws.")] = 0,
) -> None:
    """Runs side by side with 95 % bootstrap intervals, and paired differences to the first run."""
    fmt = Format(fmt).value
    from llavamed_core.eval import compare
    from llavamed_core.eval.summary import provenance_rows, summary_rows

    if plot is not None:
        compare.require_matplotlib()  # fail before reading anything
    c = compare.compare_runs(compare.load_runs(runs, questions), bootstrap, seed)
    for run in c.runs:
        s = run.summary
        if s is not None and s.unscored:
            _console.warn(f"{s.path}: {s.unscored} unscored review(s) left out of the means")
        if s is not None and s.missing:
            _console.warn(f"{s.path}: {s.missing} question(s) of {questions} have no review")
    for note in compare.not_comparable_notes(c):
        _console.warn(note)
    if fmt == "json":
        _console.print_json(compare.to_json(c))
    elif fmt in ("csv", "markdown", "latex"):
        text = {"csv": compare.to_csv, "markdown": compare.to_markdown, "latex": compare.to_latex}[fmt](c)
        _console.out.print(text, end="", markup=False, highlight=False)
    else:
        cols, rows = provenance_rows(c.runs)
        _console.print_table("what was evaluated (model answers, judge, runs)", cols, rows)
        for run in c.runs:  # the chat benchmark's full table per review file
            if run.summary is not None:
                cols, rows = summary_rows([run.summary])
                _console.print_table(run.label, cols, rows)
        cols, rows = compare.comparison_rows(c, sep="\n")
        _console.print_table(compare.comparison_title(c), cols, rows, caption=compare.comparison_caption(c, "\n"))
    if plot is not None:
        _console.info(f"plot: {compare.plot(c, plot)}")
