"""``llavamed eval gpt-score`` against a real local OpenAI-compatible server, on the released qa50
questions: join by question_id, the judge prompt, robust score parsing, one retry of unreadable
reviews, faults, resume, and the paper's bucket counts through ``eval summarize``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REAL_QA50
from llm_server import LLMServer, drop, error, judge_responder, last_user_text, reply

from llavamed_core.eval.judge import parse_scores


@pytest.fixture(autouse=True)
def _llm_env(llm_env):
    """Every test here talks to a local LLM server only (conftest's ``llm_env``)."""


def qa50() -> list[dict]:
    return [json.loads(line) for line in REAL_QA50.read_text().splitlines() if line.strip()]


def write_answers(path: Path, qids, extra=()) -> Path:
    with open(path, "w") as fh:
        for q in list(qids)[::-1]:  # reversed: the join must not depend on line order
            fh.write(json.dumps({"question_id": q, "prompt": "p", "text": f"model answer {q}.",
                                 "answer_id": f"a{q}", "model_id": "tiny", "metadata": {}}) + "\n")
        for q in extra:
            fh.write(json.dumps({"question_id": q, "text": "orphan"}) + "\n")
    return path


def answer_qid(body: dict) -> int:
    return int(re.search(r"model answer (\d+)\.", last_user_text(body)).group(1))


def scores_for(qid: int) -> tuple[int, int]:
    """Deterministic judge scores per question (reference, model)."""
    return 6 + qid % 5, 1 + qid % 9


def gpt_args(srv, answers, out, *extra):
    return ["eval", "gpt-score", "--questions", REAL_QA50, "--answers", answers, "--output", out,
            "--base-url", srv.url, "--backoff", "0.01", "--concurrency", "8", *extra]


@pytest.mark.parametrize("text,expected", [
    ("8 6\nBecause...", (8, 6)),
    ("  \n**7 5**\nreason", (7, 5)),
    ("8, 6", (8, 6)),
    ("Scores: 8/10 and 6.5/10", (8, 6.5)),
    ("Assistant 1: 9  Assistant 2: 4", (9, 4)),
    ("Assistant 1: 9\nAssistant 2: 4\nAssistant 1 was better.", (9, 4)),
    ("10 10", (10, 10)),
    ("I think both are good.", None),
    ("eight and six", None),
    ("8\nbecause", None),
    ("12 6", None),
    ("0 5", None),
    ("8 6 7", None),
    ("", None),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_real_qa50_through_gpt_score_and_summarize(cli, tmp_path):
    qs = qa50()
    answers = write_answers(tmp_path / "answers.jsonl", [q["question_id"] for q in qs])
    out = tmp_path / "reviews.jsonl"
    with LLMServer(judge_responder(lambda b: scores_for(answer_qid(b)))) as srv:
        res = cli(*gpt_args(srv, answers, out))
        assert res.exit_code == 0, res
        assert len(srv.completion_requests()) == 193
        # The judge prompt: caption and mentions as context, the question without <image>,
        # the reference as answer 1 and the model's answer as answer 2, two scores asked for.
        q0 = qs[0]
        body = next(r.body for r in srv.completion_requests() if answer_qid(r.body) == 0)
        text = last_user_text(body)
        assert q0["fig_caption"] in text
        assert "Inflammatory cells were not found in the vicinity (Fig. 3, 4, 5)." in text
        assert "[Question]\nWhat is the organ in the image?\n" in text and "<image>" not in text
        assert text.index(q0["gpt4_answer"]) < text.index("[Assistant 2]\nmodel answer 0.")
        assert "two scores" in text and body["temperature"] == 0.2
    reviews = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["question_id"] for r in reviews) == list(range(193))
    r0 = next(r for r in reviews if r["question_id"] == 7)
    assert (r0["ref_score"], r0["model_score"]) == scores_for(7) and r0["scored"] is True
    assert r0["type"] == "conversation" and r0["domain_bucket"] in ("chest_xray", "mri", "histology", "gross", "ct_scan")
    assert r0["review"].startswith(f"{scores_for(7)[0]} {scores_for(7)[1]}\n")

    summ = cli("eval", "summarize", out, "--format", "json")
    assert summ.exit_code == 0, summ
    (s,) = json.loads(summ.stdout)
    counts = {k: v["n"] for k, v in s["buckets"].items()}
    assert counts == {"conversation": 143, "detailed_description": 50, "chest_xray": 37, "mri": 38,
                      "histology": 44, "gross": 34, "ct_scan": 40, "overall": 193}
    # The relative score is the mean of per-question ratios, computed here independently.
    ratios = [scores_for(q)[1] / scores_for(q)[0] * 100 for q in range(193)]
    assert s["buckets"]["overall"]["relative"] == pytest.approx(sum(ratios) / 193, abs=1e-3)
    conv = [scores_for(q["question_id"]) for q in qs if q["type"] == "conversation"]
    assert s["buckets"]["conversation"]["mean_ref"] == pytest.approx(sum(a for a, _ in conv) / 143, abs=1e-3)

    table = cli("eval", "summarize", out, "--questions", REAL_QA50)
    assert table.exit_code == 0 and "CXR" in table.stdout and "Overall" in table.stdout
    assert "193" in table.stdout and table.stderr == ""


def test_join_by_id_reports_missing_on_both_sides(cli, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", [q for q in range(193) if q not in (3, 50, 120)],
                            extra=[500, 501])
    with LLMServer(judge_responder()) as srv:
        res = cli(*gpt_args(srv, answers, tmp_path / "r.jsonl", "--json"))
        assert res.exit_code == 0, res
        data = json.loads(res.stdout)
        assert data["missing_answers"] == [3, 50, 120] and data["unknown_answers"] == [500, 501]
        assert data["joined"] == 190 and data["scored"] == 190
        assert "3 question(s) have no answer" in res.stderr and "ids 3, 50, 120" in res.stderr
        assert "2 answer(s) match no question" in res.stderr and "500, 501" in res.stderr
        nothing = write_answers(tmp_path / "n.jsonl", [], extra=[900])
        res = cli(*gpt_args(srv, nothing, tmp_path / "r2.jsonl"))
        assert res.exit_code == 1 and "no answer matches a question_id" in res.stderr


def test_unreadable_review_is_retried_once_then_unscored(cli, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", range(12))
    out = tmp_path / "r.jsonl"
    with LLMServer(judge_responder()) as srv:
        srv.script("model answer 4.", reply("Both answers are fine."), reply("Assistant 1: 9/10\nAssistant 2: 3/10"))
        srv.script("model answer 5.", reply("I cannot score."), reply("Still cannot."))
        srv.script("model answer 6.", error(429, retry_after="0.05"), error(500), drop())
        res = cli(*gpt_args(srv, answers, out, "--json"))
        assert res.exit_code == 0, res
        data = json.loads(res.stdout)
        assert data["scored"] == 11 and data["unscored"] == 1 and data["retried_unparseable"] == 2
        assert data["failed"] == 0 and data["usage"]["retries"] == 3
        assert len(srv.completion_requests()) == 12 + 2 + 3
        assert "1 review(s) had no readable scores" in res.stderr
        reviews = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert len(reviews) == 12
        assert (reviews[4]["ref_score"], reviews[4]["model_score"], reviews[4]["judge_tries"]) == (9, 3, 2)
        assert reviews[5]["scored"] is False and reviews[5]["ref_score"] is None
        assert reviews[5]["review"] == "Still cannot." and "unparseable" in reviews[5]["reason"]

        # Resume: nothing left to ask.
        n = len(srv.completion_requests())
        res = cli(*gpt_args(srv, answers, out, "--json"))
        assert json.loads(res.stdout)["requested"] == 0 and len(srv.completion_requests()) == n
        # --retry-unscored asks again for the unscored one only, and replaces its record.
        res = cli(*gpt_args(srv, answers, out, "--json", "--retry-unscored"))
        data = json.loads(res.stdout)
        assert data["requested"] == 1 and data["scored"] == 1
        reviews = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(reviews) == 12 and all(r["scored"] for r in reviews)
        summ = cli("eval", "summarize", out, "--format", "json")
        assert json.loads(summ.stdout)[0]["buckets"]["overall"]["n"] == 12


def test_failed_requests_are_not_reviews_and_rerun_fills_them(cli, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", range(6))
    out = tmp_path / "r.jsonl"
    with LLMServer(judge_responder()) as srv:
        srv.script("model answer 2.", *[error(500)] * 2)
        res = cli(*gpt_args(srv, answers, out, "--max-retries", "1", "--json"))
        assert res.exit_code == 0, res
        assert json.loads(res.stdout)["failed"] == 1
        assert "1 request(s) failed (HTTP 500" in res.stderr
        assert sorted(json.loads(line)["question_id"] for line in out.read_text().splitlines()) == [0, 1, 3, 4, 5]
        failures = [json.loads(line) for line in (tmp_path / "r.failures.jsonl").read_text().splitlines()]
        assert failures == [{"question_id": 2, "reason": "HTTP 500 after 2 attempts", "attempts": 2}]
        res = cli(*gpt_args(srv, answers, out, "--json"))
        assert json.loads(res.stdout)["scored"] == 1
    assert sorted(json.loads(line)["question_id"] for line in out.read_text().splitlines()) == list(range(6))


def test_output_that_is_an_input_or_a_directory(cli, tmp_path):
    answers = write_answers(tmp_path / "answers.jsonl", [1, 2])
    before = answers.read_bytes()
    args = ["eval", "gpt-score", "--questions", REAL_QA50, "--answers", answers, "--base-url", "http://127.0.0.1:9"]
    r = cli(*args, "--output", answers)
    assert r.exit_code == 1 and "--output" in r.stderr and "is the same path as --answers" in r.stderr
    assert answers.read_bytes() == before
    r = cli(*args, "--output", tmp_path)
    assert r.exit_code == 1 and "is a directory" in r.stderr and "Traceback" not in r.stderr
