"""``--json``: every command prints exactly one JSON document on stdout and nothing else.

The commands print their result through one helper (``llavamed_cli._console.Output``); here the
cheap commands run with and without ``--json`` (the expensive ones — chat, train, demo, weights,
eval vqa with a model, data download/extract — have their own ``--json`` tests): with it, stdout
parses as a single JSON object; without it, stdout is the human form, not JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL_QA50
from llm_server import LLMServer, judge_responder


@pytest.fixture(autouse=True)
def _llm_env(llm_env, monkeypatch, tmp_path):
    """A local LLM server only (conftest's ``llm_env``), run from the test's folder."""
    monkeypatch.chdir(tmp_path)  # `config show` reads no llavamed.toml of the repository


def _figs(tmp: Path) -> Path:
    recs = [{"pair_id": f"p{i}", "fig_caption": f"Chest X-ray number {i} with an opacity.",
             "domain": {"chest_xray": True}} for i in range(2)]
    path = tmp / "figs.json"
    path.write_text(json.dumps(recs))
    return path


def _generations(tmp: Path) -> Path:
    path = tmp / "gen.jsonl"
    path.write_text("".join(json.dumps({"pair_id": f"p{i}", "domain": {"chest_xray": True},
                                        "response": "User: What is shown?\nAssistant: An opacity in the left lung."})
                            + "\n" for i in range(3)))
    return path


def _answers(tmp: Path, synth: Path) -> Path:
    path = tmp / "a.jsonl"
    recs = json.loads((synth / "test.json").read_text())
    path.write_text("".join(json.dumps({"question_id": r["id"], "text": r["conversations"][1]["value"]}) + "\n"
                            for r in recs))
    return path


def _qa_answers(tmp: Path) -> Path:
    path = tmp / "qa.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "text": f"model answer {q}.", "answer_id": f"a{q}",
                                        "model_id": "tiny", "metadata": {}}) + "\n" for q in range(2)))
    return path


# Each case: the command's arguments, given the test folder, the synthetic data and the LLM server.
CASES = {
    "config show": lambda t, d, url: ["config", "show"],
    "data synth": lambda t, d, url: ["data", "synth", "--out", t / "s", "--n", "2", "--n-test", "2"],
    "data validate": lambda t, d, url: ["data", "validate", d / "test.json", "--images", d / "images"],
    "data view": lambda t, d, url: ["data", "view", d / "images" / "test_00000.png", "--out", t / "v.png"],
    "instruct post": lambda t, d, url: ["instruct", "post", "--input", _generations(t), "--output", t / "p.json"],
    "instruct gen": lambda t, d, url: ["instruct", "gen", "--input", _figs(t), "--output", t / "g.jsonl",
                                       "--base-url", url],
    "eval gpt-score": lambda t, d, url: ["eval", "gpt-score", "--questions", REAL_QA50, "--answers",
                                         _qa_answers(t), "--output", t / "r.jsonl", "--base-url", url],
    "eval vqa (score a file)": lambda t, d, url: ["eval", "vqa", "--answers", _answers(t, d), "--gt", d / "test.json",
                                                  "--out", t / "ev"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_json_prints_one_document_and_nothing_else(cli, synth_data, tmp_path, name):
    (tmp_path / "h").mkdir()
    (tmp_path / "j").mkdir()
    with LLMServer(judge_responder()) as srv:
        human = cli(*CASES[name](tmp_path / "h", synth_data, srv.url))
        machine = cli(*CASES[name](tmp_path / "j", synth_data, srv.url), "--json")
    assert machine.exit_code == 0, machine
    doc = json.loads(machine.stdout)  # one document, and nothing else on stdout
    assert isinstance(doc, dict) and doc
    assert machine.stdout == json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    assert "Traceback" not in machine.stderr
    assert human.exit_code == 0, human
    with pytest.raises(json.JSONDecodeError):
        json.loads(human.stdout)  # without --json: the table or lines for a person


def test_output_prints_one_form_per_mode(capsys):
    from llavamed_cli._console import Output

    machine = Output(True)
    machine.table("t", ["a"], [[1]])
    machine.text("line")
    machine.result({"a": 1})
    with pytest.raises(RuntimeError, match="one JSON document"):
        machine.result({"a": 2})
    assert json.loads(capsys.readouterr().out) == {"a": 1}

    person = Output(False)
    person.result({"a": 1})
    person.text("line")
    assert capsys.readouterr().out == "line\n"
