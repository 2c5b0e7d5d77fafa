"""Tests of ``llavamed eval vqa`` (answer generation, resume, split, scoring) on the tiny model.

Real program runs: the resume test kills a real ``llavamed eval vqa`` process mid-run; the split
test starts two real worker processes. Answers are compared with a one-process reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavamed_core.eval.answers import VQAEvalConfig, evaluate_vqa, load_questions
from llavamed_core.io import read_jsonl

MAX_NEW = "16"


def _answers(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for obj in read_jsonl(path):
        assert str(obj["question_id"]) not in out, f"duplicate answer {obj['question_id']}"
        out[str(obj["question_id"])] = obj["text"]
    return out


@pytest.fixture(scope="module")
def reference(tiny_ckpt, synth_data, tmp_path_factory) -> dict[str, str]:
    """Answers of a plain one-process run (core API)."""
    out = tmp_path_factory.mktemp("ref")
    res = evaluate_vqa(VQAEvalConfig(dataset=synth_data / "test.json", out=out, model=tiny_ckpt,
                                     max_new_tokens=int(MAX_NEW)))
    assert res.run.answered == res.run.total > 20
    return _answers(out / "answers.jsonl")


def test_eval_writes_answers_results_and_tables(cli, tiny_ckpt, synth_data, tmp_path, reference):
    out = tmp_path / "ev"
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", MAX_NEW, "--batch-size", "7")
    assert r.exit_code == 0, r
    assert "Closed acc. (paper" in r.stdout and "strict" in r.stdout and "Open recall" in r.stdout
    assert "by question type" in r.stdout and "presence" in r.stdout
    _kind, questions = load_questions(synth_data / "test.json")
    lines = list(read_jsonl(out / "answers.jsonl"))
    # Written in the question file's order, in the released answer format.
    assert [o["question_id"] for o in lines] == [q.id for q in questions]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[0]["model_id"] == tiny_ckpt.name
    assert _answers(out / "answers.jsonl") == reference  # batch size does not change answers
    results = json.loads((out / "results.json").read_text())
    assert results["closed_suffix"] == "" and results["counts"]["n"] == len(questions)
    assert results["counts"]["missing"] == 0
    assert 0.0 <= results["metrics"]["paper_closed_acc"] <= 1.0
    # Scoring the file afterwards gives the same numbers.
    r2 = cli("eval", "vqa", "--answers", out / "answers.jsonl", "--gt", synth_data / "test.json",
             "--out", tmp_path / "scored", "--json")
    assert r2.exit_code == 0, r2
    assert json.loads(r2.stdout)["metrics"] == results["metrics"]
    assert (tmp_path / "scored" / "results.json").exists()


def test_closed_suffix_limit_and_json(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "ev"
    suffix = " Answer yes or no."
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", "4", "--limit", "6", "--closed-suffix", suffix, "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["closed_suffix"] == suffix and res["limit"] == 6 and res["counts"]["n"] == 6
    _kind, questions = load_questions(synth_data / "test.json")
    by_id = {str(q.id): q for q in questions[:6]}
    lines = list(read_jsonl(out / "answers.jsonl"))
    assert len(lines) == 6
    for o in lines:
        q = by_id[str(o["question_id"])]
        assert o["prompt"] == (q.text + suffix if q.answer_type == "CLOSED" else q.text)
    assert {q.answer_type for q in by_id.values()} == {"OPEN", "CLOSED"}


def test_resume_after_kill_answers_only_the_missing(tiny_ckpt, synth_data, tmp_path, cli, reference):
    out = tmp_path / "ev"
    answers = out / "answers.jsonl"
    cmd = [sys.executable, "-m", "llavamed_cli.main", "eval", "vqa", "--model", str(tiny_ckpt),
           "--dataset", str(synth_data / "test.json"), "--out", str(out), "--max-new-tokens", MAX_NEW,
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if answers.exists() and answers.read_text().count("\n") >= 5:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _answers(answers)
    assert 5 <= len(before) < len(reference), "the run must be killed part-way"
    with open(answers, "a") as fh:  # a kill in the middle of a write leaves half a line
        fh.write('{"question_id": "synth-test-000')
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", MAX_NEW, "--json")
    assert r.exit_code == 0, r
    run = json.loads(r.stdout)["run"]
    assert run["resumed"] == len(before)
    assert run["answered"] == len(reference) - len(before)
    assert _answers(answers) == reference
    # A second rerun has nothing to do.
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", MAX_NEW, "--json")
    assert json.loads(r.stdout)["run"]["answered"] == 0
    # ... and a smaller --limit scores its slice of the file.
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", MAX_NEW, "--limit", "5", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["run"]["answered"] == 0 and res["counts"]["n"] == 5
    assert res["counts"]["extra"] == 0


def test_split_over_two_processes_equals_one(cli, tiny_ckpt, synth_data, tmp_path, reference):
    out = tmp_path / "ev"
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", MAX_NEW, "--nproc", "2", "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["generation"]["processes"] == 2
    assert _answers(out / "answers.jsonl") == reference
    assert not list(out.glob("answers.part*")) and not list(out.glob(".worker*"))


def test_image_that_does_not_decode(cli, tiny_ckpt, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    _kind, questions = load_questions(data / "test.json")
    (data / "images" / questions[2].image).write_bytes(b"this is not a PNG")
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", data / "test.json", "--out", tmp_path / "ev",
            "--max-new-tokens", "4")
    assert r.exit_code == 1
    assert "does not decode as an image" in r.stderr and f"record {questions[2].id}" in r.stderr
    assert "field 'image'" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_question_file_with_duplicate_ids(cli, tiny_ckpt, synth_data, tmp_path):
    records = json.loads((synth_data / "test.json").read_text())
    bad = tmp_path / "dup.json"
    bad.write_text(json.dumps(records[:3] + [records[1]]))
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", bad, "--images", synth_data / "images",
            "--out", tmp_path / "ev")
    assert r.exit_code == 1
    assert "duplicate id" in r.stderr and str(records[1]["id"]) in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "ev" / "answers.jsonl").exists()


def test_answer_file_for_another_dataset(cli, tiny_ckpt, synth_data, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"question_id": i, "text": "yes"}) + "\n" for i in range(5)))
    r = cli("eval", "vqa", "--answers", other, "--gt", synth_data / "test.json")
    assert r.exit_code == 1
    assert "none of its 5 answers matches" in r.stderr and "another dataset" in r.stderr
    # The same file left in --out of a generation run is refused, not extended.
    out = tmp_path / "ev"
    out.mkdir()
    shutil.copy(other, out / "answers.jsonl")
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", "4")
    assert r.exit_code == 1 and "another dataset" in r.stderr and "--out" in r.stderr


def test_named_dataset_resolves_under_data_root(cli, tiny_ckpt, synth_data, tmp_path):
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", "vqa-rad", "--data-root", tmp_path / "none",
            "--out", tmp_path / "ev")
    assert r.exit_code == 1 and "not prepared" in r.stderr and "llavamed data prepare vqa-rad" in r.stderr
    shutil.copytree(synth_data, tmp_path / "root" / "vqa-rad")
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", "vqa-rad", "--data-root", tmp_path / "root",
            "--out", tmp_path / "ev", "--limit", "3", "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["dataset"] == "vqa-rad"


def test_qa50_chat_benchmark_file(cli, tiny_ckpt, tmp_path):
    from conftest import REAL_QA50

    lines = [json.loads(x) for x in REAL_QA50.read_text().splitlines()[:3]]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for rec in lines:
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(images / rec["image"])
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", REAL_QA50, "--images", images,
            "--out", tmp_path / "ev", "--limit", "3", "--max-new-tokens", "8")
    assert r.exit_code == 0, r
    assert "gpt-score" in r.stderr and "Closed acc." not in r.stdout
    got = list(read_jsonl(tmp_path / "ev" / "answers.jsonl"))
    assert [o["question_id"] for o in got] == [rec["question_id"] for rec in lines]
    assert got[0]["prompt"] == lines[0]["text"].replace("<image>", "").strip()
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["kind"] == "qa50" and "metrics" not in results
    assert results["generation"]["max_new_tokens"] == 8


def test_usage_errors(cli, tiny_ckpt, synth_data, tmp_path):
    r = cli("eval", "vqa", "--dataset", synth_data / "test.json", "--out", tmp_path / "ev")
    assert r.exit_code == 1 and "no model" in r.stderr and "--server URL" in r.stderr  # none configured
    r = cli("eval", "vqa", "--dataset", synth_data / "test.json", "--model", tiny_ckpt, "--server", "http://x")
    assert r.exit_code == 1 and "exactly one of --model and --server" in r.stderr
    r = cli("eval", "vqa", "--answers", tmp_path / "a.jsonl")
    assert r.exit_code == 1 and "--gt" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),  # not "0 = the default"
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--gpus", "-1"], "--gpus -1: must be at least 0"),
    (["--concurrency", "0"], "--concurrency 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_out_of_range_options_are_refused_before_loading(cli, tiny_ckpt, synth_data, tmp_path, extra, message):
    out = tmp_path / "ev"
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out, *extra)
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {message}"), r
    assert "Traceback" not in r.stderr and not out.exists()


def test_out_that_is_a_file_or_overlaps_an_input(cli, tiny_ckpt_copy, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    base = ["eval", "vqa", "--model", tiny_ckpt_copy, "--dataset", data / "test.json", "--limit", "2"]
    r = cli(*base, "--out", data / "test.json")
    assert r.exit_code == 1 and "is a file, not a directory" in r.stderr
    r = cli(*base, "--out", tiny_ckpt_copy / "eval")
    assert r.exit_code == 1 and "is inside --model" in r.stderr and not (tiny_ckpt_copy / "eval").exists()
    r = cli(*base, "--out", data)
    assert r.exit_code == 1 and "contains --dataset" in r.stderr
    r = cli("eval", "vqa", "--answers", data / "test.json", "--gt", data / "test.json", "--out", data / "test.json")
    assert r.exit_code == 1 and "is a file, not a directory" in r.stderr and "Traceback" not in r.stderr
