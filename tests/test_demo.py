"""Tests of ``llavamed demo``: the quick run end to end (outputs left in --out, tables, --json, refusal
to overwrite), and the full run's learning target (marked slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from llavamed_core.demo import DEMO_METRICS


def test_quick_demo_runs_the_pipeline_and_leaves_its_outputs(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--quick")
    assert r.exit_code == 0, r
    assert "before" in r.stdout and "after" in r.stdout and "closed accuracy (strict)" in r.stdout
    assert "sample chat answer" in r.stdout and "Is there" in r.stdout
    assert "llavamed chat" in r.stderr and "paper's recipes" in r.stderr
    for rel in ("data/train.json", "data/test.json", "data/align.json", "checkpoints/base/config.json",
                "checkpoints/align/config.json", "checkpoints/instruct/model.safetensors",
                "checkpoints/instruct/chat_template.jinja", "eval/before/answers.jsonl",
                "eval/after/results.json", "demo.json"):
        assert (out / rel).exists(), rel
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["before"]) == set(DEMO_METRICS) == set(summary["after"])
    assert summary["train"]["align"]["steps"] == summary["train"]["instruct"]["steps"] == 6
    after = json.loads((out / "eval" / "after" / "results.json").read_text())
    assert after["metrics"]["strict_closed_acc"] == summary["after"]["strict_closed_acc"]
    assert not (out / "checkpoints" / ".runs").exists()
    # The outputs are real checkpoints and data: the other commands take them.
    r = cli("eval", "vqa", "--model", out / "checkpoints" / "instruct", "--dataset", out / "data" / "test.json",
            "--out", tmp_path / "again", "--limit", "4", "--json")
    assert r.exit_code == 0, r
    # A second run does not silently replace the first; --overwrite does, --json is clean JSON.
    r = cli("demo", "--out", out, "--quick")
    assert r.exit_code == 1 and "not empty" in r.stderr and "--overwrite" in r.stderr
    r = cli("demo", "--out", out, "--quick", "--overwrite", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["after"] == json.loads((out / "demo.json").read_text())["after"]


@pytest.mark.slow
def test_full_demo_learns_the_task(cli, tmp_path):
    r = cli("demo", "--out", tmp_path / "demo", "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["before"]["strict_closed_acc"] <= 0.65
    assert res["after"]["strict_closed_acc"] >= 0.90
    assert res["sample"]["answer"]
