"""VQA metrics: the LLaVA-Med paper's numbers, reproduced exactly, beside stricter ones.

The paper's VQA-RAD / SLAKE / PathVQA numbers come from the original batch evaluator
(docs/formats.md, "The paper's VQA metrics"). This module computes those (named ``paper_*``)
and, side by side, metrics that do not reward rambling:

=========================  ========  =================================================================
key                        over      definition (both strings normalised by :func:`normalize_answer`)
=========================  ========  =================================================================
paper_closed_acc           CLOSED    hit when the ground truth is a substring of the prediction
                                     (paper "Closed"; "no" matches inside "not"/"normal", and an answer
                                     holding both "yes" and "no" matches either)
strict_closed_acc          CLOSED    yes/no ground truth: the first "yes"/"no" word of the prediction
                                     equals it; other closed answers: normalised exact match
paper_open_recall          OPEN      tp / (tp + fn) (paper "Open"); tp = summed prediction counts of
                                     words in both, fn = summed ground-truth counts of words missing
                                     from the prediction; 0 when either side is empty or tp = 0
paper_open_precision       OPEN      tp / (tp + fp), fp = prediction-only word counts
paper_open_f1              OPEN      harmonic mean of the two above
paper_open_acc             OPEN      ground truth is a substring of the prediction ("open accuracy")
paper_exact_match_score    OPEN      distinct ground-truth words found in the prediction ÷ prediction
                                     words (the original's "exact match score": not string equality)
open_exact_match           OPEN      normalised prediction == normalised ground truth
open_token_f1              OPEN      SQuAD-style token F1 (shared tokens counted once per occurrence)
bleu, bleu_1..bleu_3       OPEN      NLTK ``sentence_bleu`` on whitespace tokens: default weights, and
                                     (1,0,0,0), (0,1,0,0), (0,0,1,0) as the original, no smoothing
exact_match                all       normalised prediction == normalised ground truth
=========================  ========  =================================================================

Differences from the original, on purpose: answers are matched to questions by id (the original
zipped two lists by position and asserted equal id lists); a question with no answer scores 0 and
is counted (``missing``) instead of failing the run; groups with no question of a kind report
``None`` instead of 0 or a division by zero.

Values are fractions in [0, 1]; :func:`render_rows` turns them into percentages for display.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError, data_error
from ..records import Answer, Conversation, parse_conversation
from .normalize import normalize_answer

__all__ = [
    "normalize_answer",
    "score_vqa",
    "score_answer",
    "VQAReport",
    "render_rows",
    "breakdown_rows",
    "METRICS",
    "CLOSED_METRICS",
    "OPEN_METRICS",
    "paper_closed_hit",
    "strict_closed_hit",
    "paper_open_counts",
    "paper_exact_match_score",
    "token_f1",
    "bleu_scores",
    "infer_answer_type",
]

YES_NO = ("yes", "no")

CLOSED_METRICS = ("paper_closed_acc", "strict_closed_acc")
OPEN_METRICS = ("paper_open_recall", "paper_open_precision", "paper_open_f1", "paper_open_acc",
                "paper_exact_match_score", "open_exact_match", "open_token_f1",
                "bleu", "bleu_1", "bleu_2", "bleu_3")

METRICS: dict[str, str] = {
    "paper_closed_acc": "Closed acc. (paper: gt substring of prediction)",
    "strict_closed_acc": "Closed acc. (strict: first yes/no word, else exact)",
    "paper_open_recall": "Open recall (paper 'Open')",
    "paper_open_precision": "Open precision (paper's counts)",
    "paper_open_f1": "Open F1 (paper's counts)",
    "paper_open_acc": "Open 'accuracy' (paper: gt substring)",
    "paper_exact_match_score": "Open 'exact match score' (paper: gt words ÷ pred words)",
    "open_exact_match": "Open exact match (normalised)",
    "open_token_f1": "Open token F1 (SQuAD-style)",
    "bleu": "Open BLEU (NLTK default 4-gram weights)",
    "bleu_1": "Open BLEU weights (1,0,0,0)",
    "bleu_2": "Open BLEU weights (0,1,0,0)",
    "bleu_3": "Open BLEU weights (0,0,1,0)",
    "exact_match": "Exact match, all questions (normalised)",
}
"""Metric key → display label, in display order."""

# Per-question row field that each aggregate metric averages.
_ROW_FIELD = {"paper_closed_acc": "paper_closed_hit", "strict_closed_acc": "strict_closed_hit",
              "paper_open_acc": "paper_open_hit"}

_BLEU_WEIGHTS = {"bleu": (0.25, 0.25, 0.25, 0.25), "bleu_1": (1, 0, 0, 0), "bleu_2": (0, 1, 0, 0),
                 "bleu_3": (0, 0, 1, 0)}


# ---------------------------------------------------------------------------------------------
# Per-pair metrics. Arguments are already-normalised strings unless the docstring says otherwise.
# ---------------------------------------------------------------------------------------------

def paper_closed_hit(gt_norm: str, pred_norm: str) -> float:
    """Paper "Closed": 1.0 when the normalised ground truth is a substring of the prediction."""
    return 1.0 if gt_norm in pred_norm else 0.0


def strict_closed_hit(gt_norm: str, pred_norm: str) -> float:
    """Strict closed accuracy for one question.

    A yes/no ground truth is hit when the first word of the prediction that is exactly ``yes`` or
    ``no`` equals it (so "not", "normal" and a later contradicting word do not count); any other
    closed answer needs a normalised exact match.
    """
    if gt_norm in YES_NO:
        first = next((w for w in pred_norm.split() if w in YES_NO), None)
        return 1.0 if first == gt_norm else 0.0
    return 1.0 if pred_norm == gt_norm else 0.0


def paper_open_counts(gt_norm: str, pred_norm: str) -> dict[str, float]:
    """The original's open-question word counts and ratios for one question.

    ``tp`` sums, over words present in both, the word's count in the *prediction*; ``fp`` sums the
    prediction-only words' counts; ``fn`` sums the ground-truth-only words' counts. Precision,
    recall and F1 are 0 when either side has no words or ``tp`` is 0, as the original returned.

    Returns:
        ``{"tp", "fp", "fn", "precision", "recall", "f1"}``.
    """
    pred_c = Counter(pred_norm.split())
    gt_c = Counter(gt_norm.split())
    tp = sum(c for w, c in pred_c.items() if w in gt_c)
    fp = sum(c for w, c in pred_c.items() if w not in gt_c)
    fn = sum(c for w, c in gt_c.items() if w not in pred_c)
    out = {"tp": tp, "fp": fp, "fn": fn, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    if pred_c and gt_c and tp:
        p, r = tp / (tp + fp), tp / (tp + fn)
        out.update(precision=p, recall=r, f1=2 * p * r / (p + r))
    return out


def paper_exact_match_score(gt_norm: str, pred_norm: str) -> float:
    """The original's "exact match score": distinct gt words in the prediction ÷ prediction words."""
    pred_words = pred_norm.split()
    if not pred_words:
        return 0.0
    present = set(pred_words)
    return sum(1 for w in set(gt_norm.split()) if w in present) / len(pred_words)


