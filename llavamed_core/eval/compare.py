"""Runs side by side: VQA runs and chat-benchmark review files, each figure with a 95 % bootstrap
interval, and each run against the first one as a paired difference on the same questions.

A *run* is either

- an ``eval vqa`` output: a folder holding ``results.json``, ``answers.jsonl`` and ``run.json``, or
  the ``NAME.results.json`` that ``eval vqa --answers --gt`` writes beside an answer file. Its
  per-question scores are recomputed from the answers and the question file with
  :func:`~llavamed_core.eval.vqa_metrics.score_vqa`, and must reproduce results.json's figures
  exactly (else the answers or questions changed after scoring, and the run is refused). Rows: per
  dataset, closed and open questions, the paper's metric and a strict one (:data:`VQA_ROWS`).
- an ``eval gpt-score`` review file (:mod:`.summary`): rows are the relative score per question type,
  per domain and overall; a question's score is its model ÷ reference score (× 100 when shown).

Comparability (a pair of runs): both must cover the same question ids, and their question files
must have the same sha256 (for VQA the file each was scored against; for review files the one their
``NAME.run.json`` records, when both have one). Otherwise no difference is computed and the table
says "not comparable" (with the reason on stderr). Review files are paired on the questions scored
in both.

The tables (Markdown, LaTeX, CSV with the csv module) are written here by hand: pandas or tabulate
would add a dependency for a few dozen cells, and the Markdown must match the chat table's layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, data_error
from .bootstrap import Estimate, mean_ci, paired_difference

__all__ = ["VQA_ROWS", "Row", "Run", "Difference", "Comparison", "load_vqa_run", "load_runs", "compare_runs",
           "is_vqa_run"]

VQA_ROWS: dict[str, tuple[str, str, str]] = {
    "paper_closed_acc": ("CLOSED", "closed, paper", "paper_closed_hit"),
    "strict_closed_acc": ("CLOSED", "closed, strict", "strict_closed_hit"),
    "paper_open_recall": ("OPEN", "open, paper", "paper_open_recall"),
    "open_token_f1": ("OPEN", "open, strict", "open_token_f1"),
}
"""VQA metric key → (answer type it is computed over, row label, per-question field of ``score_vqa``).
Paper: ground truth is a substring of the answer (closed), word recall (open), the paper's 'Closed'
and 'Open'. Strict: the first yes/no word must be the answer (closed), SQuAD token F1 (open)."""


@dataclass
class Row:
    """One row of one run: the per-question scores behind a figure.

    Attributes:
        label: shown in the table (``closed, paper``, ``Overall``, ...).
        ids: question ids of the scores, in order.
        scores: one score per id: a fraction (VQA), model ÷ reference (chat).
        all_ids: every question id this row covers, scored or not (comparability).
        scale: factor to percent (100; the means are taken before scaling, as the figures were).
    """

    label: str
    ids: list[str]
    scores: list[float]
    all_ids: frozenset[str]
    scale: float = 1.0


@dataclass
class Run:
    """One column of the table.

    Attributes:
        kind: ``vqa`` or ``chat``.
        path: the folder or file given.
        label: the column name.
        section: the dataset name (VQA) or ``chat``.
        provenance: ``model``, ``model_fingerprint``, ``judge``, ``answers_run_id``, ``run_id``,
            ``questions_sha256`` (``None`` when unknown).
        rows: row key → :class:`Row`, in display order.
        results: for VQA, results.json's metrics (fractions) the rows reproduce.
        summary: for chat, the :class:`~.summary.ReviewSummary` of the file.
    """

    kind: str
    path: str
    label: str
    section: str
    provenance: dict[str, Any]
    rows: dict[str, Row] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    summary: Any = None


@dataclass
class Difference:
    """One run minus the baseline on one row: ``estimate`` in points, or ``note`` saying why not."""

    estimate: Estimate | None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d: dict[str, Any] = {"comparable": self.estimate is not None, "note": self.note}
        if self.estimate is not None:
            d.update(self.estimate.to_dict())
        return d


@dataclass
class Comparison:
    """Everything the summary shows.

    Attributes:
        runs: the columns, baseline first.
        rows: ``(section, row key, label)`` in display order (the union over runs).
        estimates: ``(run index, section, row key)`` → :class:`Estimate` in percent.
        differences: ``(run index ≥ 1, section, row key)`` → :class:`Difference` against run 0.
        n_boot: resamples per interval.
        seed: seed of the draws.
    """

    runs: list[Run]
    rows: list[tuple[str, str, str]]
    estimates: dict[tuple[int, str, str], Estimate]
    differences: dict[tuple[int, str, str], Difference]
    n_boot: int
    seed: int


def is_vqa_run(path: str | os.PathLike) -> bool:
    """A folder (an ``eval vqa --out``) or a ``results.json`` / ``NAME.results.json`` file."""
    p = Path(path)
    return p.is_dir() or p.name == "results.json" or p.name.endswith(".results.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", "give an `eval vqa` output folder (results.json, "
                        "answers.jsonl, run.json) or a review file of `eval gpt-score`") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _existing(candidates: list[Any], base: Path) -> Path | None:
    for c in candidates:
        if c:
            p = Path(c)
            for q in (p, base / p):
                if q.is_file():
                    return q
    return None


def _vqa_inputs(p: Path, results_path: Path, res: dict[str, Any], dataset: dict[str, Any]) -> tuple[Path, Path]:
    """The answer file and the question file a results.json was computed from."""
    folder = p if p.is_dir() else p.parent
    answers = _existing([folder / "answers.jsonl" if p.is_dir() else None, res.get("answers_file"),
                         res.get("answers")], folder)
    # The file the figures were computed against: a generating run's question file (its absolute path
    # in run.json first: results.json holds the path as typed), or the --gt of a scoring run.
    named = [res.get("gt"), res.get("questions_file")]
    questions = _existing([dataset.get("path"), *named] if res.get("kind") == "vqa" else [*named, dataset.get("path")],
                          folder)
    if answers is None:
        raise data_error(results_path, None, "answers_file", "the answer file is not there",
                         "keep answers.jsonl beside results.json")
    if questions is None:
        shown = dataset.get("path") or res.get("questions_file") or res.get("gt")
        raise data_error(results_path, None, "questions_file", f"question file {shown} not found",
                         "the per-question scores are recomputed from it; put it back where the run read it")
    return answers, questions


def load_vqa_run(path: str | os.PathLike) -> Run:
    """Read an ``eval vqa`` output and recompute its per-question scores (see the module notes).

    Raises:
        DataError: a missing or unreadable results.json, answer or question file; a chat-benchmark
            answer folder (no ground truth); a question file changed since the run; figures that
            the answers no longer reproduce.
    """
    from ..records import load_answers, load_conversations
    from .provenance import file_sha256, read_header
    from .vqa_metrics import score_vqa

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    results_path = p / "results.json" if p.is_dir() else p
    res = _read_json(results_path)
    if res.get("kind") == "qa50" or ("metrics" not in res and res.get("answers_file")):
        raise DataError(f"{results_path}: answers to the chat benchmark (no ground truth, no VQA metrics)",
                        "judge them with `llavamed eval gpt-score`, then summarize the review file")
    if not isinstance(res.get("metrics"), dict):
        raise data_error(results_path, None, "metrics", "missing: not a results.json of `eval vqa`")
    prov = res.get("provenance") if isinstance(res.get("provenance"), dict) else None
    if prov is None and p.is_dir() and (folder / "run.json").exists():
        prov = read_header(folder / "run.json")
    prov = prov or {}
    dataset = prov.get("dataset") or {}
    answers, questions = _vqa_inputs(p, results_path, res, dataset)
    sha, actual = dataset.get("sha256"), file_sha256(questions)
    same_file = bool(dataset.get("path")) and Path(dataset["path"]).resolve() == questions.resolve()
    if sha and same_file and actual != sha:
        raise DataError(f"{questions}: changed since the run in {folder} (sha256 {sha[:12]} in its run.json)",
                        "score the answers again against the current file, or restore the original")
    convs = load_conversations(questions, require_image=False, strict=False)
    if res.get("limit"):
        convs = convs[:int(res["limit"])]
    report = score_vqa(convs, load_answers(answers), gt_path=str(questions), answers_path=str(answers))
    for key in VQA_ROWS:
        want, got = res["metrics"].get(key), report.overall.get(key)
        if want != got:
            raise data_error(results_path, None, f"metrics.{key}",
                             f"is {want} but {answers.name} scored against {questions.name} gives {got}",
                             "the answers changed after scoring: score them again with `llavamed eval vqa "
                             "--answers FILE --gt FILE`")
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    label = p.name if p.is_dir() else p.parent.name if p.name == "results.json" else p.name.removesuffix(".results.json")
    run = Run("vqa", str(p), label,
              str(res.get("dataset") or dataset.get("name") or Path(questions).name),
              {"model": model.get("name") or res.get("model_id") or None,
               "model_fingerprint": model.get("fingerprint"), "judge": None,
               "answers_run_id": prov.get("run_id") or res.get("run_id"), "run_id": None,
               "questions_sha256": actual},
              results=dict(res["metrics"]))
    for key, (atype, row_label, col) in VQA_ROWS.items():
        group = [r for r in report.rows if r["answer_type"] == atype]
        if group:
            ids = [str(r["id"]) for r in group]
            run.rows[key] = Row(row_label, ids, [float(r[col]) for r in group], frozenset(ids), 100.0)
    return run


def _chat_runs(paths: list[Path], questions: str | os.PathLike | None) -> list[Run]:
    from .provenance import read_header
    from .summary import BUCKET_LABELS, summarize_reviews

    runs = []
    for s in summarize_reviews(paths, questions):
        head = read_header(Path(s.path).with_name(f"{Path(s.path).stem}.run.json")) or {}
        prov = dict(s.provenance, questions_sha256=(head.get("questions") or {}).get("sha256"))
        run = Run("chat", s.path, s.label, "chat", prov, summary=s)
        for name, group in s.groups.items():
            sel = s.rows if group == "overall" else [r for r in s.rows if getattr(r, group) == name]
            scored = [r for r in sel if r.ref is not None]
            run.rows[name] = Row(BUCKET_LABELS.get(name, name), [str(r.question_id) for r in scored],
                                 [r.model / r.ref for r in scored],
                                 frozenset(str(r.question_id) for r in sel), 100.0)
        runs.append(run)
    return runs


def _labels(runs: list[Run]) -> None:
    """Make column labels unique: the name, else parent/name, else the path given."""
    if len({r.label for r in runs}) == len(runs):
        return
    for r in runs:
        r.label = f"{Path(r.path).resolve().parent.name}/{r.label}"
    if len({r.label for r in runs}) < len(runs):
        for r in runs:
            r.label = r.path


def load_runs(paths: list[str | os.PathLike], questions: str | os.PathLike | None = None) -> list[Run]:
    """Read each path as a VQA run (:func:`is_vqa_run`) or a review file, in the order given.

    Args:
        paths: folders / results files of ``eval vqa`` and review files of ``eval gpt-score``.
        questions: qa50 question file for review files (type, domain; see :mod:`.summary`).

    Raises:
        DataError: no paths, or any unreadable or inconsistent run.
    """
    if not paths:
        raise DataError("no runs given", "e.g. `llavamed eval summarize runs/eval-a runs/eval-b`")
    ps = [Path(p) for p in paths]
    reviews = [p for p in ps if not is_vqa_run(p)]
    chat = dict(zip(reviews, _chat_runs(reviews, questions))) if reviews else {}
    runs = [chat[p] if p in chat else load_vqa_run(p) for p in ps]
    _labels(runs)
    return runs


def _comparable(base: Run, other: Run) -> str | None:
    """Why two runs of one section cannot be paired (``None`` when they can)."""
    ids_a = frozenset().union(*(r.all_ids for r in base.rows.values()))
    ids_b = frozenset().union(*(r.all_ids for r in other.rows.values()))
    if ids_a != ids_b:
        return (f"not comparable: different questions ({len(ids_a - ids_b)} only in {base.label}, "
                f"{len(ids_b - ids_a)} only in {other.label})")
    qa, qb = base.provenance.get("questions_sha256"), other.provenance.get("questions_sha256")
    if qa and qb and qa != qb:
        return f"not comparable: different question files (sha256 {qa[:12]} vs {qb[:12]})"
    return None


def _pair(a: Row, b: Row, n_boot: int, seed: int) -> Difference:
    sa, sb = dict(zip(a.ids, a.scores)), dict(zip(b.ids, b.scores))
    both = [q for q in a.ids if q in sb]  # scored in both (all of them for VQA), in question order
    est = paired_difference([sa[q] for q in both], [sb[q] for q in both], n_boot, seed).scaled(a.scale)
    note = None if len(both) == len(a.ids) == len(b.ids) else f"on the {len(both)} questions scored in both"
    return Difference(est, note)


def compare_runs(runs: list[Run], n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Estimates with 95 % intervals for every run and row, and each run minus the first.

    Args:
        runs: from :func:`load_runs`; the first is the baseline.
        n_boot: bootstrap resamples (0: point estimates only).
        seed: seed of the draws (each estimate restarts from it).
    """
    rows: list[tuple[str, str, str]] = []
    for run in runs:
        for key, row in run.rows.items():
            if (run.section, key, row.label) not in rows:
                rows.append((run.section, key, row.label))
    estimates, differences = {}, {}
    for i, run in enumerate(runs):
        for key, row in run.rows.items():
            estimates[(i, run.section, key)] = mean_ci(row.scores, n_boot, seed).scaled(row.scale)
    base = runs[0]
    for i, run in enumerate(runs[1:], 1):
        if run.section != base.section:
            continue
        why = _comparable(base, run)
        for key in base.rows:
            if key in run.rows:
                differences[(i, run.section, key)] = Difference(None, why) if why else \
                    _pair(base.rows[key], run.rows[key], n_boot, seed)
    return Comparison(runs, rows, estimates, differences, n_boot, seed)


