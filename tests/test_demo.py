"""Tests of ``llavamed demo``: the quick run end to end (outputs left in --out, tables, --json, refusal
to overwrite), and the full run's learning target (marked slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

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
    # The demo's llavamed.toml points at what it made: in its folder, chat needs no --model.
    image = Path(summary["sample"]["image"]).resolve().relative_to(out.resolve())
    ask = ["chat", image, "--prompt", summary["sample"]["question"], "--temperature", "0", "--max-new-tokens", "6",
           "--json"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        short = cli(*ask)
    assert short.exit_code == 0, short
    assert f"(from {out.resolve() / 'llavamed.toml'}:" in short.stderr
    full = cli(*[out / image if a == image else a for a in ask], "--model", out / "checkpoints" / "instruct")
    assert full.exit_code == 0, full
    a, b = json.loads(short.stdout), json.loads(full.stdout)
    assert a["model"] == "instruct" and {**a, "image": None} == {**b, "image": None}
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


def test_quick_demo_progress_log_and_readme(tmp_path):
    """One progress row per stage, an overall row that only goes forward (time-weighted, to 100 %),
    library warnings in demo.log rather than on the terminal, and a README.txt naming every file."""
    import warnings

    from llavamed_core.demo import STAGE_WEIGHTS, DemoConfig, run_demo

    events = []
    out = tmp_path / "demo"
    res = run_demo(DemoConfig(out=out, quick=True, seed=0), progress=events.append)
    rows = [e.task for e in events if e.task != "demo"]
    stages = list(dict.fromkeys(rows))
    assert stages == [f"{i + 1}/7 {name}" for i, name in enumerate(STAGE_WEIGHTS)]
    assert {e.info.get("phase") for e in events if e.task.endswith("train instruct") and not e.finished} >= {"train"}
    overall = [e.done for e in events if e.task == "demo"]
    assert overall == sorted(overall) and overall[-1] == 100 and len(set(overall)) > 7
    readme = (out / "README.txt").read_text()
    for entry in out.iterdir():
        if entry.name not in ("README.txt", "llavamed.toml"):
            assert entry.name in readme, entry.name
    assert "llavamed chat" in readme and res.paths["instruct"] in readme
    assert (out / "demo.log").exists()
    # A library warning raised while the log is active goes to the file, not the terminal.
    from llavamed_core.demo import library_output_to

    with open(tmp_path / "w.log", "w") as fh, library_output_to(fh):
        warnings.warn("a library's deprecation notice", FutureWarning)
        print("[WARNING] [real_accelerator.py:260:get_accelerator] Setting ds_accelerator to cpu")
    text = (tmp_path / "w.log").read_text()
    assert "a library's deprecation notice" in text and "ds_accelerator" in text
