"""``llavamed instruct gen`` end to end against a real local OpenAI-compatible server.

Faults (429 with Retry-After, 500s, slow replies past the timeout, dropped connections, malformed
bodies, permanent failures) lose nothing and duplicate nothing; failures are recorded with their
reason and asked again on a rerun; a SIGKILL mid-run followed by a rerun leaves each pair_id
exactly once; the prompt file, mentions, round-robin selection, cache and auth errors behave.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from llm_server import LLMServer, drop, error, last_user_text, malformed, slow

from llavamed_core.instruct.generate import load_figures, select_round_robin

SECRET = "sk-test-SECRET-gen-0123456789"
DOMAINS = ["chest_xray", "mri", "histology", "gross", "ct_scan"]


@pytest.fixture(autouse=True)
def _llm_env(llm_env):
    """Every test here talks to a local LLM server only (conftest's ``llm_env``)."""


def write_figs(path: Path, per_domain: int = 4) -> Path:
    """A fig_captions.json in the released layout: one list per domain, mention shapes mixed."""
    data = {}
    for dom in DOMAINS:
        recs = []
        for i in range(per_domain):
            mention = [{"tokens": f"The {dom} study ( Figure {i} ) shows finding {i} .", "entities": []}] \
                if i % 3 == 0 else ([f"Plain mention of {dom} {i}."] if i % 3 == 1 else None)
            recs.append({"pair_id": f"{dom}-{i}", "pmid": str(i), "fig_id": "F1", "fig_label": "Figure 1",
                         "fig_caption": f"Image of {dom} number {i} showing a finding.",
                         "in_text_mention": mention, "domain": {d: d == dom for d in DOMAINS}})
        data[dom] = recs
    # The same figure listed under a second domain: asked once.
    dup = dict(data["chest_xray"][0])
    data["ct_scan"].insert(1, dup)
    path.write_text(json.dumps(data))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gen_args(srv, figs, out, *extra):
    return ["instruct", "gen", "--input", figs, "--output", out, "--base-url", srv.url, "--backoff", "0.01",
            *extra]


def test_round_robin_selection_is_balanced_and_deduplicated(tmp_path):
    figs = write_figs(tmp_path / "figs.json")
    samples, dups = select_round_robin(figs, load_figures(figs), 7)
    assert [s.pair_id for s in samples] == ["chest_xray-0", "mri-0", "histology-0", "gross-0", "ct_scan-0",
                                            "chest_xray-1", "mri-1"]
    everything, dups = select_round_robin(figs, load_figures(figs), None)
    assert len(everything) == 20 and dups == 1
    assert len({s.pair_id for s in everything}) == 20


def test_gen_survives_every_fault_and_rerun_asks_only_for_the_rest(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json")
    out = tmp_path / "gen.jsonl"
    with LLMServer() as srv:
        srv.script("chest_xray number 1 ", error(429, retry_after="0.05"), error(429, retry_after="0.05"))
        srv.script("mri number 2 ", error(500), error(502))
        srv.script("histology number 3 ", slow(3.0))
        srv.script("gross number 0 ", drop())
        srv.script("ct_scan number 2 ", malformed(), malformed(b"<html>bad gateway</html>"))
        srv.script("mri number 3 ", *[error(503)] * 3)  # more than --max-retries 2: fails for good
        srv.script("gross number 2 ", error(400, message="prompt too long"))
        res = cli(*gen_args(srv, figs, out, "--concurrency", "4", "--timeout", "1", "--max-retries", "2"))
        assert res.exit_code == 0, res
        recs = read_out(out)
        ids = [r["pair_id"] for r in recs]
        assert len(ids) == len(set(ids)) == 18
        assert "mri-3" not in ids and "gross-2" not in ids
        fails = {f["pair_id"]: f for f in read_out(tmp_path / "gen.failures.jsonl")}
        assert set(fails) == {"mri-3", "gross-2"}
        assert fails["mri-3"]["reason"] == "HTTP 503 after 3 attempts" and fails["mri-3"]["attempts"] == 3
        assert fails["gross-2"]["reason"].startswith("HTTP 400: prompt too long")
        assert "2 figure(s) failed (HTTP 400: 1, HTTP 503: 1)" in res.stderr
        assert "gen.failures.jsonl" in res.stderr
        assert "answered" in res.stdout and "18" in res.stdout
        # The raw model text is kept with the input record and its domain.
        rec = next(r for r in recs if r["pair_id"] == "histology-3")
        assert rec["response"].startswith("User:") and rec["domain"]["histology"] is True
        assert rec["fig_caption"] == "Image of histology number 3 showing a finding."
        n_before = len(srv.completion_requests())

        res2 = cli(*gen_args(srv, figs, out, "--json"))
        assert res2.exit_code == 0, res2
        summary = json.loads(res2.stdout)
        assert summary["already_done"] == 18 and summary["requested"] == 2 and summary["succeeded"] == 2
        asked = [last_user_text(r.body) for r in srv.completion_requests()[n_before:]]
        assert len(asked) == 2 and any("mri number 3 " in a for a in asked)
    ids = [r["pair_id"] for r in read_out(out)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 20
    assert not (tmp_path / "gen.failures.jsonl").exists()  # the rerun failed nothing: no empty file


def test_prompt_file_and_inline_mentions_reach_the_model(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json", per_domain=1)
    prompt = tmp_path / "prompt.md"
    prompt.write_text("# mine\n\n## System\nCUSTOM SYSTEM TEXT\nwrapped line.\n\n## Example: one\n"
                      "### Caption\nExample caption.\n### Mentions\n- Example mention.\n"
                      "### Conversation\nUser: Q?\nAssistant: A.\n")
    with LLMServer() as srv:
        res = cli(*gen_args(srv, figs, tmp_path / "a.jsonl", "--prompt-file", prompt, "--inline-mentions",
                            "--max-size", "1", "--model", "judge-x", "--temperature", "0.3"))
        assert res.exit_code == 0, res
        (req,) = srv.completion_requests()
        msgs = req.body["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
        assert msgs[0]["content"] == "CUSTOM SYSTEM TEXT wrapped line."
        assert "Example mention." in msgs[1]["content"] and msgs[2]["content"] == "User: Q?\nAssistant: A."
        # The tokenised mention is detokenised and shown with the caption.
        assert "Image of chest_xray number 0" in msgs[3]["content"]
        assert "- The chest_xray study (Figure 0) shows finding 0." in msgs[3]["content"]
        assert req.body["model"] == "judge-x" and req.body["temperature"] == 0.3

        res = cli(*gen_args(srv, figs, tmp_path / "b.jsonl", "--max-size", "1"))
        assert res.exit_code == 0, res
        msgs = srv.completion_requests()[-1].body["messages"]
        assert len(msgs) == 2 + 2 * 5  # the packaged prompt: five few-shot examples, one per domain
        assert all("Sentences in the article" not in m["content"] for m in msgs)
        assert "finding 0" not in msgs[-1]["content"]


def test_cache_makes_a_repeat_free(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json", per_domain=1)
    with LLMServer() as srv:
        assert cli(*gen_args(srv, figs, tmp_path / "a.jsonl")).exit_code == 0
        assert len(srv.completion_requests()) == 5
        res = cli(*gen_args(srv, figs, tmp_path / "b.jsonl", "--json"))
        assert json.loads(res.stdout)["usage"]["cache_hits"] == 5
        assert len(srv.completion_requests()) == 5
        assert cli(*gen_args(srv, figs, tmp_path / "c.jsonl", "--no-cache")).exit_code == 0
        assert len(srv.completion_requests()) == 10
    responses = lambda f: {r["pair_id"]: r["response"] for r in read_out(tmp_path / f)}  # noqa: E731
    assert responses("b.jsonl") == responses("a.jsonl") and len(responses("a.jsonl")) == 5


def test_auth_error_exits_at_once_without_showing_the_key(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json")
    with LLMServer() as srv:
        srv.script("", *[error(401, message=f"Incorrect API key provided: {SECRET}")] * 50)
        res = cli(*gen_args(srv, figs, tmp_path / "g.jsonl", "--concurrency", "1"),
                  env={"OPENAI_API_KEY": SECRET})
        assert res.exit_code == 1, res
        assert "Error:" in res.stderr and "HTTP 401" in res.stderr and "OPENAI_API_KEY" in res.stderr
        assert SECRET not in res.stderr + res.stdout
        assert len(srv.completion_requests()) == 1


def test_help_never_shows_secrets(cli, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    for cmd in (["instruct", "gen", "--help"], ["eval", "gpt-score", "--help"]):
        res = cli(*cmd)
        assert res.exit_code == 0 and SECRET not in res.stdout and "--concurrency" in res.stdout


def test_bad_input_names_file_record_and_field(cli, tmp_path):
    figs = tmp_path / "figs.json"
    figs.write_text(json.dumps({"chest_xray": [{"pair_id": "a", "fig_caption": "x"},
                                               {"pair_id": "b", "fig_caption": ""}]}))
    with LLMServer() as srv:
        res = cli(*gen_args(srv, figs, tmp_path / "g.jsonl"))
        assert res.exit_code == 1
        assert f"Error: {figs}, record b, field 'fig_caption': missing or empty" in res.stderr
        assert srv.completion_requests() == []  # checked before asking anything
        figs.write_text(json.dumps({"chest_xray": [{"fig_caption": "x"}]}))
        res = cli(*gen_args(srv, figs, tmp_path / "g.jsonl"))
        assert res.exit_code == 1 and "record chest_xray[0], field 'pair_id'" in res.stderr
        res = cli(*gen_args(srv, tmp_path / "missing.json", tmp_path / "g.jsonl"))
        assert res.exit_code == 1 and "file not found" in res.stderr
        res = cli(*gen_args(srv, figs, tmp_path / "g.jsonl", "--concurrency", "0"))
        assert res.exit_code == 1 and "--concurrency must be at least 1" in res.stderr


def test_sigkill_mid_run_then_rerun_keeps_each_pair_once(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json", per_domain=8)  # 40 figures
    out = tmp_path / "gen.jsonl"
    with LLMServer(latency=0.15) as srv:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "llavamed_cli.main",
               *map(str, gen_args(srv, figs, out, "--concurrency", "4"))]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if out.exists() and out.read_text().count("\n") >= 8:
                    break
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        done_at_kill = len(read_out(out))
        assert 8 <= done_at_kill < 40
        # A write cut by the kill leaves half a line; the rerun must cut it, not keep or duplicate it.
        with open(out, "a") as fh:
            fh.write('{"pair_id": "mri-5", "respo')
        res = cli(*gen_args(srv, figs, out, "--concurrency", "4", "--json"))
        assert res.exit_code == 0, res
        summary = json.loads(res.stdout)
        assert summary["already_done"] == done_at_kill
        assert summary["succeeded"] == 40 - done_at_kill and summary["failed"] == 0
    counts = Counter(r["pair_id"] for r in read_out(out))
    assert len(counts) == 40 and set(counts.values()) == {1}


def test_azure_flags_reach_the_server_as_azure(cli, tmp_path):
    figs = write_figs(tmp_path / "figs.json", per_domain=1)
    with LLMServer() as srv:
        res = cli("instruct", "gen", "-i", figs, "-o", tmp_path / "g.jsonl", "--max-size", "2",
                  "--azure-endpoint", srv.root, "--api-version", "2024-06-01", "--model", "gpt4-deploy",
                  env={"AZURE_OPENAI_API_KEY": SECRET})
        assert res.exit_code == 0, res
        reqs = srv.completion_requests()
        assert len(reqs) == 2
        for r in reqs:
            assert r.path == "/openai/deployments/gpt4-deploy/chat/completions"
            assert r.query["api-version"] == ["2024-06-01"] and r.headers["api-key"] == SECRET
        assert "(azure)" in res.stdout and SECRET not in res.stdout + res.stderr
        # Azure without a key: a clear configuration error, nothing sent.
        res = cli("instruct", "gen", "-i", figs, "-o", tmp_path / "h.jsonl", "--azure-endpoint", srv.root,
                  "--api-version", "2024-06-01")
        assert res.exit_code == 1 and "AZURE_OPENAI_API_KEY is not set" in res.stderr
        assert len(srv.completion_requests()) == 2