# ---------------------------------------------------------------------------------------------
# Rendering (plain data and text; the CLI owns Rich). Percent with one decimal; differences signed.
# ---------------------------------------------------------------------------------------------

def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    r = round(v, 1) or 0.0  # never "-0.0"
    return f"{r:+.1f}" if signed else f"{r:.1f}"


def format_estimate(est: Estimate | None, signed: bool = False, sep: str = " ") -> str:
    """``52.3 [48.1, 56.4]`` (``sep`` between the value and the interval), ``-`` when there is none."""
    if est is None or est.value is None:
        return "-"
    if est.low is None:
        return _num(est.value, signed)
    return f"{_num(est.value, signed)}{sep}[{_num(est.low, signed)}, {_num(est.high, signed)}]"


def _diff_cell(d: Difference | None, sep: str = " ") -> str:
    if d is None:
        return "-"
    return "not comparable" if d.estimate is None else format_estimate(d.estimate, True, sep)


def difference_label(c: Comparison, i: int) -> str:
    """``B − A`` for run ``i`` against the baseline."""
    return f"{c.runs[i].label} − {c.runs[0].label}"


def sections(c: Comparison) -> list[str]:
    """The datasets (and ``chat``) of the rows, in order."""
    return list(dict.fromkeys(s for s, _, _ in c.rows))


