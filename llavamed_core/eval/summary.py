"""``eval summarize``: the chat-benchmark table from one or more review files (intervals, paired
differences between files, and VQA runs beside them: :mod:`.compare`).

Per question type (conversation, detailed description), per domain (the first true of chest_xray,
mri, histology, gross, ct_scan, as the paper buckets them) and overall, each review file gives:

- ``n``: scored reviews; ``unscored``: reviews without two readable scores;
- ``mean_ref`` / ``mean_model``: mean judge score of the reference and of the model's answers;
- ``relative``: the **mean over questions of (model ÷ reference) × 100** — a mean of ratios, as the
  paper's chat table computes it (not the ratio of the two means, which differs in general).

Reviews come from ``eval gpt-score`` (``ref_score``/``model_score``, ``type``, ``domain``); files of
the original tools (``tuple`` = [ref, model], ``category``) are read as well. ``questions`` (the
qa50 file) supplies type and domain by ``question_id`` when given, and the count of questions
without a review. A review with a missing or negative score, or a reference score of 0 (no ratio),
counts as unscored.

Provenance: each file's column says which model's answers were judged, by which judge: from the
review file's run header (``NAME.run.json``, written by ``eval gpt-score``: the answers' model name
and fingerprint) or else from the reviews (``answer_model_id``, ``judge``). A file whose reviews
mix judges, answer models or runs is refused.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, data_error
from ..io import iter_records
from ..records import DOMAINS, first_domain, load_qa50

__all__ = ["BUCKET_LABELS", "BucketStats", "ReviewSummary", "ReviewRow", "load_reviews",
           "summarize_reviews", "summary_rows", "relative_rows", "to_csv", "to_markdown", "to_json",
           "review_file_provenance", "provenance_rows", "model_label", "CSV_COLUMNS", "csv_fields"]

TYPES = ("conversation", "detailed_description")
BUCKET_LABELS = {"conversation": "Conversation", "detailed_description": "Description",
                 "chest_xray": "CXR", "mri": "MRI", "histology": "Histology", "gross": "Gross",
                 "ct_scan": "CT", "overall": "Overall"}
_TYPE_ALIASES = {"description": "detailed_description", "detail": "detailed_description",
                 "conv": "conversation"}


@dataclass
class ReviewRow:
    """One review, reduced to what the table needs (scores ``None`` when unscored)."""

    question_id: Any
    type: str | None
    domain: str | None
    ref: float | None
    model: float | None


@dataclass
class BucketStats:
    """Figures of one bucket of one review file."""

    n: int = 0
    unscored: int = 0
    mean_ref: float | None = None
    mean_model: float | None = None
    relative: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, rounded to 4 decimals."""
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"n": self.n, "unscored": self.unscored, "mean_ref": r(self.mean_ref),
                "mean_model": r(self.mean_model), "relative": r(self.relative)}


@dataclass
class ReviewSummary:
    """The table column of one review file."""

    path: str
    label: str
    reviews: int
    scored: int
    unscored: int
    missing: int | None
    buckets: dict[str, BucketStats] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    """bucket name → ``type``, ``domain`` or ``overall``."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """``model``, ``model_fingerprint``, ``judge``, ``answers_run_id``, ``run_id`` (``None`` when unknown)."""
    rows: list[ReviewRow] = field(default_factory=list, repr=False)
    """The reviews themselves (per-question scores, for the bootstrap in :mod:`.compare`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"path": self.path, "label": self.label, "reviews": self.reviews, "scored": self.scored,
                "unscored": self.unscored, "missing": self.missing, "provenance": self.provenance,
                "buckets": {k: {"group": self.groups[k], **v.to_dict()} for k, v in self.buckets.items()}}


