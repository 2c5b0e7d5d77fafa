"""``llavamed eval summarize`` over `eval vqa` runs: bootstrap intervals and paired differences.

Checked against straight computations: the intervals against a plain-Python percentile bootstrap
with the same draws, the point estimates against results.json to the last bit, a constructed pair
whose difference is known, and identical runs (difference 0, interval [0, 0]).
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest

from llavamed_core.eval.answers import VQAEvalConfig, evaluate_vqa
from llavamed_core.eval.bootstrap import mean_ci, paired_difference
from llavamed_core.eval.compare import VQA_ROWS, compare_runs, load_runs, load_vqa_run
from llavamed_core.io import read_jsonl

SEED = 7


def reference_interval(scores: list[float], n_boot: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap written out: the same draws, a Python mean per resample, the 2.5th and
    97.5th percentiles by linear interpolation between order statistics."""
    import numpy as np

    n = len(scores)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n)).tolist()
    means = sorted(sum(scores[j] for j in row) / n for row in draws)

    def pct(p: float) -> float:
        pos = p / 100 * (n_boot - 1)
        lo = int(pos)
        hi = min(lo + 1, n_boot - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    return pct(2.5), pct(97.5)


def test_interval_equals_reference_implementation():
    rng = random.Random(3)
    scores = [rng.random() for _ in range(37)]
    est = mean_ci(scores, n_boot=500, seed=SEED)
    assert est.value == sum(scores) / len(scores) and est.n == 37
    low, high = reference_interval(scores, 500, SEED)
    assert (est.low, est.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert est.low < est.value < est.high
    # Same seed, same interval; another seed, another one.
    assert mean_ci(scores, 500, SEED) == est and mean_ci(scores, 500, SEED + 1) != est
    # Paired: the interval of the per-question differences.
    other = [min(1.0, s + rng.random() / 4) for s in scores]
    d = paired_difference(scores, other, n_boot=500, seed=SEED)
    low, high = reference_interval([b - a for a, b in zip(scores, other)], 500, SEED)
    assert (d.low, d.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert d.value == sum(other) / 37 - sum(scores) / 37
    assert mean_ci([], 100).value is None and mean_ci(scores, 0).low is None


def test_draws_in_blocks_equal_one_matrix(monkeypatch):
    """Large tables draw the resamples a block of rows at a time: the same interval as one matrix."""
    from llavamed_core.eval import bootstrap

    scores = [float(i % 3 == 0) for i in range(101)]
    whole = mean_ci(scores, n_boot=250, seed=SEED)
    monkeypatch.setattr(bootstrap, "_CHUNK", 7 * 101)  # blocks of 7 rows, the last one shorter
    assert mean_ci(scores, n_boot=250, seed=SEED) == whole
    low, high = reference_interval(scores, 250, SEED)
    assert (whole.low, whole.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


@pytest.fixture(scope="module")
def run_a(tiny_ckpt, synth_data, tmp_path_factory) -> Path:
    """A real `eval vqa` output folder (results.json, answers.jsonl, run.json) of the tiny model."""
    out = tmp_path_factory.mktemp("runs") / "base"
    evaluate_vqa(VQAEvalConfig(dataset=synth_data / "test.json", out=out, model=tiny_ckpt, max_new_tokens=4))
    return out


def rescored(cli, run: Path, dst: Path, gt: Path, edit=None) -> Path:
    """A copy of ``run`` whose answers ``edit`` changed, scored again by `eval vqa --answers --gt`."""
    shutil.copytree(run, dst)
    answers = list(read_jsonl(dst / "answers.jsonl"))
    if edit is not None:
        answers = edit(answers)
    (dst / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    (dst / "results.json").unlink()
    r = cli("eval", "vqa", "--answers", dst / "answers.jsonl", "--gt", gt, "--out", dst)
    assert r.exit_code == 0, r
    return dst


def test_point_estimates_equal_results_json_exactly(cli, run_a):
    results = json.loads((run_a / "results.json").read_text())
    run = load_vqa_run(run_a)
    assert set(run.rows) == set(VQA_ROWS)
    for key, row in run.rows.items():
        assert mean_ci(row.scores, 0).value == results["metrics"][key]  # exact, not approx
    assert len(run.rows["paper_closed_acc"].ids) == results["counts"]["closed"]
    assert len(run.rows["paper_open_recall"].ids) == results["counts"]["open"]
    res = cli("eval", "summarize", run_a, "--format", "json", "--bootstrap", "200", "--seed", SEED)
    assert res.exit_code == 0, res
    (obj,) = json.loads(res.stdout)
    assert obj["kind"] == "vqa" and obj["provenance"]["answers_run_id"] == results["run_id"]
    for key in VQA_ROWS:
        e = obj["estimates"][key]
        assert e["value"] == results["metrics"][key] * 100
        low, high = reference_interval(run.rows[key].scores, 200, SEED)
        assert (e["ci_low"], e["ci_high"]) == (pytest.approx(low * 100), pytest.approx(high * 100))


def test_identical_runs_differ_by_zero(cli, run_a, synth_data, tmp_path):
    same = rescored(cli, run_a, tmp_path / "again", synth_data / "test.json")
    res = cli("eval", "summarize", run_a, same, "--format", "json")
    assert res.exit_code == 0, res
    base, again = json.loads(res.stdout)
    assert again["difference"]["vs"] == "base" and set(again["difference"]["rows"]) == set(VQA_ROWS)
    for d in again["difference"]["rows"].values():
        assert (d["comparable"], d["value"], d["ci_low"], d["ci_high"]) == (True, 0.0, 0.0, 0.0)
    assert base["estimates"] == again["estimates"]


def test_constructed_pair_with_known_difference(cli, run_a, synth_data, tmp_path):
    gt = synth_data / "test.json"
    rows = load_vqa_run(run_a).rows["strict_closed_acc"]
    convs = {str(c["id"]): c for c in json.loads(gt.read_text())}
    wrong = [q for q, s in zip(rows.ids, rows.scores) if s == 0.0]
    fixed = set(wrong[:3])
    assert len(fixed) == 3

    def answer_right(answers):  # B answers 3 closed questions with the ground truth itself
        for a in answers:
            if str(a["question_id"]) in fixed:
                a["text"] = convs[str(a["question_id"])]["conversations"][1]["value"]
        return answers

    b = rescored(cli, run_a, tmp_path / "better", gt, answer_right)
    c = compare_runs(load_runs([run_a, b]), n_boot=300, seed=SEED)
    n_closed = len(rows.ids)
    d = c.differences[(1, c.runs[0].section, "strict_closed_acc")].estimate
    assert d.value == pytest.approx(3 / n_closed * 100) and d.n == n_closed
    per_question = [1.0 if q in fixed else 0.0 for q in rows.ids]
    low, high = reference_interval(per_question, 300, SEED)
    assert (d.low, d.high) == (pytest.approx(low * 100), pytest.approx(high * 100))
    assert 0.0 <= d.low < d.value < d.high
    for key in ("paper_open_recall", "open_token_f1"):  # open answers untouched
        e = c.differences[(1, c.runs[0].section, key)].estimate
        assert (e.value, e.low, e.high) == (0.0, 0.0, 0.0)
    # The sentence users read: B − A with its interval, in points.
    md = cli("eval", "summarize", run_a, b, "--format", "markdown", "--bootstrap", "300", "--seed", SEED)
    line = next(ln for ln in md.stdout.splitlines() if ln.startswith("| closed, strict |"))
    assert line.endswith(f"| +{3 / n_closed * 100:.1f} [+{low * 100:.1f}, +{high * 100:.1f}] |")
    assert "| metric | n | base | better | better − base |" in md.stdout


def test_every_format_parses_back(cli, run_a, synth_data, tmp_path):
    b = rescored(cli, run_a, tmp_path / "b", synth_data / "test.json",
                 lambda ans: [dict(a, text="yes") for a in ans])
    args = ("eval", "summarize", run_a, b, "--bootstrap", "100")
    obj = json.loads(cli(*args, "--format", "json").stdout)
    rows = list(csv.DictReader(io.StringIO(cli(*args, "--format", "csv").stdout)))
    assert len(rows) == 2 * len(VQA_ROWS)
    for r in rows:
        run = obj[0] if r["label"] == "base" else obj[1]
        e = run["estimates"][r["metric"]]
        assert (float(r["value"]), float(r["ci_low"]), float(r["ci_high"])) == \
            (round(e["value"], 4), round(e["ci_low"], 4), round(e["ci_high"], 4))
        assert r["kind"] == "vqa" and r["group"] in ("closed", "open")
        if r["label"] == "b":
            d = obj[1]["difference"]["rows"][r["metric"]]
            assert (r["vs"], float(r["difference"]), int(r["difference_n"])) == ("base", round(d["value"], 4), d["n"])
    md = cli(*args, "--format", "markdown").stdout.strip().split("\n\n")[-1].splitlines()
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in md]
    assert cells[0] == ["metric", "n", "base", "b", "b − base"] and len(cells) == 2 + len(VQA_ROWS)
    tex = cli(*args, "--format", "latex").stdout.splitlines()
    body = tex[tex.index(r"\midrule") + 1:tex.index(r"\bottomrule")]
    assert [ln.split(" & ")[0] for ln in body] == [cells[i][0] for i in range(2, len(cells))]
    assert tex[tex.index(r"\toprule") + 1] == r"metric & n & base & b & b $-$ base \\"
    table = cli(*args)
    assert table.exit_code == 0 and "b − base" in table.stdout and "closed, strict" in table.stdout


def test_plot_writes_a_png(cli, run_a, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "figs" / "compare.png"
    res = cli("eval", "summarize", run_a, run_a, "--plot", png, "--bootstrap", "50")
    assert res.exit_code == 0, res
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert [p.name for p in png.parent.iterdir()] == ["compare.png"]  # no temporary file left


def test_plot_without_matplotlib_fails_first(cli, run_a, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    res = cli("eval", "summarize", run_a, "--plot", tmp_path / "x.png")
    assert res.exit_code == 1 and res.stdout == "" and not (tmp_path / "x.png").exists()
    assert "Error: --plot needs matplotlib" in res.stderr and "pip install 'llavamed[plot]'" in res.stderr


def test_not_comparable_runs(cli, run_a, synth_data, tmp_path):
    gt = synth_data / "test.json"
    # Fewer questions: scored against a ground truth without the last three records.
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(json.loads(gt.read_text())[:-3]))
    fewer = rescored(cli, run_a, tmp_path / "fewer", subset)
    res = cli("eval", "summarize", run_a, fewer, "--format", "json")
    assert res.exit_code == 0, res
    d = json.loads(res.stdout)[1]["difference"]["rows"]["paper_closed_acc"]
    assert d["comparable"] is False and "different question" in d["note"]
    assert "fewer − base (test.json): not comparable: different questions (3 only in base, 0 only in fewer)" \
        in res.stderr
    # Same ids, another question file (one ground truth changed): its sha256 differs.
    recs = json.loads(gt.read_text())
    recs[0]["conversations"][1]["value"] = "something else"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(recs))
    changed = rescored(cli, run_a, tmp_path / "changed", other)
    md = cli("eval", "summarize", run_a, changed, "--format", "markdown")
    assert md.exit_code == 0 and "| not comparable |" in md.stdout
    assert "not comparable: different question files (sha256" in md.stderr


def test_inconsistent_runs_are_refused(cli, run_a, synth_data, tmp_path):
    # Answers edited after scoring: results.json no longer matches them.
    stale = tmp_path / "stale"
    shutil.copytree(run_a, stale)
    answers = list(read_jsonl(stale / "answers.jsonl"))
    paper = load_vqa_run(run_a).rows["paper_closed_acc"]
    missed = next(q for q, s in zip(paper.ids, paper.scores) if s == 0.0)
    closed = next(a for a in answers if str(a["question_id"]) == missed)
    closed["text"] = "yes no"  # the paper's metric counts this as right for either answer
    (stale / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    res = cli("eval", "summarize", run_a, stale)
    assert res.exit_code == 1 and res.stdout == "" and "Traceback" not in res.stderr
    assert f"{stale / 'results.json'}, field 'metrics.paper_closed_acc': is " in res.stderr
    assert "Hint:" in res.stderr
    # The question file edited in place since the run (its sha256 is no longer run.json's).
    moved = tmp_path / "moved"
    shutil.copytree(run_a, moved)
    gt_copy = tmp_path / "questions.json"
    gt_copy.write_text((synth_data / "test.json").read_text() + "\n")
    results = json.loads((moved / "results.json").read_text())
    results["gt"] = results["questions_file"] = results["provenance"]["dataset"]["path"] = str(gt_copy)
    (moved / "results.json").write_text(json.dumps(results))
    res = cli("eval", "summarize", moved)
    assert res.exit_code == 1 and f"Error: {gt_copy}: changed since the run in {moved} (sha256 " in res.stderr
    # A folder without results.json, and a chat-benchmark answer folder.
    res = cli("eval", "summarize", tmp_path / "nothing-here")
    assert res.exit_code == 1 and "file not found" in res.stderr
    qa = tmp_path / "qa"
    qa.mkdir()
    (qa / "results.json").write_text(json.dumps({"kind": "qa50", "answers_file": "answers.jsonl"}))
    res = cli("eval", "summarize", qa)
    assert res.exit_code == 1 and "chat benchmark" in res.stderr and "eval gpt-score" in res.stderr


def test_vqa_runs_and_review_files_in_one_table(cli, run_a, tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"question_id": i, "type": "conversation", "domain": "mri",
                                           "ref_score": 8, "model_score": s}) + "\n"
                               for i, s in enumerate([4, 6, 8, 2])))
    res = cli("eval", "summarize", run_a, reviews, "--format", "json", "--bootstrap", "100")
    assert res.exit_code == 0, res
    vqa, chat = json.loads(res.stdout)
    assert (vqa["kind"], chat["kind"]) == ("vqa", "chat")
    # Point estimate = the summary's relative score (mean of ratios), to the last bit.
    assert chat["estimates"]["overall"]["value"] == (4 / 8 + 6 / 8 + 8 / 8 + 2 / 8) / 4 * 100
    assert chat["estimates"]["overall"]["value"] == pytest.approx(chat["buckets"]["overall"]["relative"])
    assert chat["difference"]["rows"] == {}  # another dataset: nothing to pair
    table = cli("eval", "summarize", run_a, reviews)
    assert table.exit_code == 0 and "test.json" in table.stdout and "Overall" in table.stdout
