"""``eval gpt-score``: an LLM judge scores model answers against the reference answers.

Questions (the qa50 JSONL) and answers (an answer file) are joined by ``question_id``, never by line
order; ids missing on either side are reported. For each question the judge sees the figure caption
and the sentences that mention the figure as context, the question, answer 1 (the reference
``gpt4_answer``) and answer 2 (the model's), and must put two 1–10 scores on its first line
(``docs/formats.md``, "LLM-judged chat score"). :func:`parse_scores` reads them robustly; a review
it cannot read is asked once more (bypassing the cache), then recorded as unscored.

Reviews are JSONL, appended as they arrive and resumed by ``question_id``
(:func:`~llavamed_core.llm_jobs.run_llm_job`; requests that fail for good are listed in
``NAME.failures.jsonl`` and asked again by the next run). Each carries what
``eval summarize`` needs: ``question_id``, ``type``, ``domain`` (the five flags) and
``domain_bucket`` (the first true of chest_xray, mri, histology, gross, ct_scan), ``ref_score``,
``model_score`` (``null`` when unscored), ``scored`` and the judge's text in ``review``.

Provenance: ``NAME.run.json`` beside ``NAME.jsonl`` records, before the first review, what decides
the reviews: the judge model, the hash of the judge prompt, temperature, max tokens, the question
file's sha256, which answers are judged (the answer file's run id, or its ``model_id`` for a file of
another tool) and the llavamed version; plus, for readers, the answers' model name and fingerprint
(from the ``run.json`` beside the answer file). Every review carries that header's ``run_id``. A
rerun with another judge, prompt or answer model is refused (``--overwrite`` starts over), so one
review file never mixes judges or models. A resumed review must also still match its answer
(``answer_id``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, data_error
from ..instruct.prompt import mention_texts
from ..io import ResumableJsonl, atomic_write_json
from ..llm import LLMClient, LLMConfig
from ..llm_jobs import check_max_failures, job_client, run_llm_job
from ..progress import ProgressCallback
from ..records import IMAGE_TOKEN, Answer, QA50Question, first_domain, load_answers, load_qa50

__all__ = ["JudgeConfig", "JudgeResult", "judge_messages", "parse_scores", "score_answers",
           "JUDGE_SYSTEM", "JUDGE_REQUEST", "review_header_path"]

JUDGE_REQUEST = {"model": "gpt-4o", "temperature": 0.2, "max_tokens": 1024}
"""The judge's request settings unless told otherwise (``LLMConfig`` fields): a cool temperature,
so that a rerun scores alike; room for the explanation after the scores."""

JUDGE_SYSTEM = ("You are a careful and impartial reviewer of answers to questions about biomedical "
                "images. You judge accuracy against the figure's description and clinical knowledge.")

_INSTRUCTIONS = (
    "Two AI assistants answered the question above about a biomedical figure. You cannot see the "
    "figure; its caption and the sentences of the article that mention it are given as context, "
    "while the question was asked as if the image were visible.\n"
    "Rate the helpfulness, relevance, accuracy and level of detail of each answer, and give each "
    "assistant one overall score from 1 to 10, where a higher score means a better answer.\n"
    "On the first line write only the two scores, for Assistant 1 and Assistant 2 in that order, "
    "separated by a space. From the second line on, explain your judgement. Do not let the order "
    "in which the answers appear, or their length alone, sway you.")


@dataclass
class JudgeConfig:
    """Settings of one ``eval gpt-score`` run."""

    questions: Path
    """The chat-benchmark questions (qa50 JSONL)."""
    answers: Path
    """The model's answer file (JSONL, joined by ``question_id``)."""
    output: Path
    """Reviews JSONL, appended and resumed."""
    llm: LLMConfig
    """The judge endpoint; ``llm.model`` is the judge model."""
    retry_unscored: bool = False
    """Ask again for questions recorded as unscored by an earlier run."""
    overwrite: bool = False
    """Delete the reviews already in ``output`` (and its run header) and start over."""
    max_failures: int | None = None
    """Stop, and fail, once more than this many requests have failed for good (``None``: no
    limit; a run where every request failed fails in any case)."""


@dataclass
class JudgeResult:
    """What one run did, and the ids that did not join."""

    output: Path
    questions: int
    answers: int
    joined: int
    already_done: int
    requested: int
    scored: int = 0
    unscored: int = 0
    failed: int = 0
    retried_unparseable: int = 0
    missing_answers: list[Any] = field(default_factory=list)
    unknown_answers: list[Any] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    endpoint: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    run_id: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dict(self.__dict__)
        d["output"] = str(self.output)
        return d


def judge_messages(q: QA50Question, answer: str) -> list[dict]:
    """The judge's chat messages for one question and one model answer.

    Raises:
        ValueError: an ``in_text_mention`` of unknown shape.
    """
    mentions = mention_texts(q.in_text_mention)
    context = f"Figure caption: {q.fig_caption.strip() or '(none)'}\n"
    context += "Sentences that mention the figure:\n" + (
        "\n".join(f"- {m}" for m in mentions) if mentions else "(none)")
    question = q.text.replace(IMAGE_TOKEN, "").strip()
    user = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{q.gpt4_answer.strip()}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer.strip()}\n\n[End of Assistant 2]\n\n[System]\n{_INSTRUCTIONS}\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])")
