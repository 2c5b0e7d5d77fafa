"""``llavamed eval summarize`` on review files whose figures were computed by hand.

The relative score is the mean of per-question (model ÷ reference) × 100, which here differs
from the ratio of the means (e.g. overall 106.25 vs 80.0).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import REAL_QA50


def dom(*true):
    return {d: d in true for d in ("chest_xray", "mri", "histology", "gross", "ct_scan")}


# question_id, type, domain, ref, model
REVIEWS_A = [
    (1, "conversation", dom("chest_xray"), 10, 5),          # ratio 0.5
    (2, "conversation", dom("mri", "ct_scan"), 2, 4),       # ratio 2.0, bucket MRI (first true)
    (3, "detailed_description", dom("chest_xray"), 8, 6),   # ratio 0.75
    (4, "detailed_description", dom("gross", "histology"), 5, 5),  # ratio 1.0, bucket histology
    (5, "conversation", dom("ct_scan"), None, None),        # unscored
]
# By hand:
#   overall: ref (10+2+8+5)/4 = 6.25, model (5+4+6+5)/4 = 5.0, relative (0.5+2+0.75+1)/4*100 = 106.25
#            (ratio of means would be 5.0/6.25*100 = 80.0)
#   conversation: ref 6.0, model 4.5, relative 125.0 (ratio of means 75.0); 1 unscored
#   description: ref 6.5, model 5.5, relative 87.5
#   CXR: ref 9.0, model 5.5, relative 62.5; MRI: 200.0; histology: 100.0; gross: none; CT: none (1 unscored)
EXPECTED_A = {
    "conversation": (2, 1, 6.0, 4.5, 125.0),
    "detailed_description": (2, 0, 6.5, 5.5, 87.5),
    "chest_xray": (2, 0, 9.0, 5.5, 62.5),
    "mri": (1, 0, 2.0, 4.0, 200.0),
    "histology": (1, 0, 5.0, 5.0, 100.0),
    "gross": (0, 0, None, None, None),
    "ct_scan": (0, 1, None, None, None),
    "overall": (4, 1, 6.25, 5.0, 106.25),
}


def write_reviews(path: Path, rows, **extra) -> Path:
    with open(path, "w") as fh:
        for qid, qtype, domain, ref, model in rows:
            fh.write(json.dumps({"question_id": qid, "type": qtype, "domain": domain, "ref_score": ref,
                                 "model_score": model, "scored": ref is not None,
                                 "review": "x", **extra}) + "\n")
    return path


def test_hand_computed_relative_scores(cli, tmp_path):
    a = write_reviews(tmp_path / "model_a.jsonl", REVIEWS_A)
    res = cli("eval", "summarize", a, "--format", "json")
    assert res.exit_code == 0, res
    (s,) = json.loads(res.stdout)
    assert (s["reviews"], s["scored"], s["unscored"], s["label"]) == (5, 4, 1, "model_a")
    for name, (n, uns, ref, model, rel) in EXPECTED_A.items():
        b = s["buckets"][name]
        assert (b["n"], b["unscored"]) == (n, uns), name
        for key, want in (("mean_ref", ref), ("mean_model", model), ("relative", rel)):
            assert b[key] == (None if want is None else pytest.approx(want)), (name, key)
    overall = s["buckets"]["overall"]
    assert overall["mean_model"] / overall["mean_ref"] * 100 == pytest.approx(80.0)  # not what we report
    assert "1 unscored review(s) left out" in res.stderr


def test_several_files_side_by_side(cli, tmp_path):
    a = write_reviews(tmp_path / "model_a.jsonl", REVIEWS_A, judge="judge-x", answer_model_id="llava-a")
    b = write_reviews(tmp_path / "model_b.jsonl", [(1, "conversation", dom("chest_xray"), 8, 8),
                                                   (3, "detailed_description", dom("chest_xray"), 4, 2)])
    md = cli("eval", "summarize", a, b, "--format", "markdown")
    assert md.exit_code == 0, md
    # Provenance and the chat table as before, then a title line and the relative scores with intervals.
    prov, scores, title, compared = md.stdout.strip().split("\n\n")
    # First, one row per file saying what was judged (unknown for files without provenance).
    assert prov.splitlines()[2:] == ["| model_a | llava-a | judge-x | - | - |", "| model_b | - | - | - | - |"]
    lines = scores.splitlines()
    assert lines[0] == ("| bucket | model_a n | model_a ref | model_a model | model_a relative "
                        "| model_b n | model_b ref | model_b model | model_b relative |")
    assert lines[2] == "| Conversation | 2 | 6.00 | 4.50 | 125.00 | 1 | 8.00 | 8.00 | 100.00 |"
    assert "| CXR | 2 | 9.00 | 5.50 | 62.50 | 2 | 6.00 | 5.00 | 75.00 |" in lines
    assert "| Gross | 0 | - | - | - | 0 | - | - | - |" in lines
    assert lines[-1] == "| Overall | 4 | 6.25 | 5.00 | 106.25 | 2 | 6.00 | 5.00 | 75.00 |"
    # Relative scores with 95 % intervals; model_b reviewed other questions: no difference computed.
    assert title.startswith("**chat benchmark, relative score") and "1000 resamples, seed 0" in title
    compared = compared.splitlines()
    assert compared[0] == "| metric | n | model_a | model_b | model_b − model_a |"
    assert compared[-1].startswith("| Overall | 2/4 | 106.2 [") and compared[-1].endswith("| not comparable |")
    assert "model_b − model_a (chat): not comparable: different questions (3 only in model_a, 0 only in " \
        "model_b)" in md.stderr

    res = cli("eval", "summarize", a, b, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 2 * 8
    row = next(r for r in rows if r["label"] == "model_b" and r["bucket"] == "overall")
    assert (row["group"], row["n"], row["relative"]) == ("overall", "2", "75.0")
    assert all((r["model"], r["judge"]) == ("llava-a", "judge-x") for r in rows if r["label"] == "model_a")
    assert next(r for r in rows if r["label"] == "model_a" and r["bucket"] == "gross")["relative"] == ""

    table = cli("eval", "summarize", a, b)
    assert table.exit_code == 0 and "Overall" in table.stdout and "model_b" in table.stdout
    assert "llava-a" in table.stdout and "judge-x" in table.stdout


def test_review_file_mixing_judges_or_models_is_refused(cli, tmp_path):
    mixed = write_reviews(tmp_path / "mixed.jsonl", REVIEWS_A[:2], judge="judge-x", answer_model_id="llava-a")
    with open(mixed, "a") as fh:  # a review of another model's answer appended to the same file
        fh.write(json.dumps({"question_id": 9, "type": "conversation", "domain": dom("mri"), "ref_score": 5,
                             "model_score": 5, "scored": True, "judge": "judge-x",
                             "answer_model_id": "llava-b"}) + "\n")
    res = cli("eval", "summarize", mixed)
    assert res.exit_code == 1 and "mixes reviews of 2 answer models: llava-a (2), llava-b (1)" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    mixed = write_reviews(tmp_path / "judges.jsonl", REVIEWS_A[:1], judge="judge-x")
    with open(mixed, "a") as fh:
        fh.write(json.dumps({"question_id": 9, "type": "conversation", "ref_score": 5, "model_score": 5,
                             "judge": "judge-y"}) + "\n")
    res = cli("eval", "summarize", mixed, "--format", "csv")
    assert res.exit_code == 1 and "2 judges: judge-x (1), judge-y (1)" in res.stderr


def test_questions_fill_type_and_domain_and_count_missing(cli, tmp_path):
    qs = [json.loads(line) for line in REAL_QA50.read_text().splitlines()]
    # Reviews of the original tools: scores in "tuple", no type/domain; [-1, -1] means unscored.
    path = tmp_path / "orig.jsonl"
    with open(path, "w") as fh:
        for q in qs[:20]:
            fh.write(json.dumps({"question_id": q["question_id"], "tuple": [8, 4]}) + "\n")
        fh.write(json.dumps({"question_id": qs[20]["question_id"], "tuple": [-1, -1]}) + "\n")
    res = cli("eval", "summarize", path)
    assert res.exit_code == 1 and "field 'type': missing" in res.stderr and "--questions" in res.stderr
    res = cli("eval", "summarize", path, "--questions", REAL_QA50, "--format", "json")
    assert res.exit_code == 0, res
    (s,) = json.loads(res.stdout)
    assert s["missing"] == 193 - 21 and s["unscored"] == 1
    assert s["buckets"]["overall"]["relative"] == pytest.approx(50.0)
    by_type = sum(s["buckets"][t]["n"] for t in ("conversation", "detailed_description"))
    by_domain = sum(s["buckets"][d]["n"] for d in ("chest_xray", "mri", "histology", "gross", "ct_scan"))
    assert by_type == by_domain == 20
    assert "172 question(s)" in res.stderr


def test_bad_review_files(cli, tmp_path):
    dup = write_reviews(tmp_path / "dup.jsonl", REVIEWS_A[:2] + REVIEWS_A[:1])
    res = cli("eval", "summarize", dup)
    assert res.exit_code == 1 and f"{dup}, record 1, field 'question_id': duplicate review" in res.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = cli("eval", "summarize", empty)
    assert res.exit_code == 1 and "no reviews" in res.stderr
    res = cli("eval", "summarize", tmp_path / "nope.jsonl")
    assert res.exit_code == 1 and "file not found" in res.stderr
    ok = write_reviews(tmp_path / "ok.jsonl", REVIEWS_A)
    res = cli("eval", "summarize", ok, "--format", "xml")  # a choice: a usage error listing them
    assert res.exit_code == 2 and "'xml' is not one of" in res.stderr and "'markdown'" in res.stderr


def test_paired_difference_of_two_review_files(cli, tmp_path):
    """B doubles the model score of question 1 (ratio 0.5 → 1.0, +50 points on that question): overall
    +12.5 (4 scored questions), conversation and CXR +25 (2 each), 0 elsewhere. By hand, the overall
    interval is [0, 37.5]: a resample's mean is 12.5 × (times question 1 is drawn); none of the 4 draws
    is question 1 with probability 0.32 (> 2.5 %), three or more with 0.051 (> 2.5 %), four with
    0.004 (< 2.5 %)."""
    a = write_reviews(tmp_path / "a.jsonl", REVIEWS_A)
    b = write_reviews(tmp_path / "b.jsonl", [(1, "conversation", dom("chest_xray"), 10, 10), *REVIEWS_A[1:]])
    res = cli("eval", "summarize", a, b, "--format", "json")
    assert res.exit_code == 0, res
    _, sb = json.loads(res.stdout)
    assert sb["buckets"]["overall"]["relative"] == pytest.approx(118.75)
    diff = sb["difference"]["rows"]
    assert (diff["overall"]["value"], diff["overall"]["ci_low"], diff["overall"]["ci_high"]) == (12.5, 0.0, 37.5)
    assert diff["conversation"]["value"] == diff["chest_xray"]["value"] == 25.0
    for name in ("detailed_description", "mri", "histology"):
        assert (diff[name]["value"], diff[name]["ci_low"], diff[name]["ci_high"]) == (0.0, 0.0, 0.0)
    assert diff["gross"]["comparable"] and diff["gross"]["value"] is None  # no scored question in either
    # Each figure's point estimate is the table's relative score.
    for name, e in sb["estimates"].items():
        assert e["value"] == pytest.approx(sb["buckets"][name]["relative"]) if e["n"] else e["value"] is None
    out = cli("eval", "summarize", a, b).stdout
    assert "b − a" in out and "+12.5" in out and "[+0.0, +37.5]" in out
    res = cli("eval", "summarize", a, b, "--format", "json", "--bootstrap", "0")
    d = json.loads(res.stdout)[1]["difference"]["rows"]["overall"]
    assert (d["value"], d["ci_low"], d["ci_high"]) == (12.5, None, None)
