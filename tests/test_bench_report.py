"""docs/benchmarks.md is the rendering of the benchmark scripts' stored ``--json`` figures.

The page is never edited by hand: ``benchmarks/report.py`` writes it from ``benchmarks/results/``.
These tests check that the committed page is exactly that rendering, that each figure shown comes
from the JSON (two different inputs give two different pages), and that the JSON is found in a
script's output whether printed on one line or indented.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_page_is_the_rendering_of_the_stored_results(report):
    results = report.load_results()
    assert results, "benchmarks/results/ holds no figures"
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.render(results), \
        "docs/benchmarks.md differs from `python benchmarks/report.py`: rerun it"


def test_every_stored_result_renders_its_ratio(report):
    for name, rec in report.load_results().items():
        bench = {b.name: b for b in report.BENCHES + [report.GPU]}[name]
        text = bench.render(rec["figures"])
        assert "|" in text  # a table


def test_figures_come_from_the_json(report):
    base = {"latency_s": 0.2, "concurrency": 16, "batch": 3, "baseline_requests": 60, "baseline_s": 6.0,
            "baseline_rps": 10.0, "requests": 240, "seconds": 4.0, "rps": 60.0, "ratio": 6.0}
    slow = dict(base, rps=30.0, ratio=3.0)
    llm = {b.name: b for b in report.BENCHES}["llm_throughput"]
    a, b = llm.render(base), llm.render(slow)
    assert "**6.00×**" in a and "(target ≥ 4×: met)" in a
    assert "**3.00×**" in b and "**not met**" in b


def test_last_json_finds_one_line_and_indented_documents(report):
    assert report.last_json("log line\n" + json.dumps({"a": 1})) == {"a": 1}
    assert report.last_json("x\n" + json.dumps({"b": [1, 2]}, indent=2) + "\n") == {"b": [1, 2]}
    with pytest.raises(ValueError):
        report.last_json("no json here\n")


def test_gpu_section_is_the_suites_own_table_nested_under_its_heading(report):
    rec = {"started": "2026-11-28 10:00:00", "elapsed_s": 1.0, "budget_s": 430, "smoke": False,
           "parts": {}, "device": "NVIDIA H200", "selected": []}
    text = report.GPU.render(rec)
    assert text.startswith("### GPU suite — NVIDIA H200")
    assert "#### Serving" in text and "\n## " not in text and "\n# " not in text
