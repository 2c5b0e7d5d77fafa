"""Provenance of ``eval vqa`` and ``eval gpt-score`` outputs: one answer (or review) file never
mixes models or settings.

Two tiny random models (seed 0 and seed 1) answer the synthetic VQA set. A partial run of model A
is followed by reruns on the same ``--out``: another model or an answer-changing setting is refused
and leaves the files byte for byte; the same model with another batch size and two processes
resumes, and the result equals one uninterrupted run. The reviews of ``gpt-score`` get the same
treatment against a real local OpenAI-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from llm_server import LLMServer, judge_responder
from PIL import Image

from llavamed_core.eval.answers import VQAEvalConfig, evaluate_vqa
from llavamed_core.eval.provenance import checkpoint_identity
from llavamed_core.io import read_jsonl

MAX_NEW = "8"


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    """A private llavamed home: the hash cache and the LLM cache live there."""
    monkeypatch.setenv("LLAVAMED_HOME", str(tmp_path / "home"))
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> Path:
    """A second tiny model: same architecture, other random weights (seed 1)."""
    from llavamed_core.model import build_from_preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt_b") / "model-b"
    model, processor = build_from_preset("tiny", seed=1)
    save_checkpoint(model, processor, out)
    return out


@pytest.fixture(scope="module")
def fresh_a(tiny_ckpt, synth_data, tmp_path_factory) -> Path:
    """One uninterrupted eval of model A (the straight path to compare shortcuts with)."""
    out = tmp_path_factory.mktemp("fresh") / "ev"
    res = evaluate_vqa(VQAEvalConfig(dataset=synth_data / "test.json", out=out, model=tiny_ckpt,
                                     max_new_tokens=int(MAX_NEW)))
    assert res.run.answered == res.run.total > 20
    return out


def _vqa(dataset: Path, out: Path, *extra) -> list:
    return ["eval", "vqa", "--dataset", dataset, "--out", out, "--max-new-tokens", MAX_NEW, *extra]


def _lines(path: Path) -> list[tuple]:
    return [(o["question_id"], o["prompt"], o["text"], o["model_id"], o["metadata"]["run_id"])
            for o in read_jsonl(path)]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_other_model_is_refused_and_resume_equals_fresh(cli, tiny_ckpt, model_b, synth_data, tmp_path, fresh_a):
    data, out = synth_data / "test.json", tmp_path / "ev"
    r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "7", "--batch-size", "2"))
    assert r.exit_code == 0, r
    before = _snapshot(out)
    assert before["answers.jsonl"].count(b"\n") == 7 and "run.json" in before

    r = cli(*_vqa(data, out, "--model", model_b))
    assert r.exit_code == 1
    err = r.stderr
    assert err.startswith("Error: ") and err.count("Error:") == 1 and "Traceback" not in err
    assert "holds 7 record(s) made with other settings" in err
    fp_a, fp_b = (checkpoint_identity(p)["fingerprint"][:12] for p in (tiny_ckpt, model_b))
    assert f"model_fingerprint {tiny_ckpt.name} ({fp_a}) → model-b ({fp_b})" in err
    assert "--overwrite" in err and "another --out" in err
    assert _snapshot(out) == before  # nothing touched, byte for byte

    # The same model and settings, other batch size and two processes: resumes.
    r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--batch-size", "5", "--nproc", "2", "--json"))
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    total = len(_lines(fresh_a / "answers.jsonl"))
    assert (res["run"]["resumed"], res["run"]["answered"], res["generation"]["processes"]) == (7, total - 7, 2)
    # resumed eval == fresh eval: same answers in the same order, same run id, same scores.
    assert _lines(out / "answers.jsonl") == _lines(fresh_a / "answers.jsonl")
    fresh = json.loads((fresh_a / "results.json").read_text())
    assert res["metrics"] == fresh["metrics"] and res["counts"] == fresh["counts"]
    assert res["run_id"] == fresh["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    assert res["provenance"]["checked"] == fresh["provenance"]["checked"]
    assert json.loads((out / "run.json").read_text())["not_checked"]["batch_size"] == 2  # the first run's


def test_answer_changing_settings_are_refused(cli, tiny_ckpt, synth_data, tmp_path):
    data, out = synth_data / "test.json", tmp_path / "ev"
    r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "4"))
    assert r.exit_code == 0, r
    before = _snapshot(out)
    edited = tmp_path / "edited" / "test.json"  # same ids, one question reworded
    edited.parent.mkdir()
    records = json.loads(data.read_text())
    records[10]["conversations"][0]["value"] += " Be brief."
    edited.write_text(json.dumps(records))
    cases = [
        (["--closed-suffix", " Answer yes or no."], 'closed_suffix "" → " Answer yes or no."'),
        (["--max-new-tokens", "9"], "max_new_tokens 8 → 9"),
        (["--temperature", "0.7", "--seed", "3"], "temperature 0.0 → 0.7"),
        (["--dtype", "bfloat16"], 'dtype "float32" → "bfloat16"'),
    ]
    for extra, diff in cases:
        r = cli(*_vqa(data, out, "--model", tiny_ckpt, *extra))
        assert r.exit_code == 1, (extra, r)
        assert diff in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert _snapshot(out) == before, extra
    r = cli(*_vqa(edited, out, "--model", tiny_ckpt, "--images", synth_data / "images"))
    assert r.exit_code == 1 and "dataset_sha256" in r.stderr and _snapshot(out) == before
    # Settings that do not change answers do not block (nothing left to answer in this scope).
    for extra in (["--seed", "5"], ["--batch-size", "1"], ["--top-p", "0.5"], ["--nproc", "3"]):
        r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "4", "--json", *extra))
        assert r.exit_code == 0, (extra, r)
        assert json.loads(r.stdout)["run"]["answered"] == 0
    assert {k: v for k, v in _snapshot(out).items() if k != "results.json"} == \
        {k: v for k, v in before.items() if k != "results.json"}


def test_overwrite_starts_over_only_once_the_model_loads(cli, tiny_ckpt, model_b, synth_data, tmp_path):
    data, out = synth_data / "test.json", tmp_path / "ev"
    assert cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "3")).exit_code == 0
    before = _snapshot(out)
    broken = tmp_path / "broken"
    shutil.copytree(model_b, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    r = cli(*_vqa(data, out, "--model", broken, "--limit", "3", "--overwrite"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert _snapshot(out) == before  # a model that fails to load deletes nothing
    r = cli(*_vqa(data, out, "--model", model_b, "--limit", "3", "--overwrite", "--json"))
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    lines = _lines(out / "answers.jsonl")
    assert len(lines) == 3 and {ln[3] for ln in lines} == {"model-b"} and {ln[4] for ln in lines} == {res["run_id"]}
    assert res["provenance"]["model"]["name"] == "model-b" and res["model_id"] == "model-b"
    assert json.loads((out / "run.json").read_text())["run_id"] == res["run_id"] != \
        json.loads(before["run.json"])["run_id"]


@pytest.mark.parametrize("nproc", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_failed_model_load_leaves_no_out(cli, tiny_ckpt, synth_data, tmp_path, nproc):
    data = synth_data / "test.json"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    # With --nproc 2 the load fails in the worker processes, after the parent made --out.
    out = tmp_path / "deep" / "ev"
    r = cli(*_vqa(data, out, "--model", broken, "--nproc", nproc, "--limit", "4"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr and "safetensors" in r.stderr, r
    assert not out.exists() and not (tmp_path / "deep").exists()
    if nproc == "2":
        return  # (the cases below fail before any worker starts)
    r = cli(*_vqa(data, out, "--model", tmp_path / "no-such-model", "--limit", "4"))
    assert r.exit_code == 1 and "checkpoint directory not found" in r.stderr and not out.exists()
    # A folder the user made beforehand stays (empty), as it was.
    out = tmp_path / "mine"
    out.mkdir()
    r = cli(*_vqa(data, out, "--model", broken, "--limit", "4"))
    assert r.exit_code == 1 and out.is_dir() and list(out.iterdir()) == []


def test_weights_changed_in_place_are_seen_through_the_hash_cache(cli, tiny_ckpt_copy, synth_data, tmp_path,
                                                                   monkeypatch):
    import llavamed_core.eval.provenance as prov

    monkeypatch.setattr(prov, "_SMALL", 0)  # cache every file (the tiny weights are under 1 MiB)
    data, out = synth_data / "test.json", tmp_path / "ev"
    assert cli(*_vqa(data, out, "--model", tiny_ckpt_copy, "--limit", "3")).exit_code == 0
    cache = list((tmp_path / "home" / "hash-cache").glob("*.json"))
    weights = tiny_ckpt_copy / "model.safetensors"
    entry = [json.loads(p.read_text()) for p in cache if json.loads(p.read_text())["path"] == str(weights.resolve())]
    assert entry and entry[0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # Change the last bytes of the weights in place and put the old mtime back.
    st = weights.stat()
    with open(weights, "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x11" * 8)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    before = _snapshot(out)
    r = cli(*_vqa(data, out, "--model", tiny_ckpt_copy))
    assert r.exit_code == 1 and "model_fingerprint" in r.stderr and _snapshot(out) == before


def test_lost_header_and_foreign_records(cli, tiny_ckpt, synth_data, tmp_path):
    data, out = synth_data / "test.json", tmp_path / "ev"
    assert cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "3")).exit_code == 0
    header = json.loads((out / "run.json").read_text())
    # run.json lost: every answer still names this run, so the same command resumes.
    (out / "run.json").unlink()
    r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "4", "--json"))
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["run"]["answered"] == 1
    assert json.loads((out / "run.json").read_text())["checked"] == header["checked"]
    # An answer of another run pasted in: refused, naming the record and field.
    lines = (out / "answers.jsonl").read_text().splitlines()
    foreign = json.loads(lines[0])
    foreign.update(question_id=json.loads(data.read_text())[20]["id"])
    foreign["metadata"]["run_id"] = "0123456789ab"
    with open(out / "answers.jsonl", "a") as fh:
        fh.write(json.dumps(foreign) + "\n")
    r = cli(*_vqa(data, out, "--model", tiny_ckpt))
    assert r.exit_code == 1 and "field 'metadata.run_id'" in r.stderr and "mixes answers" in r.stderr
    assert f"record {foreign['question_id']}" in r.stderr
    # Answers without any provenance (another tool, or an older llavamed): refused.
    (out / "run.json").unlink()
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"question_id": json.loads(x)["question_id"], "text": "yes", "model_id": "x"}) + "\n"
        for x in lines))
    r = cli(*_vqa(data, out, "--model", tiny_ckpt))
    assert r.exit_code == 1 and "no run.json records which model" in r.stderr and "--overwrite" in r.stderr


def test_results_json_carries_the_provenance(cli, tiny_ckpt, synth_data, fresh_a, tmp_path):
    res = json.loads((fresh_a / "results.json").read_text())
    prov = res["provenance"]
    ident = checkpoint_identity(tiny_ckpt)
    assert prov["model"]["name"] == tiny_ckpt.name and prov["model"]["fingerprint"] == ident["fingerprint"]
    assert prov["model"]["path"] == str(tiny_ckpt.resolve())
    assert prov["dataset"]["sha256"] == hashlib.sha256((synth_data / "test.json").read_bytes()).hexdigest()
    assert prov["generation"]["max_new_tokens"] == 8 and prov["generation"]["decoding"] == "greedy"
    assert prov["generation"]["num_beams"] == 1 and prov["generation"]["dtype"] == "float32"
    assert prov["prompt"]["closed_suffix"] == "" and len(prov["prompt"]["chat_template_sha256"]) == 64
    assert prov["image_preprocessing"]["image_mean"] and prov["llavamed_version"]
    assert set(prov["checked"]) == {"model_fingerprint", "dtype", "dataset_sha256", "closed_suffix",
                                    "max_new_tokens", "temperature", "llavamed_version"}
    assert {o["metadata"]["run_id"] for o in read_jsonl(fresh_a / "answers.jsonl")} == {res["run_id"]}
    # Scoring the file alone keeps the provenance ...
    r = cli("eval", "vqa", "--answers", fresh_a / "answers.jsonl", "--gt", synth_data / "test.json",
            "--out", tmp_path / "scored", "--json")
    assert r.exit_code == 0, r
    scored = json.loads(r.stdout)
    assert scored["provenance"]["run_id"] == res["run_id"] and scored["metrics"] == res["metrics"]
    # ... and refuses a file that mixes two models' answers.
    mixed = tmp_path / "mixed" / "answers.jsonl"
    mixed.parent.mkdir()
    recs = list(read_jsonl(fresh_a / "answers.jsonl"))
    recs[5]["metadata"]["run_id"], recs[5]["model_id"] = "ffffffffffff", "model-b"
    mixed.write_text("".join(json.dumps(o) + "\n" for o in recs))
    r = cli("eval", "vqa", "--answers", mixed, "--gt", synth_data / "test.json")
    assert r.exit_code == 1 and "mixes answers of 2 runs" in r.stderr


def test_server_runs_are_tied_to_the_served_model(cli, tiny_ckpt, synth_data, tmp_path):
    data, out = synth_data / "test.json", tmp_path / "ev"
    with LLMServer(lambda body: f"answer of {body['model']}") as srv:
        def run(*extra):
            return cli(*_vqa(data, out, "--server", srv.url, "--limit", "3", *extra))

        assert run("--model-name", "m1").exit_code == 0
        before, asked = _snapshot(out), len(srv.completion_requests())
        r = run("--model-name", "m2")
        assert r.exit_code == 1 and 'server_model "m1" → "m2"' in r.stderr and "--overwrite" in r.stderr
        r = cli(*_vqa(data, out, "--model", tiny_ckpt, "--limit", "3"))  # the same questions, a local model
        assert r.exit_code == 1 and "model_fingerprint" in r.stderr and "server" in r.stderr
        assert _snapshot(out) == before and len(srv.completion_requests()) == asked
        r = run("--model-name", "m1", "--limit", "5", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["run"]["answered"] == 2
    assert {o["text"] for o in read_jsonl(out / "answers.jsonl")} == {"answer of m1"}
    head = json.loads((out / "run.json").read_text())
    assert head["checked"]["server"].startswith(srv.root) and head["checked"]["server"].endswith("/v1")
    assert head["model"]["name"] == "m1"


def _qa50(tmp_path: Path, n: int = 4) -> Path:
    """A small chat-benchmark question file (qa50 format) with its images."""
    images = tmp_path / "qa" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    doms = ["chest_xray", "mri", "histology", "gross"]
    with open(tmp_path / "qa" / "qa50.jsonl", "w") as fh:
        for i in range(n):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(images / f"f{i}.png")
            fh.write(json.dumps({
                "question_id": i, "image": f"f{i}.png", "text": f"<image>\nWhat does figure {i} show?",
                "gpt4_answer": f"Figure {i} shows a finding.", "fig_caption": f"Caption {i}.",
                "in_text_mention": [f"As figure {i} shows."], "type": ["conversation", "detailed_description"][i % 2],
                "domain": {d: d == doms[i] for d in doms + ["ct_scan"]}}) + "\n")
    return tmp_path / "qa" / "qa50.jsonl"


def test_gpt_score_refuses_other_judge_or_answers_and_summarize_names_the_model(cli, tiny_ckpt, model_b,
                                                                                 tmp_path):
    qa = _qa50(tmp_path)
    for name, model in (("a", tiny_ckpt), ("b", model_b)):
        r = cli("eval", "vqa", "--dataset", qa, "--out", tmp_path / name, "--model", model, "--max-new-tokens", "4")
        assert r.exit_code == 0, r
    answers_a, answers_b = tmp_path / "a" / "answers.jsonl", tmp_path / "b" / "answers.jsonl"
    reviews, fresh = tmp_path / "reviews.jsonl", tmp_path / "fresh.jsonl"
    with LLMServer(judge_responder(lambda body: (8, 5))) as srv:
        def gpt(answers, out, *extra):
            return cli("eval", "gpt-score", "--questions", qa, "--answers", answers, "--output", out,
                       "--base-url", srv.url, "--judge", "judge-a", "--no-cache", *extra)

        assert gpt(answers_a, fresh).exit_code == 0
        assert gpt(answers_a, reviews).exit_code == 0
        full = reviews.read_text().splitlines()
        reviews.write_text("\n".join(full[:2]) + "\n")  # as if the run had been killed after two reviews
        before = reviews.read_bytes(), (tmp_path / "reviews.run.json").read_bytes()

        r = gpt(answers_a, reviews, "--judge", "judge-b")
        assert r.exit_code == 1 and 'judge "judge-a" → "judge-b"' in r.stderr and "--overwrite" in r.stderr
        r = gpt(answers_a, reviews, "--temperature", "0.9")
        assert r.exit_code == 1 and "temperature 0.2 → 0.9" in r.stderr
        r = gpt(answers_b, reviews)
        assert r.exit_code == 1 and "answers" in r.stderr and "Traceback" not in r.stderr
        assert (reviews.read_bytes(), (tmp_path / "reviews.run.json").read_bytes()) == before

        r = gpt(answers_a, reviews, "--json")
        assert r.exit_code == 0, r
        assert (json.loads(r.stdout)["already_done"], json.loads(r.stdout)["requested"]) == (2, 2)

    def key(path):
        return sorted((o["question_id"], o["ref_score"], o["model_score"], o["run_id"], o["answer_run_id"])
                      for o in read_jsonl(path))

    assert key(reviews) == key(fresh)  # resumed reviews == uninterrupted reviews
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())
    assert {o["answer_run_id"] for o in read_jsonl(reviews)} == {run_a["run_id"]}

    fp = run_a["model"]["fingerprint"][:12]
    r = cli("eval", "summarize", reviews)
    assert r.exit_code == 0, r
    assert f"{tiny_ckpt.name} ({fp})" in r.stdout and "judge-a" in r.stdout
    r = cli("eval", "summarize", reviews, "--format", "csv")
    assert r.exit_code == 0 and f",{tiny_ckpt.name},{fp},judge-a," in r.stdout
    r = cli("eval", "summarize", reviews, "--format", "json")
    (s,) = json.loads(r.stdout)
    assert s["provenance"]["model_fingerprint"] == run_a["model"]["fingerprint"]
    assert s["provenance"]["answers_run_id"] == run_a["run_id"]

    # Answers regenerated (same model and settings, so the same run id, but new answers): the
    # reviews of the old answers are not extended; --overwrite starts over.
    r = cli("eval", "vqa", "--dataset", qa, "--out", tmp_path / "a", "--model", tiny_ckpt, "--max-new-tokens", "4",
            "--overwrite")
    assert r.exit_code == 0 and json.loads((tmp_path / "a" / "run.json").read_text())["run_id"] == run_a["run_id"]
    with LLMServer(judge_responder(lambda body: (8, 5))) as srv:
        args = ["eval", "gpt-score", "--questions", qa, "--output", reviews, "--base-url", srv.url,
                "--judge", "judge-a", "--no-cache"]
        before = reviews.read_bytes()
        r = cli(*args, "--answers", answers_a)
        assert r.exit_code == 1 and "field 'answer_id'" in r.stderr and "answers changed" in r.stderr
        assert reviews.read_bytes() == before
        r = cli(*args, "--answers", answers_b, "--overwrite")
        assert r.exit_code == 0, r
    run_b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert [o["answer_run_id"] for o in read_jsonl(reviews)] == [run_b["run_id"]] * 4
