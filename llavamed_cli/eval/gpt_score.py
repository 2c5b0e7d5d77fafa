"""``llavamed eval gpt-score``: an LLM judge scores a model's chat-benchmark answers (resumable).

Example::

    export OPENAI_API_KEY=...
    llavamed eval gpt-score --questions llava_med_eval_qa50_qa.jsonl --answers answers.jsonl \
        --output reviews.jsonl --judge gpt-4o
    llavamed eval summarize reviews.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llavamed_core.eval.judge import JUDGE_REQUEST
from llavamed_core.llm import LLMConfig

from .. import _console
from .._llm_options import MaxFailuresOpt, llm_options, usage_rows
from .._options import JsonOpt
from . import app


def _ids(ids: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def _made_by(ans: dict) -> str:
    name = ans.get("model") or "-"
    if ans.get("model_fingerprint"):
        return f"{name} (fingerprint {ans['model_fingerprint'][:12]})"
    return f"{name} at {ans['server']}" if ans.get("server") else name


@app.command("gpt-score")
@llm_options(JUDGE_REQUEST, ("--judge",), "Judge model (Azure: deployment name).")
def gpt_score(
    questions: Annotated[Path, typer.Option("--questions", "-q", help="Chat-benchmark questions (llava_med_eval_qa50_qa.jsonl).")],
    answers: Annotated[Path, typer.Option("--answers", "-a", help="The model's answer file (JSONL), joined by question_id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Reviews JSONL; appended, and a rerun resumes.")],
    llm: LLMConfig,
    retry_unscored: Annotated[bool, typer.Option("--retry-unscored", help="Ask again for reviews an earlier run recorded as unscored.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the reviews already in --output and start over (needed when the judge, its settings or the answers' model changed).")] = False,
    max_failures: MaxFailuresOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score each answer against the reference with an LLM judge (two 1-10 scores per question)."""
    from llavamed_core.eval.judge import JudgeConfig, review_header_path, score_answers

    cfg = JudgeConfig(questions=questions, answers=answers, output=output, llm=llm,
                      retry_unscored=retry_unscored, overwrite=overwrite, max_failures=max_failures)
    with _console.progress() as cb:
        res = score_answers(cfg, progress=cb)
    if res.missing_answers:
        _console.warn(f"{len(res.missing_answers)} question(s) have no answer in {answers}: ids {_ids(res.missing_answers)}")
    if res.unknown_answers:
        _console.warn(f"{len(res.unknown_answers)} answer(s) match no question in {questions}: ids {_ids(res.unknown_answers)}")
    if res.unscored:
        _console.warn(f"{res.unscored} review(s) had no readable scores after a second try; recorded as "
                      "unscored (rerun with --retry-unscored to ask again)")
    if res.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(res.failure_reasons.items()))
        _console.warn(f"{res.failed} request(s) failed ({reasons}); rerun the same command to ask again")
    out = _console.Output(json_out)
    out.result(res.to_dict())
    rows = [["output", str(res.output)], ["endpoint", f"{res.endpoint['url']} ({res.endpoint['provider']})"],
            ["judge", llm.model],
            ["answers by", _made_by(res.provenance.get("answers") or {})],
            ["run (settings in)", f"{res.run_id} ({review_header_path(res.output)})"],
            ["questions / answers / joined", f"{res.questions} / {res.answers} / {res.joined}"],
            ["already reviewed", res.already_done], ["asked now", res.requested], ["scored", res.scored],
            ["unscored", res.unscored], ["re-asked (unreadable first reply)", res.retried_unparseable],
            ["failed", res.failed]]
    out.table("eval gpt-score", ["", "value"], rows + usage_rows(res.usage, res.elapsed_s))
    _console.info(f"Next: llavamed eval summarize {res.output}")