def token_f1(gt_norm: str, pred_norm: str) -> float:
    """SQuAD-style token F1: overlap counted with multiplicity min(pred, gt)."""
    pred_c, gt_c = Counter(pred_norm.split()), Counter(gt_norm.split())
    common = sum((pred_c & gt_c).values())
    if not common:
        return 0.0
    p, r = common / sum(pred_c.values()), common / sum(gt_c.values())
    return 2 * p * r / (p + r)


def bleu_scores(gt_norm: str, pred_norm: str) -> dict[str, float]:
    """NLTK ``sentence_bleu`` on whitespace tokens with the original's four weight settings.

    No smoothing, as the original: any zero n-gram count of a weighted order gives 0 (or a
    vanishing number), and NLTK's warning about it is silenced.

    Returns:
        ``{"bleu", "bleu_1", "bleu_2", "bleu_3"}``.
    """
    from nltk.translate.bleu_score import sentence_bleu

    ref, hyp = [gt_norm.split()], pred_norm.split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: float(sentence_bleu(ref, hyp, weights=w)) for k, w in _BLEU_WEIGHTS.items()}


def infer_answer_type(gt_answer: str) -> str:
    """CLOSED for a yes/no ground truth, else OPEN (PathVQA's rule, used when a record has none)."""
    return "CLOSED" if normalize_answer(gt_answer) in YES_NO else "OPEN"


