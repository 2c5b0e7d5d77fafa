"""The GPU suite's CPU smoke run (tiny model): every selected part leaves figures or a recorded reason.

The GPU figures themselves come from ``python benchmarks/gpu_suite.py --out DIR`` on a GPU machine;
this test keeps the suite itself from rotting between GPU runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _run(out: Path, only: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out), "--only", only],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "## Serving" in md and "## Training" in md
    return report


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_serve(sv: dict) -> None:
    assert sv["status"] == "ok", sv
    configs = {(lv["config"], lv["clients"]) for lv in sv["levels"]}
    assert configs == {(c, n) for c in ("batching", "max-batch 1") for n in (1, 8)} | \
        {("batching, 2 API processes", 8)}
    for lv in sv["levels"]:
        assert lv["errors"] == 0 and lv["ok"] > 0 and _number(lv["req_per_s"]), lv
        assert lv["malformed_4xx"] > 0  # the malformed requests were answered 4xx, not 5xx
    for key in ("batching_ratio_at_max_clients", "server_over_engine", "api_processes_over_one_at_max_clients"):
        assert _number(sv[key]), key
    api = sv["api_processes"]
    assert api["server_at_max_clients"]["errors"] == 0 and _number(api["over_engine"])
    assert _number(api["over_one_process"])
    sd = sv["short_during_long"]
    assert _number(sd["ratio"]) and sd["short_latency_s"] <= sd["long_batch_s"] * 10
    assert sd["short_completion_tokens"] <= 4


def _check_eval(ev: dict) -> None:
    assert ev["status"] == "ok", ev
    assert _number(ev["speedup"]) and ev["same_answers"] == f"{ev['questions']}/{ev['questions']}"


def _check_train_row(row: str, t: dict) -> None:
    if t["status"] in ("skipped", "error", "timeout"):
        assert t.get("reason") or t.get("error"), t  # a failure is a recorded line, not a blank
        return
    assert t["status"] == "ok"
    assert _number(t["tokens_per_s_run"]) and _number(t["tokens_per_s_steady"]), t
    assert t["steps"] == 2 and math.isfinite(t["final_loss"])
    assert t["mechanism"]["attn_implementation"] == "sdpa"
    if row == "packing":
        assert t["mechanism"]["collator"] == "PackingCollator"
    if row == "fsdp2":
        assert t["mechanism"]["fsdp2_modules"] > 0  # the mechanism engaged, not plain DDP
    if row in ("zero2", "zero3"):
        assert t["mechanism"]["deepspeed_stage"] == int(row[-1])
    if row == "lora":
        assert t["mechanism"]["lora_trainable_params"] > 0
        assert t["mechanism"]["wrapper"].startswith("Peft")


def test_smoke_suite_records_every_part(tmp_path):
    # The packing and LoRA rows run in test_smoke_suite_all_train_rows (slow) and in the crash
    # test below; their mechanisms are tested by test_train_packing and test_train_mechanisms.
    rows = ("plain", "qlora")
    report = _run(tmp_path, "serve,eval," + ",".join(f"train:{r}" for r in rows))
    parts = report["parts"]
    assert set(parts) == {"serve", "eval", *(f"train:{r}" for r in rows)}
    _check_serve(parts["serve"])
    _check_eval(parts["eval"])
    for row in rows:
        _check_train_row(row, parts[f"train:{row}"])
    assert parts["train:plain"]["status"] == "ok"  # the straight path must work on any machine
    assert parts["train:qlora"]["status"] == "skipped"  # no CUDA here: recorded, not attempted


def test_budget_skips_remaining_parts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--only",
                           "eval,train:plain", "--budget-s", "10"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["eval"]["status"] == "skipped" and "budget" in parts["eval"]["reason"]
    assert parts["train:plain"]["status"] == "skipped"


@pytest.mark.slow
def test_smoke_suite_all_train_rows(tmp_path):
    report = _run(tmp_path, "train")
    for row in ("plain", "packing", "lora", "qlora", "fsdp2", "zero2", "zero3"):
        _check_train_row(row, report["parts"][f"train:{row}"])


def test_a_crash_and_a_hang_are_recorded_and_the_rest_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GPU_SUITE_FAULT="eval:crash,train:packing:hang")
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--only",
                           "eval,train:qlora,train:packing,train:lora", "--budget-s", "21"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["eval"]["status"] == "error" and "injected fault in eval" in parts["eval"]["error"]
    assert parts["train:qlora"]["status"] == "skipped"  # ran after the crash
    hang = parts["train:packing"]
    assert hang["status"] == "timeout" and "in child_main" in hang["error"]  # names where it was stuck
    assert parts["train:lora"]["status"] == "skipped" and "budget" in parts["train:lora"]["reason"]
    md = (tmp_path / "results.md").read_text()
    assert "injected fault in eval" in md and "timeout" in md