_LABELLED = r"(?:assistant|answer)\s*{n}\b[^\d\n]{{0,25}}?(\d+(?:\.\d+)?)"


def _in_range(a: float, b: float) -> bool:
    return 1.0 <= a <= 10.0 and 1.0 <= b <= 10.0


def parse_scores(text: str) -> tuple[float, float] | None:
    """Read the judge's two scores (reference, model).

    Accepts the asked-for first line ``"8 6"`` and common variants: ``"8, 6"``, ``"**8 6**"``,
    ``"Scores: 8/10 and 6/10"``, ``"Assistant 1: 8  Assistant 2: 6"`` (on one line or two), decimals.
    Scores must lie in 1–10.

    Returns:
        The two scores, or ``None`` when the text does not give exactly two in range.
    """
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return None
    first = re.sub(r"[*_`#]", " ", lines[0])
    first = re.sub(r"\b(?:assistant|answer)\s*[12]\b", " ", first, flags=re.I)
    first = re.sub(r"/\s*10(?:\.0+)?\b", " ", first)
    nums = [float(x) for x in _NUMBER.findall(first)]
    if len(nums) == 2 and _in_range(*nums):
        return nums[0], nums[1]
    head = "\n".join(lines[:4])
    m1 = re.search(_LABELLED.format(n=1), head, re.I)
    m2 = re.search(_LABELLED.format(n=2), head, re.I)
    if m1 and m2:
        a, b = float(m1.group(1)), float(m2.group(1))
        if _in_range(a, b):
            return a, b
    return None