def score_answer(gt: str, pred: str | None, answer_type: str) -> dict[str, Any]:
    """All metrics of one question.

    Args:
        gt: ground-truth answer (raw text).
        pred: predicted answer (raw text), or ``None`` when the answer file has none: every metric
            is then 0.
        answer_type: ``OPEN`` or ``CLOSED``.

    Returns:
        A flat dict: the normalised strings, ``exact_match``, and the per-type fields
        (``paper_closed_hit``, ``strict_closed_hit`` for CLOSED; ``paper_open_recall`` …
        ``bleu_3``, ``tp``/``fp``/``fn`` for OPEN).
    """
    gt1 = normalize_answer(gt)
    pred1 = normalize_answer(pred) if pred is not None else ""
    row: dict[str, Any] = {"gt_norm": gt1, "pred_norm": pred1}
    if pred is None:
        row["exact_match"] = 0.0
        if answer_type == "CLOSED":
            row.update(paper_closed_hit=0.0, strict_closed_hit=0.0)
        else:
            row.update({k: 0.0 for k in OPEN_METRICS if k != "paper_open_acc"},
                       paper_open_hit=0.0, tp=0, fp=0, fn=len(gt1.split()))
        return row
    row["exact_match"] = 1.0 if pred1 == gt1 else 0.0
    if answer_type == "CLOSED":
        row["paper_closed_hit"] = paper_closed_hit(gt1, pred1)
        row["strict_closed_hit"] = strict_closed_hit(gt1, pred1)
        return row
    # The original's calculate_f1score / calculate_exactmatch normalised their (already normalised)
    # inputs once more; that only matters past 32 periods, but it is what the paper computed.
    gt2, pred2 = normalize_answer(gt1), normalize_answer(pred1)
    counts = paper_open_counts(gt2, pred2)
    row.update(paper_open_recall=counts["recall"], paper_open_precision=counts["precision"],
               paper_open_f1=counts["f1"], tp=counts["tp"], fp=counts["fp"], fn=counts["fn"],
               paper_open_hit=1.0 if gt1 in pred1 else 0.0,
               paper_exact_match_score=paper_exact_match_score(gt2, pred2),
               open_exact_match=row["exact_match"], open_token_f1=token_f1(gt1, pred1))
    row.update(bleu_scores(gt1, pred1))
    return row


# ---------------------------------------------------------------------------------------------
# Whole-file scoring
# ---------------------------------------------------------------------------------------------