def comparison_rows(c: Comparison, sep: str = " ") -> tuple[list[str], list[list[Any]]]:
    """The side-by-side table: one row per (dataset, metric); per run its figure with the interval,
    then per later run its difference to the first. A ``dataset`` column only when there are several."""
    multi = len(sections(c)) > 1
    paired = [i for i in range(1, len(c.runs)) if any(j == i for j, _, _ in c.differences)]
    cols = (["dataset"] if multi else []) + ["metric", "n", *(r.label for r in c.runs),
                                              *(difference_label(c, i) for i in paired)]
    rows = []
    for section, key, label in c.rows:
        ns = sorted({e.n for (i, s, k), e in c.estimates.items() if (s, k) == (section, key)})
        row: list[Any] = ([section] if multi else []) + [label, ns[0] if len(ns) == 1 else "/".join(map(str, ns))]
        row += [format_estimate(c.estimates.get((i, section, key)), sep=sep) for i in range(len(c.runs))]
        row += [_diff_cell(c.differences.get((i, section, key)), sep) for i in paired]
        rows.append(row)
    return cols, rows


def comparison_title(c: Comparison) -> str:
    """The table's title: the dataset when there is one, and the units."""
    secs = sections(c)
    what = secs[0] if len(secs) == 1 else "runs side by side"
    if secs == ["chat"]:
        what = "chat benchmark, relative score (mean of model/ref x 100)"
    return f"{what}: % with 95 % CI"