def review_header_path(output: str | os.PathLike) -> Path:
    """The run header beside a review file: ``reviews.jsonl`` → ``reviews.run.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.run.json")


def _review_provenance(cfg: JudgeConfig, answers: list[Answer]) -> dict[str, Any]:
    """The run header of a review file (see the module notes).

    Raises:
        ConfigError: the answer file mixes runs or models.
    """
    from .answers import answer_file_provenance
    from .provenance import file_sha256, llavamed_version, make_header

    head = answer_file_provenance(cfg.answers)  # refuses an answer file that mixes runs or models
    model_id = next((a.model_id for a in answers if a.model_id), "")
    rid = next((str(a.metadata["run_id"]) for a in answers if (a.metadata or {}).get("run_id")), "")
    model = (head or {}).get("model") or {}
    prompt = hashlib.sha256(f"{JUDGE_SYSTEM}\0{_INSTRUCTIONS}".encode()).hexdigest()
    checked = {"judge": cfg.llm.model, "judge_prompt_sha256": prompt,
               "temperature": cfg.llm.temperature, "max_tokens": cfg.llm.max_tokens,
               "questions_sha256": file_sha256(cfg.questions),
               "answers": f"run {rid}" if rid else f"model_id {model_id!r}",
               "llavamed_version": llavamed_version()}
    return make_header(checked, {
        "judge": {"model": cfg.llm.model, "provider": cfg.llm.provider, "temperature": cfg.llm.temperature,
                  "max_tokens": cfg.llm.max_tokens, "prompt_sha256": prompt},
        "questions": {"path": str(Path(cfg.questions).resolve()), "sha256": checked["questions_sha256"]},
        "answers": {"path": str(Path(cfg.answers).resolve()), "run_id": rid or None,
                    "model_id": model_id or None, "model": model.get("name") or model_id or None,
                    "model_fingerprint": model.get("fingerprint"), "server": model.get("server"),
                    "settings": (head or {}).get("checked")},
        "llavamed_version": checked["llavamed_version"],
    })


def _check_review_resume(output: Path, header: dict[str, Any], existing: list[dict],
                         answers: dict[str, Answer]) -> None:
    """Refuse to extend reviews made by another judge, prompt or answer model.

    Raises:
        ConfigError: the header's checked settings differ (each difference named), there is no
            header and the reviews carry no matching run id, or a review's answer has changed.
    """
    from .provenance import differences, mismatch_error, read_header

    if not existing:
        return
    hpath = review_header_path(output)
    hint = "pass --overwrite to delete these reviews and start over, or choose another --output"
    old = read_header(hpath)
    if old is None:
        if {str(r.get("run_id")) for r in existing} != {header["run_id"]}:
            raise ConfigError(f"{output}: holds {len(existing)} review(s) but no {hpath.name} records which "
                              "judge, prompt and answers made them, so this run cannot tell whether it "
                              "may add to them", hint)
    elif old["checked"] != header["checked"]:
        raise mismatch_error(str(output), len(existing), hpath, differences(old["checked"], header["checked"]),
                             hint)
    for r in existing:
        if r.get("run_id") != header["run_id"]:
            raise data_error(output, r.get("question_id"), "run_id",
                             f"{r.get('run_id')!r} is not this file's run ({header['run_id']}): the file "
                             "mixes reviews of different runs", hint)
        ans = answers.get(str(r.get("question_id")))
        if ans is not None and r.get("answer_id") and ans.answer_id and r["answer_id"] != ans.answer_id:
            raise data_error(output, r.get("question_id"), "answer_id",
                             f"reviewed answer {r['answer_id']}, but {ans.answer_id} is now the answer in "
                             "the answer file: the answers changed since these reviews", hint)


def score_answers(cfg: JudgeConfig, progress: ProgressCallback | None = None,
                  client: LLMClient | None = None) -> JudgeResult:
    """Have the judge score every joined (question, answer) pair not reviewed yet.

    Args:
        cfg: the run settings.
        progress: receives ``gpt-score`` events (done/total with scored, unscored, tokens, cost).
        client: an existing client (default: one built from ``cfg.llm``).

    Returns:
        Counts, the ids that did not join, failure reasons, usage and the endpoint (no secrets).

    Raises:
        DataError: unreadable inputs, or no question with an answer.
        LLMError: credentials refused, unknown judge model, too many failures in a row, more than
            ``max_failures`` failed, or every request failed. The reviews so far are kept; a rerun
            resumes.
    """
    cfg.llm.check()
    check_max_failures(cfg.max_failures)
    from ..io import check_out_not_overlapping

    if Path(cfg.output).is_dir():
        raise ConfigError(f"--output {cfg.output}: is a directory", "give the review file's path, e.g. reviews.jsonl")
    check_out_not_overlapping(cfg.output, [("--questions", cfg.questions), ("--answers", cfg.answers)], "--output")
    questions = load_qa50(cfg.questions)
    answers = {str(a.question_id): a for a in load_answers(cfg.answers)}
    qids = {str(q.question_id) for q in questions}
    joined = [q for q in questions if str(q.question_id) in answers]
    missing = [q.question_id for q in questions if str(q.question_id) not in answers]
    unknown = [a.question_id for k, a in answers.items() if k not in qids]
    if not joined:
        raise DataError(f"{cfg.answers}: no answer matches a question_id of {cfg.questions}",
                        "are these answers for this question file?")
    for q in joined:
        try:
            mention_texts(q.in_text_mention)
        except ValueError as exc:
            raise data_error(cfg.questions, q.question_id, "in_text_mention", str(exc)) from None
    output = Path(cfg.output)
    header = _review_provenance(cfg, list(answers.values()))
    hpath = review_header_path(output)
    if cfg.overwrite:
        for p in (output, hpath):
            p.unlink(missing_ok=True)
    reviews = ResumableJsonl(output, "question_id", "the existing reviews",
                             "is --output another kind of file? choose a new path")
    existing = len(reviews)
    _check_review_resume(output, header, list(reviews.done.values()), answers)
    if cfg.retry_unscored:
        reviews.drop(lambda rec: not rec.get("scored"))
    todo = reviews.pending(joined, lambda q: q.question_id)
    with job_client(cfg.llm, client) as client:
        res = JudgeResult(output, len(questions), len(answers), len(joined), len(joined) - len(todo),
                          len(todo), missing_answers=missing, unknown_answers=unknown,
                          endpoint={**client.endpoint.describe(), "model": cfg.llm.model},
                          run_id=header["run_id"], provenance=header)

        def judge(q: QA50Question) -> tuple[tuple[float, float] | None, str, int]:
            msgs = judge_messages(q, answers[str(q.question_id)].text)
            first = client.complete(msgs)
            scores = parse_scores(first.text)
            if scores is not None:
                return scores, first.text, 1
            # Unreadable: ask once more, past the cache (which holds the unreadable answer).
            second = client.complete(msgs, refresh=True)
            return parse_scores(second.text), second.text, 2

        def to_record(q: QA50Question, r: tuple[tuple[float, float] | None, str, int]) -> dict:
            scores, text, tries = r
            res.retried_unparseable += int(tries > 1)
            ans = answers[str(q.question_id)]
            rec = {"question_id": q.question_id, "pair_id": q.raw.get("pair_id"), "type": q.type,
                   "domain": q.domain, "domain_bucket": first_domain(q.domain),
                   "judge": cfg.llm.model, "answer_model_id": ans.model_id,
                   "answer_id": ans.answer_id, "run_id": header["run_id"],
                   "answer_run_id": (ans.metadata or {}).get("run_id"),
                   "ref_score": scores[0] if scores else None,
                   "model_score": scores[1] if scores else None,
                   "scored": scores is not None, "review": text, "judge_tries": tries}
            if scores is None:
                rec["reason"] = f"unparseable judge output ({tries} tries)"
                res.unscored += 1
            else:
                res.scored += 1
            return rec

        if not existing or not hpath.exists():
            atomic_write_json(hpath, header)  # before the first review
        tally = run_llm_job(todo, judge, to_record, reviews, lambda q: q.question_id, client,
                            max_failures=cfg.max_failures, progress=progress, task="gpt-score",
                            unit="question", counts=lambda: {"scored": res.scored, "unscored": res.unscored})
    res.failed, res.failure_reasons = tally.failed, tally.failure_reasons
    res.usage, res.elapsed_s = tally.usage, tally.elapsed_s
    return res
