"""The shared mechanisms of the resumable jobs: the resumable JSONL output, the LLM job runner, the
LLM options defined once, and the one image check / record-image loader.

Each shortcut is held against the straight path: a run resumed after a torn last line, or after a
stop at ``--max-failures``, ends with the records of one uninterrupted run; a header-only image
check agrees with the full decode wherever the header decides.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from conftest import REAL_QA50
from llm_server import LLMServer, error, judge_responder, last_user_text
from typer.testing import CliRunner

from llavamed_core.errors import DataError, LLMError
from llavamed_core.images import image_problem, load_record_image
from llavamed_core.io import ResumableJsonl
from llavamed_core.llm import LLMClient, LLMConfig
from llavamed_core.llm_jobs import failures_path, run_llm_job


@pytest.fixture(autouse=True)
def _llm_env(llm_env):
    """Every test here talks to a local LLM server only (conftest's ``llm_env``)."""


def _records(n: int) -> list[dict]:
    return [{"question_id": i, "text": f"answer {i} ü"} for i in range(n)]


def _write_all(path: Path, records: list[dict]) -> None:
    with ResumableJsonl(path, "question_id") as out:
        for rec in out.pending(records, lambda r: r["question_id"]):
            out.write(rec)


# --- resumable JSONL -------------------------------------------------------------------------------

def test_resume_after_a_torn_last_line_equals_a_fresh_run(tmp_path):
    records = _records(8)
    fresh = tmp_path / "fresh.jsonl"
    _write_all(fresh, records)

    resumed = tmp_path / "resumed.jsonl"
    _write_all(resumed, records[:5])
    with open(resumed, "a", encoding="utf-8") as fh:  # a kill in the middle of record 5
        fh.write(json.dumps(records[5])[:11])
    out = ResumableJsonl(resumed, "question_id")
    assert sorted(out.done) == ["0", "1", "2", "3", "4"]  # the torn line is not a record
    assert [r["question_id"] for r in out.pending(records, lambda r: r["question_id"])] == [5, 6, 7]
    _write_all(resumed, records)
    assert resumed.read_bytes() == fresh.read_bytes()


def test_a_repeated_id_counts_once_and_is_never_written_again(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"question_id": 1, "v": "first"}, {"question_id": 2}, {"question_id": "1", "v": "again"}]))
    out = ResumableJsonl(path, "question_id")
    assert out.duplicates == 1 and out.done["1"]["v"] == "first" and len(out) == 2 and 2 in out
    with out:
        assert out.write({"question_id": 2, "v": "new"}) is False
        assert out.write({"question_id": 3}) is True
    assert [json.loads(ln)["question_id"] for ln in path.read_text().splitlines()] == [1, 2, "1", 3]
    out.rewrite(["3", "1", "2"])  # in a given order, once each
    assert [json.loads(ln).get("v") for ln in path.read_text().splitlines()] == [None, "first", None]


def test_a_record_without_the_id_names_file_line_and_field(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"pair_id": "a"}\n\n{"caption": "x"}\n')
    with pytest.raises(DataError) as exc:
        ResumableJsonl(path, "pair_id", "the existing output", "choose a new path")
    assert exc.value.message == f"{path}, record line 3, field 'pair_id': missing in the existing output"
    assert exc.value.hint == "choose a new path"


def test_drop_removes_only_the_unwanted_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.jsonl"
    recs = [{"question_id": i, "scored": i % 2 == 0} for i in range(6)]
    _write_all(path, recs)
    out = ResumableJsonl(path, "question_id")
    assert out.drop(lambda r: not r["scored"]) == 3
    assert [json.loads(ln)["question_id"] for ln in path.read_text().splitlines()] == [0, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]
    assert ResumableJsonl(path, "question_id").done == out.done


# --- the LLM job runner ----------------------------------------------------------------------------

def _job(srv, out_path: Path, items: list[int], max_failures=None, events=None):
    llm = LLMConfig(model="m", base_url=srv.url, concurrency=1, max_retries=0, use_cache=False)
    out = ResumableJsonl(out_path, "question_id")
    todo = out.pending(items, lambda i: i)
    with LLMClient(llm) as client:
        return run_llm_job(todo, lambda i: client.complete([{"role": "user", "content": f"item {i}."}]),
                           lambda i, r: {"question_id": i, "text": r.text}, out, lambda i: i, client,
                           max_failures=max_failures, progress=events.append if events is not None else None,
                           task="t", unit="item")