def _score(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def load_reviews(path: str | os.PathLike, questions: dict[str, tuple[str, str | None]] | None = None
                 ) -> list[ReviewRow]:
    """Read a review file (JSONL or JSON array).

    Args:
        path: the review file.
        questions: ``question_id`` → (type, domain bucket), overriding what the reviews say.

    Raises:
        DataError: a record without ``question_id``, a duplicate id, or (without ``questions``) a
            review whose type is unknown.
    """
    path = Path(path)
    rows: list[ReviewRow] = []
    seen: set[str] = set()
    for i, rec in enumerate(iter_records(path), 1):
        if "question_id" not in rec:
            raise data_error(path, f"line {i}", "question_id", "missing")
        qid = rec["question_id"]
        key = str(qid)
        if key in seen:
            raise data_error(path, qid, "question_id", "duplicate review",
                             "each question must be reviewed once; remove the extra lines")
        seen.add(key)
        if "ref_score" in rec or "model_score" in rec:
            ref, model = _score(rec.get("ref_score")), _score(rec.get("model_score"))
        else:
            pair = rec.get("tuple", rec.get("scores"))
            ref, model = (_score(pair[0]), _score(pair[1])) if isinstance(pair, list) and len(pair) == 2 \
                else (None, None)
        if rec.get("scored") is False or ref is None or model is None or ref <= 0 or model < 0:
            ref = model = None
        if questions is not None and key in questions:
            qtype, dom = questions[key]
        else:
            qtype = rec.get("type", rec.get("category"))
            d = rec.get("domain_bucket", rec.get("domain"))
            dom = first_domain(d) if isinstance(d, dict) else d if d in DOMAINS else None
            if not isinstance(qtype, str) or not qtype:
                raise data_error(path, qid, "type", "missing",
                                 "pass --questions QA50.jsonl so types and domains come from the questions")
        qtype = _TYPE_ALIASES.get(qtype, qtype)
        rows.append(ReviewRow(qid, qtype, dom, ref, model))
    if not rows:
        raise DataError(f"{path}: no reviews", "run `llavamed eval gpt-score` first")
    return rows


def review_file_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Which model's answers a review file judges, and by which judge (see the module notes).

    Raises:
        DataError: the reviews mix judges, answer models or runs, or disagree with the run header.
    """
    from .provenance import read_header

    path = Path(path)
    head = read_header(path.with_name(f"{path.stem}.run.json")) or {}
    seen: dict[str, dict[str, int]] = {"judge": {}, "answer_model_id": {}, "answer_run_id": {}, "run_id": {}}
    for rec in iter_records(path):
        for k, counts in seen.items():
            v = rec.get(k)
            if v not in (None, ""):
                counts[str(v)] = counts.get(str(v), 0) + 1
    hint = "score each model's answers with one judge into its own review file (`eval gpt-score --output`)"
    for k, what in (("judge", "judges"), ("answer_model_id", "answer models"), ("answer_run_id", "answer runs"),
                    ("run_id", "gpt-score runs")):
        if len(seen[k]) > 1:
            shown = ", ".join(f"{v} ({n})" for v, n in sorted(seen[k].items()))
            raise DataError(f"{path}: mixes reviews of {len(seen[k])} {what}: {shown}", hint)
    one = {k: next(iter(v), None) for k, v in seen.items()}
    if head and one["run_id"] and head.get("run_id") != one["run_id"]:
        raise DataError(f"{path}: its reviews' run id {one['run_id']} is not the one in its run header "
                        f"({head.get('run_id')})", hint)
    ans = head.get("answers") or {}
    return {"model": ans.get("model") or one["answer_model_id"],
            "model_fingerprint": ans.get("model_fingerprint"),
            "judge": (head.get("judge") or {}).get("model") or one["judge"],
            "answers_run_id": ans.get("run_id") or one["answer_run_id"],
            "run_id": head.get("run_id") or one["run_id"]}


def model_label(prov: dict[str, Any]) -> str:
    """``name (fingerprint 12 hex)``, or the name alone, or ``-``."""
    name = prov.get("model") or "-"
    fp = prov.get("model_fingerprint")
    return f"{name} ({fp[:12]})" if fp else name


def provenance_rows(summaries: list[ReviewSummary]) -> tuple[list[str], list[list[Any]]]:
    """One row per review file: its label, the answers' model (name and short fingerprint), the judge
    and the run ids."""
    cols = ["file", "model (fingerprint)", "judge", "answers run", "reviews run"]
    rows = [[s.label, model_label(s.provenance), s.provenance.get("judge") or "-",
             s.provenance.get("answers_run_id") or "-", s.provenance.get("run_id") or "-"] for s in summaries]
    return cols, rows


def _bucket(rows: list[ReviewRow]) -> BucketStats:
    scored = [r for r in rows if r.ref is not None]
    b = BucketStats(n=len(scored), unscored=len(rows) - len(scored))
    if scored:
        b.mean_ref = sum(r.ref for r in scored) / len(scored)
        b.mean_model = sum(r.model for r in scored) / len(scored)
        # Mean of per-question ratios (the paper's relative score), not ratio of means.
        b.relative = sum(r.model / r.ref for r in scored) / len(scored) * 100.0
    return b


def _labels(paths: list[Path]) -> list[str]:
    labels = [p.stem for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.resolve().parent.name}/{p.stem}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return labels


def summarize_reviews(paths: list[str | os.PathLike], questions: str | os.PathLike | None = None
                      ) -> list[ReviewSummary]:
    """One :class:`ReviewSummary` per review file, with the same buckets in the same order.

    Raises:
        DataError: no files, or an unreadable review or question file.
    """
    if not paths:
        raise DataError("no review files given", "e.g. `llavamed eval summarize reviews.jsonl`")
    qmap = None
    if questions is not None:
        qmap = {str(q.question_id): (_TYPE_ALIASES.get(q.type, q.type), q.bucket_domain)
                for q in load_qa50(questions)}
    ps = [Path(p) for p in paths]
    loaded = [load_reviews(p, qmap) for p in ps]
    extra_types = sorted({r.type for rows in loaded for r in rows if r.type not in TYPES})
    order = [("type", t) for t in (*TYPES, *extra_types)] + [("domain", d) for d in DOMAINS] + \
            [("overall", "overall")]
    out = []
    for p, label, rows in zip(ps, _labels(ps), loaded):
        s = ReviewSummary(str(p), label, len(rows), sum(r.ref is not None for r in rows),
                          sum(r.ref is None for r in rows),
                          None if qmap is None else len(set(qmap) - {str(r.question_id) for r in rows}),
                          provenance=review_file_provenance(p), rows=rows)
        for group, name in order:
            sel = rows if group == "overall" else [r for r in rows if getattr(r, group) == name]
            s.buckets[name] = _bucket(sel)
            s.groups[name] = group
        out.append(s)
    return out


def summary_rows(summaries: list[ReviewSummary]) -> tuple[list[str], list[list[Any]]]:
    """The wide table: one row per bucket; per file the columns n, ref, model, relative."""
    single = len(summaries) == 1
    cols = ["bucket"]
    for s in summaries:
        pre = "" if single else f"{s.label} "
        cols += [f"{pre}n", f"{pre}ref", f"{pre}model", f"{pre}relative"]
    if single and summaries[0].unscored:
        cols.insert(2, "unscored")
    rows = []
    for name in summaries[0].buckets:
        row: list[Any] = [BUCKET_LABELS.get(name, name)]
        for s in summaries:
            b = s.buckets[name]
            vals = [b.n, b.mean_ref, b.mean_model, b.relative]
            if single and s.unscored:
                vals.insert(1, b.unscored)
            row += vals
        rows.append(row)
    return cols, rows


def relative_rows(summaries: list[ReviewSummary]) -> tuple[list[str], list[list[Any]]]:
    """The compact comparison: one row per bucket, one relative-score column per file."""
    cols = ["bucket", *(s.label for s in summaries)]
    rows = [[BUCKET_LABELS.get(name, name), *(s.buckets[name].relative for s in summaries)]
            for name in summaries[0].buckets]
    return cols, rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(summaries: list[ReviewSummary]) -> str:
    """GitHub Markdown: the provenance table (one row per file), then the scores (buckets as rows,
    files as column groups)."""
    pcols, prows = provenance_rows(summaries)
    lines = ["| " + " | ".join(pcols) + " |", "|" + "|".join(["---"] * len(pcols)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in prows]
    cols, rows = summary_rows(summaries)
    lines += ["", "| " + " | ".join(cols) + " |",
              "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["file", "label", "model", "model_fingerprint", "judge", "group", "bucket", "n", "unscored",
               "mean_ref", "mean_model", "relative"]
"""The columns of :func:`to_csv`."""


def csv_fields(s: ReviewSummary, name: str) -> list[Any]:
    """The :data:`CSV_COLUMNS` values of one file's bucket."""
    p, d = s.provenance, s.buckets[name].to_dict()
    blank = lambda v: "" if v is None else v  # noqa: E731
    return [s.path, s.label, p.get("model") or "", (p.get("model_fingerprint") or "")[:12], p.get("judge") or "",
            s.groups[name], name, d["n"], d["unscored"], blank(d["mean_ref"]), blank(d["mean_model"]),
            blank(d["relative"])]


def to_csv(summaries: list[ReviewSummary]) -> str:
    """Long-format CSV: one line per file and bucket."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in summaries:
        for name in s.buckets:
            w.writerow(csv_fields(s, name))
    return buf.getvalue()


def to_json(summaries: list[ReviewSummary]) -> list[dict[str, Any]]:
    """JSON-ready list, one object per file."""
    return [s.to_dict() for s in summaries]