@dataclass
class VQAReport:
    """The scores of one answer file against one ground-truth file.

    Attributes:
        overall: metric key → value in [0, 1], or ``None`` when no question of its kind exists.
        by_answer_type: ``"OPEN"``/``"CLOSED"`` → ``{"n": …, metric: value, …}``.
        by_question_type: question type → the same shape (empty when the data has none).
        by_modality: modality → the same shape (empty when the data has none).
        counts: ``n`` (questions), ``open``, ``closed``, ``answered``, ``missing`` (no answer),
            ``empty`` (blank answer text), ``extra`` (answers for ids not in the ground truth),
            ``answer_type_inferred`` (records without ``answer_type``; yes/no → CLOSED).
        rows: one dict per question, in ground-truth order: ``id``, ``answer_type``,
            ``question_type``, ``modality``, ``status`` (``ok``/``empty``/``missing``), ``gt``,
            ``pred``, the normalised strings and every per-question metric.
        extra_ids: up to 20 answer ids that match no question (for the message).
        gt_path: the ground-truth file, when known.
        answers_path: the answer file, when known.
    """

    overall: dict[str, float | None]
    by_answer_type: dict[str, dict[str, Any]]
    by_question_type: dict[str, dict[str, Any]]
    by_modality: dict[str, dict[str, Any]]
    counts: dict[str, int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra_ids: list[Any] = field(default_factory=list)
    gt_path: str = ""
    answers_path: str = ""

    def to_dict(self, include_rows: bool = True) -> dict[str, Any]:
        """JSON-ready dict for ``results.json`` (metrics as fractions in [0, 1]).

        Args:
            include_rows: include the per-question rows (``questions``).
        """
        d: dict[str, Any] = {
            "gt": self.gt_path, "answers": self.answers_path,
            "metrics": dict(self.overall), "counts": dict(self.counts),
            "by_answer_type": self.by_answer_type, "by_question_type": self.by_question_type,
            "by_modality": self.by_modality, "extra_ids": list(self.extra_ids),
            "metric_labels": dict(METRICS),
        }
        if include_rows:
            d["questions"] = self.rows
        return d


def _aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the rows it applies to (``None`` where none apply)."""
    closed = [r for r in rows if r["answer_type"] == "CLOSED"]
    opened = [r for r in rows if r["answer_type"] == "OPEN"]
    out: dict[str, Any] = {"n": len(rows), "open": len(opened), "closed": len(closed)}
    for key in METRICS:
        group = closed if key in CLOSED_METRICS else opened if key in OPEN_METRICS else rows
        col = _ROW_FIELD.get(key, key)
        out[key] = sum(r[col] for r in group) / len(group) if group else None
    return out


def _grouped(rows: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault(str(r[key]), []).append(r)
    return {k: _aggregate(v) for k, v in sorted(groups.items())}


def _as_conversation(obj: Conversation | dict, path: str, index: int) -> Conversation:
    if isinstance(obj, Conversation):
        return obj
    return parse_conversation(obj, path, index, require_image=False, strict=False)


def _as_answer(obj: Answer | dict, path: str, index: int) -> Answer:
    if isinstance(obj, Answer):
        return obj
    if not isinstance(obj, dict):
        raise data_error(path, f"#{index}", None, f"expected an object, found {type(obj).__name__}")
    if "question_id" not in obj:
        raise data_error(path, f"#{index}", "question_id", "missing")
    if "text" not in obj:
        raise data_error(path, obj["question_id"], "text", "missing")
    text = obj["text"]
    return Answer(obj["question_id"], "" if text is None else str(text))


def _answer_type(conv: Conversation, path: str) -> tuple[str, bool]:
    raw = conv.extra.get("answer_type")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return infer_answer_type(conv.answer()), True
    at = str(raw).strip().upper()
    if at not in ("OPEN", "CLOSED"):
        raise data_error(path, conv.id, "answer_type", f"expected OPEN or CLOSED, found {raw!r}",
                         "fix the ground-truth file, or drop the key to infer it (yes/no → CLOSED)")
    return at, False


def score_vqa(gt: Iterable[Conversation | dict], answers: Iterable[Answer | dict],
              gt_path: str | os.PathLike = "", answers_path: str | os.PathLike = "") -> VQAReport:
    """Score answers against VQA ground truth, matched by id.

    Args:
        gt: ground-truth records (:class:`Conversation` or raw dicts in the conversation format);
            the answer is the first gpt turn; ``answer_type``, ``question_type`` and ``modality``
            are read from the record when present (a missing ``answer_type`` is inferred: yes/no
            → CLOSED, else OPEN, and counted).
        answers: answer records (:class:`Answer` or dicts with ``question_id`` and ``text``);
            ``question_id`` is the ground-truth ``id`` (compared as strings, so 7 matches "7").
        gt_path: ground-truth file name, for messages and the report.
        answers_path: answer file name, for messages and the report.

    Returns:
        The :class:`VQAReport`. A question without an answer scores 0 on every metric and is
        counted as missing; an answer whose text is blank is scored (0 almost everywhere) and
        counted as empty; answers for unknown ids are counted as extra.

    Raises:
        DataError: a malformed record, a duplicate id on either side, an invalid ``answer_type``,
            or an answer file that matches none of the ground-truth ids (another dataset's file).
    """
    gt_name = str(gt_path) or "<ground truth>"
    ans_name = str(answers_path) or "<answers>"
    convs = [_as_conversation(obj, gt_name, i) for i, obj in enumerate(gt)]
    by_id: dict[str, Answer] = {}
    order: list[Answer] = []
    for i, obj in enumerate(answers):
        ans = _as_answer(obj, ans_name, i)
        key = str(ans.question_id)
        if key in by_id:
            raise data_error(ans_name, ans.question_id, "question_id", "duplicate id",
                             "each question must be answered once; remove the repeated line")
        by_id[key] = ans
        order.append(ans)

    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    inferred = missing = empty = 0
    for conv in convs:
        key = str(conv.id)
        if key in seen:
            raise data_error(gt_name, conv.id, "id", "duplicate id", "ids must be unique")
        seen.add(key)
        if len(conv.turns) < 2:
            raise data_error(gt_name, conv.id, conv.key, "no answer turn (expected human, gpt)")
        at, was_inferred = _answer_type(conv, gt_name)
        inferred += was_inferred
        ans = by_id.get(key)
        pred = ans.text if ans is not None else None
        if ans is None:
            status = "missing"
            missing += 1
        elif not pred.strip():
            status = "empty"
            empty += 1
        else:
            status = "ok"
        row: dict[str, Any] = {"id": conv.id, "answer_type": at,
                               "question_type": conv.extra.get("question_type"),
                               "modality": conv.extra.get("modality"), "status": status,
                               "gt": conv.answer(), "pred": pred}
        row.update(score_answer(conv.answer(), pred, at))
        rows.append(row)

    extra = [a.question_id for a in order if str(a.question_id) not in seen]
    if convs and order and len(extra) == len(order):
        raise DataError(
            f"{ans_name}: none of its {len(order)} answers matches a question id of {gt_name} "
            f"(e.g. answer id {order[0].question_id!r}, question id {convs[0].id!r})",
            "is the answer file for another dataset? pass the matching --gt / --dataset")
    counts = {"n": len(rows), "open": sum(r["answer_type"] == "OPEN" for r in rows),
              "closed": sum(r["answer_type"] == "CLOSED" for r in rows),
              "answered": len(rows) - missing, "missing": missing, "empty": empty,
              "extra": len(extra), "answer_type_inferred": inferred}
    overall = _aggregate(rows)
    for k in ("n", "open", "closed"):
        overall.pop(k)
    return VQAReport(
        overall=overall,
        by_answer_type=_grouped(rows, "answer_type"),
        by_question_type=_grouped(rows, "question_type"),
        by_modality=_grouped(rows, "modality"),
        counts=counts, rows=rows, extra_ids=extra[:20],
        gt_path=str(gt_path), answers_path=str(answers_path))


# ---------------------------------------------------------------------------------------------
# Rendering helpers for the CLI (plain data; the CLI owns Rich)
# ---------------------------------------------------------------------------------------------

def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 2)


def render_rows(report: VQAReport) -> list[tuple[str, float | int | None]]:
    """Rows of (label, value) for a two-column table: metrics in percent, then the counts.

    Metrics without a question of their kind show ``None`` (print as "-").
    """
    rows: list[tuple[str, float | int | None]] = [
        (label, _pct(report.overall[key])) for key, label in METRICS.items()]
    c = report.counts
    rows += [("questions", c["n"]), ("open questions", c["open"]),
             ("closed questions", c["closed"]), ("missing predictions", c["missing"]),
             ("empty predictions", c["empty"]), ("extra answers (unknown ids)", c["extra"])]
    if c["answer_type_inferred"]:
        rows.append(("answer_type inferred (yes/no → CLOSED)", c["answer_type_inferred"]))
    return rows


_BREAKDOWN_KEYS = ("paper_closed_acc", "strict_closed_acc", "paper_open_recall", "open_token_f1",
                   "exact_match")


def breakdown_rows(report: VQAReport, by: str = "answer_type",
                   metrics: Sequence[str] = _BREAKDOWN_KEYS) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of a breakdown table (values in percent).

    Args:
        report: the report.
        by: ``answer_type``, ``question_type`` or ``modality``.
        metrics: metric keys to show as columns.

    Returns:
        ``(columns, rows)``; ``rows`` is empty when the data has no such field.
    """
    groups = {"answer_type": report.by_answer_type, "question_type": report.by_question_type,
              "modality": report.by_modality}[by]
    columns = [by, "n", *metrics]
    rows = [[name, g["n"], *(_pct(g[m]) for m in metrics)] for name, g in groups.items()]
    return columns, rows