def _echo(body: dict) -> str:
    return "echo " + last_user_text(body)


def test_a_job_stopped_at_max_failures_then_rerun_equals_an_uninterrupted_run(tmp_path):
    items = list(range(6))
    with LLMServer(_echo) as srv:
        _job(srv, tmp_path / "straight.jsonl", items)
        srv.script("item 2.", error(400), error(400))
        srv.script("item 3.", error(400))
        stopped = tmp_path / "stopped.jsonl"
        with pytest.raises(LLMError, match=r"2 requests failed, more than --max-failures 1 \(HTTP 400: 2\)"):
            _job(srv, stopped, items, max_failures=1)
        kept = [json.loads(ln)["question_id"] for ln in stopped.read_text().splitlines()]
        assert kept == [0, 1]  # what was answered before the stop is kept
        fails = [json.loads(ln) for ln in failures_path(stopped).read_text().splitlines()]
        assert [f["question_id"] for f in fails] == [2, 3] and all(f["attempts"] == 1 for f in fails)

        events: list = []
        tally = _job(srv, stopped, items, events=events)  # item 2 fails once more, then a third run
        assert (tally.requested, tally.succeeded, tally.failed) == (4, 3, 1)
        assert events[-1].finished and (events[-1].done, events[-1].total) == (4, 4)
        assert events[-1].info["ok"] == 3 and events[-1].info["failed"] == 1
        tally = _job(srv, stopped, items)
        assert (tally.requested, tally.succeeded, tally.failed) == (1, 1, 0)
    assert not failures_path(stopped).exists()  # the latest run failed nothing
    by_id = lambda p: sorted((json.loads(ln) for ln in p.read_text().splitlines()), key=lambda r: r["question_id"])  # noqa: E731
    assert by_id(stopped) == by_id(tmp_path / "straight.jsonl")


def test_a_job_where_every_request_fails_raises_and_keeps_an_empty_output(tmp_path):
    with LLMServer(_echo) as srv:
        for i in range(3):
            srv.script(f"item {i}.", error(400))
        with pytest.raises(LLMError, match=r"all 3 requests failed \(HTTP 400: 3\)"):
            _job(srv, tmp_path / "o.jsonl", [0, 1, 2])
    assert (tmp_path / "o.jsonl").read_text() == ""
    assert len(failures_path(tmp_path / "o.jsonl").read_text().splitlines()) == 3


def _answers(path: Path, qids) -> Path:
    path.write_text("".join(json.dumps({"question_id": q, "text": f"model answer {q}.", "answer_id": f"a{q}",
                                        "model_id": "tiny", "metadata": {}}) + "\n" for q in qids))
    return path


def _scores(body: dict) -> tuple[int, int]:
    q = int(re.search(r"model answer (\d+)\.", last_user_text(body)).group(1))
    return 6 + q % 5, 1 + q % 9


def test_gpt_score_max_failures_then_rerun_equals_an_uninterrupted_run(cli, tmp_path):
    answers = _answers(tmp_path / "a.jsonl", range(6))
    args = ["eval", "gpt-score", "--questions", REAL_QA50, "--answers", answers, "--concurrency", "1",
            "--max-retries", "0"]
    with LLMServer(judge_responder(_scores)) as srv:
        args += ["--base-url", srv.url]
        assert cli(*args, "--output", tmp_path / "straight.jsonl", "--no-cache").exit_code == 0
        srv.script("model answer 3.", error(400))
        res = cli(*args, "--output", tmp_path / "r.jsonl", "--max-failures", "0", "--no-cache")
        assert res.exit_code == 1 and "1 requests failed, more than --max-failures 0" in res.stderr
        assert "Traceback" not in res.stderr
        assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3  # 0, 1, 2 kept
        res = cli(*args, "--output", tmp_path / "r.jsonl", "--no-cache", "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["already_done"] == 3
    same = lambda p: sorted(({k: v for k, v in json.loads(ln).items() if k != "run_id"}  # noqa: E731
                             for ln in p.read_text().splitlines()), key=lambda r: r["question_id"])
    assert same(tmp_path / "r.jsonl") == same(tmp_path / "straight.jsonl")


def test_gpt_score_where_every_request_fails_exits_1(cli, tmp_path):
    answers = _answers(tmp_path / "a.jsonl", range(3))
    with LLMServer(judge_responder(_scores)) as srv:
        for q in range(3):
            srv.script(f"model answer {q}.", error(400))
        res = cli("eval", "gpt-score", "--questions", REAL_QA50, "--answers", answers, "--output",
                  tmp_path / "r.jsonl", "--base-url", srv.url, "--concurrency", "1")
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(("Error:", "Hint:"))]
    assert res.exit_code == 1 and res.stdout == "" and "Traceback" not in res.stderr
    assert lines == [f"Error: all 3 requests failed (HTTP 400: 3); listed in {tmp_path / 'r.failures.jsonl'}",
                     "Hint: check the endpoint, model name and quota, then rerun the same command"]
    assert (tmp_path / "r.jsonl").read_text() == "" and (tmp_path / "r.run.json").exists()