def comparison_caption(c: Comparison, sep: str = "; ") -> str:
    """What the intervals and differences are (its parts joined by ``sep``)."""
    parts = [f"95 % CI: percentile bootstrap over questions, {c.n_boot} resamples, seed {c.seed}"
             if c.n_boot > 0 else "no intervals (--bootstrap 0)"]
    if c.differences:
        label = difference_label(c, 1) if len(c.runs) == 2 else "B − " + c.runs[0].label
        if len(label) > 30:  # long run names: the column header already says which runs
            label = "each difference"
        parts.append(f"{label}: paired on the same questions, in points")
    if any(r.kind == "vqa" for r in c.runs):
        parts.append("paper: the truth is in the answer (closed), word recall (open)")
        parts.append("strict: the first yes/no word (closed), token F1 (open)")
    return sep.join(parts)


def not_comparable_notes(c: Comparison) -> list[str]:
    """One line per pair of runs that could not be compared, and per difference computed on fewer
    questions than the figures (review files with questions unscored in one of them)."""
    out: list[str] = []
    for (i, section, key), d in c.differences.items():
        if d.note and d.estimate is None:
            line = f"{difference_label(c, i)} ({section}): {d.note}"
        elif d.note:
            label = next(lb for s, k, lb in c.rows if (s, k) == (section, key))
            line = f"{difference_label(c, i)}, {section} {label}: {d.note}"
        else:
            continue
        if line not in out:
            out.append(line)
    return out


