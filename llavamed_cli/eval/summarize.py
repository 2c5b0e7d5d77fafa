"""``llavamed eval summarize``: the chat-benchmark table (per type, per domain, overall) from reviews.

Example::

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
    json = "json"


@app.command("summarize")
def summarize(
    reviews: Annotated[list[Path], typer.Argument(help="Review files from `eval gpt-score` (one column group each).")],
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="qa50 questions: take type and domain from here, and count questions without a review.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="table, markdown, csv or json.")] = "table",
) -> None:
    """Mean reference/model scores and relative score (mean of per-question ratios x 100) per bucket."""
    fmt = Format(fmt).value
    from llavamed_core.eval.summary import (provenance_rows, relative_rows, summarize_reviews, summary_rows,
                                            to_csv, to_json, to_markdown)

    summaries = summarize_reviews(reviews, questions)
    for s in summaries:
        if s.unscored:
            _console.warn(f"{s.path}: {s.unscored} unscored review(s) left out of the means")
        if s.missing:
            _console.warn(f"{s.path}: {s.missing} question(s) of {questions} have no review")
    if fmt == "json":
        _console.print_json(to_json(summaries))
    elif fmt == "csv":
        _console.out.print(to_csv(summaries), end="", markup=False, highlight=False)
    elif fmt == "markdown":
        _console.out.print(to_markdown(summaries), end="", markup=False, highlight=False)
    else:
        cols, rows = provenance_rows(summaries)
        _console.print_table("what was judged (model answers, judge, runs)", cols, rows)
    if fmt != "table":
        return
    if len(summaries) == 1:
        cols, rows = summary_rows(summaries)
        _console.print_table("chat benchmark (relative = mean of model/ref x 100)", cols, rows)
    else:
        # One table per file (fits a terminal), then the paper's comparison: relative per file.
        for s in summaries:
            cols, rows = summary_rows([s])
            _console.print_table(s.label, cols, rows)
        cols, rows = relative_rows(summaries)
        _console.print_table("relative score (mean of model/ref x 100)", cols, rows)