# --- LLM options, defined once ---------------------------------------------------------------------

def test_llm_option_defaults_are_the_cores():
    from llavamed_core.eval.judge import JUDGE_REQUEST
    from llavamed_core.instruct.generate import GEN_REQUEST
    from llavamed_cli.main import app

    root = typer.main.get_command(app)
    for group, name, request, model_flag in (("instruct", "gen", GEN_REQUEST, "--model"),
                                             ("eval", "gpt-score", JUDGE_REQUEST, "--judge")):
        params = {p.name: p for p in root.commands[group].commands[name].params}
        assert params["model"].default == request["model"] and model_flag in params["model"].opts
        assert params["temperature"].default == request["temperature"]
        assert params["max_tokens"].default == request["max_tokens"]
        for field in ("concurrency", "max_retries", "backoff", "timeout", "provider"):
            assert params[field].default == getattr(LLMConfig, field), field
        assert params["no_cache"].default is False and "max_failures" in params and "json_out" in params


def test_llm_options_hand_the_command_one_config():
    from llavamed_cli._llm_options import llm_options

    seen: list = []
    app = typer.Typer()

    @app.command()
    @llm_options({"model": "m0", "temperature": 0.3}, ("--model",), "model")
    def run(name: str, llm: LLMConfig, json_out: bool = False) -> None:
        seen.append((name, llm, json_out))

    runner = CliRunner()
    assert runner.invoke(app, ["x"]).exit_code == 0
    assert runner.invoke(app, ["y", "--model", "m1", "--concurrency", "3", "--no-cache", "--rpm", "60",
                               "--json-out"]).exit_code == 0
    assert seen[0] == ("x", LLMConfig(model="m0", temperature=0.3), False)
    assert seen[1] == ("y", LLMConfig(model="m1", temperature=0.3, concurrency=3, use_cache=False, rpm=60), True)


# --- one image check, one record-image loader ------------------------------------------------------

def _png(path: Path, size=(64, 48)) -> Path:
    from PIL import Image

    Image.effect_noise(size, 40).convert("RGB").save(path)
    return path


def test_image_problem_header_only_agrees_with_the_full_decode_where_the_header_decides(tmp_path):
    good = _png(tmp_path / "good.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])  # the header is whole, the pixels are not
    text = tmp_path / "notes.png"
    text.write_text("not an image" * 20)
    for path in (good, text, tmp_path / "missing.png"):
        assert image_problem(path, header_only=True) == image_problem(path)
    assert image_problem(good) is None
    assert image_problem(tmp_path / "missing.png") == ("image-missing", "file not found")
    assert image_problem(text) == ("image-corrupt", "does not decode as an image, DICOM or NIfTI file")
    assert image_problem(cut, header_only=True) is None  # the cheap pass: pixels decode when batched
    kind, reason = image_problem(cut)
    assert kind == "image-corrupt" and reason.startswith("does not decode as an image (")


def test_load_record_image_names_file_record_and_field(tmp_path):
    rgb = load_record_image(_png(tmp_path / "a.png"), "q.jsonl", 7)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    with pytest.raises(DataError) as exc:
        load_record_image(tmp_path / "gone.png", "q.jsonl", 7, then="a rerun resumes")
    assert exc.value.message == f"q.jsonl, record 7, field 'image': {tmp_path / 'gone.png'}: image file not found"
    assert exc.value.hint.startswith("check --images") and exc.value.hint.endswith("; a rerun resumes")
    (tmp_path / "bad.png").write_text("text")
    with pytest.raises(DataError, match=r"q.jsonl, record 8, field 'image': .*bad.png: does not decode as an image"):
        load_record_image(tmp_path / "bad.png", "q.jsonl", 8)
