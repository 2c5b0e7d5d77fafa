"""`llavamed data synth` and `llavamed data validate`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from PIL import Image

from llavamed_core.data.synth import SynthConfig, make_synthetic_vqa
from llavamed_core.records import load_conversations


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_balanced_and_valid(tmp_path, cli):
    a = make_synthetic_vqa(SynthConfig(out=tmp_path / "a", n_train=40, n_test=20, seed=3))
    make_synthetic_vqa(SynthConfig(out=tmp_path / "b", n_train=40, n_test=20, seed=3))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    test = load_conversations(a.test)
    closed = [c for c in test if c.answer_type == "CLOSED"]
    assert len(closed) == 20 and {c.answer() for c in closed} <= {"yes", "no"}
    assert 5 <= sum(c.answer() == "yes" for c in closed) <= 15
    assert Counter(c.extra["question_type"] for c in test)["location"] == sum(c.answer() == "yes" for c in closed)
    assert {c.extra["modality"] for c in test} <= {"fundus photograph", "histology", "microscopy", "CT"}
    inst = load_conversations(a.instruct)
    assert len(inst) == 40 and all(len(c.turns) in (4, 6) for c in inst)
    assert Image.open(tmp_path / "a" / "images" / test[0].image).size == (32, 32)
    for name in ("train.json", "test.json", "align.json", "instruct.json"):
        res = cli("data", "validate", tmp_path / "a" / name, "--images", tmp_path / "a" / "images")
        assert res.exit_code == 0, res


def test_synth_cli_json(tmp_path, cli):
    res = cli("data", "synth", "--out", tmp_path / "s", "--n", "6", "--n-test", "4", "--json")
    assert res.exit_code == 0, res
    out = json.loads(res.stdout)
    assert out["images"] == 10 and out["closed_test"] == 4


def test_validate_reports_every_problem_by_kind(tmp_path, cli, tiny_ckpt):
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (8, 8)).save(img / "ok.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG not really")

    def rec(rid, conv, image="ok.png", **extra):
        return {"id": rid, "image": image, "conversations": conv, **extra}

    good = [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "no"}]
    records = [
        rec("good", good, domain={"ct_scan": True}, question_type="PRES"),  # extra keys pass
        rec("missing-img", good, image="nope.png"),
        rec("corrupt-img", good, image="corrupt.png"),
        rec("no-token", [{"from": "human", "value": "Is there?"}, {"from": "gpt", "value": "no"}]),
        rec("two-tokens", [{"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "no"}]),
        rec("empty", []),
        rec("bad-role", [{"from": "human", "value": "<image>?"}, {"from": "doctor", "value": "no"}]),
        rec("too-long", [{"from": "human", "value": "<image>\n" + "lesion " * 600}, {"from": "gpt", "value": "no"}]),
        rec("good", good),
    ]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(records))
    res = cli("data", "validate", f, "--images", img, "--model", tiny_ckpt, "--json")
    assert res.exit_code == 1
    rep = json.loads(res.stdout)
    assert rep["records"] == 9 and rep["ok"] == 1
    assert rep["by_kind"] == {"image-token": 2, "image-missing": 1, "image-corrupt": 1, "empty": 1,
                              "roles": 1, "too-long": 1, "duplicate-id": 1}
    assert rep["examples"]["roles"][0]["record"] == "bad-role"
    assert "record missing-img, field 'image'" in rep["examples"]["image-missing"][0]["message"]
    assert res.stderr.strip().splitlines()[-2].startswith("Error: ")
    # Table output names the kinds too.
    res = cli("data", "validate", f, "--images", img)
    assert res.exit_code == 1 and "image-corrupt" in res.stdout and "Traceback" not in res.stderr