def _md(cols: list[str], rows: list[list[Any]], text_cols: int) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] * text_cols + ["---:"] * (len(cols) - text_cols)) + "|"]
    return lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]


def to_markdown(c: Comparison) -> str:
    """GitHub Markdown: one row per run saying what made it, then (review files only) the chat
    benchmark's score table, then the side-by-side table with intervals and differences."""
    from . import summary

    chat = [r.summary for r in c.runs if r.kind == "chat"]
    if len(chat) == len(c.runs):
        head = summary.to_markdown(chat).rstrip("\n").split("\n")
    else:
        pcols, prows = summary.provenance_rows(c.runs)
        head = _md(pcols, [[summary._fmt(v) for v in r] for r in prows], len(pcols))
    cols, rows = comparison_rows(c)
    text = 2 if cols[0] == "dataset" else 1
    return "\n".join([*head, "", f"**{comparison_title(c)}** ({comparison_caption(c)})", "",
                      *_md(cols, rows, text)]) + "\n"


def _tex(text: str) -> str:
    out = []
    for ch in str(text):
        out.append({"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                    "−": "$-$"}.get(ch, ch))
    return "".join(out)


def to_latex(c: Comparison) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``) of the side-by-side table, its caption as
    a comment above."""
    cols, rows = comparison_rows(c)
    text = 2 if cols[0] == "dataset" else 1
    lines = [f"% {comparison_title(c)}; {comparison_caption(c)}",
             r"\begin{tabular}{" + "l" * text + "r" * (len(cols) - text) + "}", r"\toprule",
             " & ".join(_tex(h) for h in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(v) for v in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["kind", "section", "metric", "value", "ci_low", "ci_high", "vs", "difference",
               "difference_ci_low", "difference_ci_high", "difference_n", "note"]
"""Columns after the chat-benchmark ones of :func:`~.summary.to_csv` (one line per run and row)."""


def to_csv(c: Comparison) -> str:
    """Long-format CSV, one line per run and row: the review-file columns of ``summary.to_csv``
    (empty for VQA runs, where ``group`` is closed/open and ``bucket`` the metric key), then
    :data:`CSV_COLUMNS` (percent, rounded to 4 decimals; the difference against the first run)."""
    import csv
    import io

    from . import summary

    r4 = (lambda v: "" if v is None else round(v, 4))  # noqa: E731
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(summary.CSV_COLUMNS + CSV_COLUMNS)
    for i, run in enumerate(c.runs):
        for key, row in run.rows.items():
            if run.kind == "chat":
                head = summary.csv_fields(run.summary, key)
            else:
                p = run.provenance
                head = [run.path, run.label, p.get("model") or "", (p.get("model_fingerprint") or "")[:12], "",
                        VQA_ROWS[key][0].lower(), key, len(row.ids), "", "", "", ""]
            e = c.estimates[(i, run.section, key)]
            d = c.differences.get((i, run.section, key))
            de = d.estimate if d is not None else None
            w.writerow(head + [run.kind, run.section, key, r4(e.value), r4(e.low), r4(e.high),
                               c.runs[0].label if d is not None else "",
                               r4(de.value if de else None), r4(de.low if de else None),
                               r4(de.high if de else None), de.n if de else "", (d.note or "") if d else ""])
    return buf.getvalue()


def to_json(c: Comparison) -> list[dict[str, Any]]:
    """One object per run: review files as ``summary.to_json`` gives them, VQA runs with their
    dataset, provenance and results.json figures; each with ``estimates`` (percent) and, after the
    first, ``difference`` (against the first, in points)."""
    out = []
    for i, run in enumerate(c.runs):
        if run.kind == "chat":
            d = run.summary.to_dict()
        else:
            d = {"path": run.path, "label": run.label, "dataset": run.section, "provenance": run.provenance,
                 "metrics": {k: run.results.get(k) for k in VQA_ROWS}}
        d["kind"] = run.kind
        d["bootstrap"] = {"resamples": c.n_boot, "seed": c.seed, "level": 0.95}
        d["estimates"] = {k: c.estimates[(i, run.section, k)].to_dict() for k in run.rows}
        if i:
            d["difference"] = {"vs": c.runs[0].label,
                               "rows": {k: diff.to_dict() for (j, _, k), diff in c.differences.items() if j == i}}
        out.append(d)
    return out


def require_matplotlib() -> None:
    """Check that ``--plot`` can work, before any run is read.

    Raises:
        DependencyError: matplotlib is not installed.
    """
    from ..errors import DependencyError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DependencyError("--plot needs matplotlib, which is not installed",
                              "pip install 'llavamed[plot]'  (or: pip install matplotlib)") from None


def plot(c: Comparison, path: str | os.PathLike) -> Path:
    """A bar chart of the table (one group of bars per row, one bar per run, 95 % CI as error bars),
    written atomically as PNG.

    Raises:
        DependencyError: matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    from ..io import atomic_write

    multi = len(sections(c)) > 1
    names = [f"{s}: {lb}" if multi else lb for s, _, lb in c.rows]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) * max(1, len(c.runs)) / 2 + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(c.runs)
    for i, run in enumerate(c.runs):
        xs, ys, lo, hi = [], [], [], []
        for x, (s, k, _) in enumerate(c.rows):
            e = c.estimates.get((i, s, k))
            if e is None or e.value is None:
                continue
            xs.append(x - 0.4 + width * (i + 0.5))
            ys.append(e.value)
            lo.append(e.value - (e.low if e.low is not None else e.value))
            hi.append((e.high if e.high is not None else e.value) - e.value)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=run.label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("% (95 % CI)" if c.n_boot > 0 else "%")
    ax.set_title(comparison_title(c))
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    with atomic_write(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    return out
