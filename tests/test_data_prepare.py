"""``llavamed data prepare``: each raw release format, written here as small fixtures, end to end.

Formats (docs/formats.md, "Raw VQA datasets"): VQA-RAD JSON + image folder and Parquet; SLAKE
train/validate/test JSON + imgs/; PathVQA pickles + images/<split>/ and Parquet. Also: a pickle
that tries to run code (refused, the code never runs), bad records, size checks, atomic output.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llavamed_core.data.prepare import PrepareConfig, prepare_vqa
from llavamed_core.data.prepare_pickle import load_plain_pickle
from llavamed_core.errors import DataError
from llavamed_core.records import load_conversations

# ---------------------------------------------------------------------------------------------
# Raw fixtures
# ---------------------------------------------------------------------------------------------


def _image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    im = Image.new("RGB", (4, 4), (seed % 256, (seed // 256) % 256, 7))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, seed: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(seed, fmt))


def _rad_record(qid, image, question, answer, answer_type, split="train", qtype="PRES"):
    return {"qid": qid, "image_name": image, "image_organ": "CHEST", "question": question,
            "answer": answer, "answer_type": answer_type, "question_type": qtype,
            "phrase_type": "test_freeform" if split == "test" else "freeform",
            "qid_linked_id": f"link-{qid}", "evaluation": "given"}


def make_vqa_rad_json(root: Path, records: list[dict] | None = None) -> Path:
    """A VQA-RAD release: the JSON list + image folder (3 train, 3 test questions, 3 images)."""
    records = records if records is not None else [
        _rad_record(0, "synpic100.jpg", "Is there a pneumothorax?", "No", "CLOSED"),
        _rad_record(1, "synpic100.jpg", "How many ribs are fractured?", 2, "OPEN", qtype="count"),
        _rad_record(2, "synpic200.jpg", "Which lung is affected?", "left lung", "closed ", qtype="POS"),
        _rad_record(3, "synpic300.jpg", "Is the heart enlarged?", "yes", "CLOSED", "test"),
        _rad_record(4, "synpic300.jpg", "What organ is shown?", "chest", "OPEN", "test", "ORGAN"),
        _rad_record(5, "synpic200.jpg", "Is this an MRI?", "no", "CLOSED", "test", "MODALITY"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(sorted({r["image_name"] for r in records
                                     if isinstance(r, dict) and isinstance(r.get("image_name"), str)})):
        if ".." not in name and not name.startswith("nothere"):  # "nothere*": a missing image
            _write_image(root / "VQA_RAD Image Folder" / name, i, "JPEG")
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    return root


def _write_parquet(path: Path, rows: list[dict], image_as_struct: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_as_struct:
        images = pa.array([{"bytes": r["image"], "path": None} for r in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array([r["image"] for r in rows], pa.binary())
    table = pa.table({"image": images, "question": [r["question"] for r in rows],
                      "answer": [r["answer"] for r in rows]})
    pq.write_table(table, path)


def make_parquet_release(root: Path, splits=("train", "test"), struct=True) -> Path:
    """Parquet files as the Hub builds publish them (image bytes repeated per question)."""
    shared = _image_bytes(1)
    for s, split in enumerate(splits):
        rows = [{"image": shared, "question": "Is there a mass?", "answer": "yes"},
                {"image": shared, "question": "Where is the mass?", "answer": "left upper lobe"},
                {"image": _image_bytes(40 + 90 * s, "JPEG"), "question": "Is it normal?", "answer": "No"}]
        _write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows, struct)
    return root


def _slake_record(qid, img, question, answer, answer_type, lang="en", content="Organ"):
    return {"img_id": int(img.split("/")[0][5:]), "img_name": img, "question": question,
            "answer": answer, "q_lang": lang, "location": "Lung", "modality": "CT",
            "answer_type": answer_type, "base_type": "vqa", "content_type": content,
            "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(root: Path) -> Path:
    """SLAKE 1.0: train/validate/test JSON (English and Chinese questions) + imgs/<dir>/source.jpg."""
    splits = {
        "train.json": [_slake_record(1, "xmlab1/source.jpg", "Which organ is shown?", "Lung", "OPEN"),
                       _slake_record(2, "xmlab1/source.jpg", "这是什么器官？", "肺", "OPEN", "zh"),
                       _slake_record(3, "xmlab2/source.jpg", "Is the lung healthy?", "No", "CLOSED",
                                     content="Abnormality")],
        "validate.json": [_slake_record(10, "xmlab2/source.jpg", "What modality?", "CT", "OPEN",
                                        content="Modality")],
        "test.json": [_slake_record(20, "xmlab3/source.jpg", "Does it show the heart?", "Yes", "CLOSED"),
                      _slake_record(21, "xmlab3/source.jpg", "图中有心脏吗？", "是", "CLOSED", "zh")],
    }
    for name, recs in splits.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    for i in (1, 2, 3):
        _write_image(root / "imgs" / f"xmlab{i}" / "source.jpg", i, "JPEG")
    return root


def make_pathvqa_pickles(root: Path, protocol: int = 4) -> Path:
    """PathVQA: split/qas/<split>/<split>_qa.pkl + split/images/<split>/<name>.jpg."""
    base = root / "split"
    data = {
        "train": [{"image": "train_0001", "question": "Is this an adenoma?", "answer": "yes"},
                  {"image": "train_0001", "question": "What is present?", "answer": "necrosis"},
                  {"image": "train_0002", "question": "How is the tissue stained?", "answer": "h&e"}],
        "val": [{"image": "val_0001", "question": "Is this benign?", "answer": "no"}],
        "test": [{"image": "test_0001", "question": "Where is the lesion?", "answer": "liver"},
                 {"image": "test_0002", "question": "Is there fibrosis?", "answer": "yes"}],
    }
    for split, recs in data.items():
        (base / "qas" / split).mkdir(parents=True, exist_ok=True)
        with open(base / "qas" / split / f"{split}_qa.pkl", "wb") as fh:
            pickle.dump(recs, fh, protocol=protocol)
        for i, name in enumerate(sorted({r["image"] for r in recs})):
            _write_image(base / "images" / split / f"{name}.jpg", 50 + i + len(split), "JPEG")
    # The release's answer maps: not question files, must be ignored.
    with open(base / "qas" / "trainval_ans2label.pkl", "wb") as fh:
        pickle.dump({"yes": 0, "no": 1}, fh)
    return root


class _RunsCode:
    """Pickles as a call to os.system: loading it with pickle.load would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# VQA-RAD
# ---------------------------------------------------------------------------------------------


def test_vqa_rad_json_cli(cli, tmp_path):
    src = make_vqa_rad_json(tmp_path / "raw")
    out = tmp_path / "out"
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", out)
    assert res.exit_code == 0, res
    assert "train" in res.stdout and "test" in res.stdout and "MISMATCH" in res.stdout
    # The file names are the standard release's, so the sizes are checked: a warning, not a crash.
    assert ("test differs from the published vqa-rad release: questions 3 (published 451), "
            "open 1 (published 179)") in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["images", "prepare.json", "test.json", "train.json"]
    train = _json(out / "train.json")
    assert [r["id"] for r in train] == [0, 1, 2]
    assert train[0]["conversations"] == [
        {"from": "human", "value": "<image>\nIs there a pneumothorax?"},
        {"from": "gpt", "value": "No"}]
    assert train[1]["conversations"][1]["value"] == "2"           # numeric answer → text
    assert train[2]["answer_type"] == "CLOSED"                      # "closed " normalised
    assert [r["question_type"] for r in train] == ["PRES", "COUNT", "POS"]
    assert train[0]["image_organ"] == "CHEST" and train[0]["image"] == "synpic100.jpg"
    test = load_conversations(out / "test.json")                     # our own reader accepts it
    assert [c.answer_type for c in test] == ["CLOSED", "OPEN", "CLOSED"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["synpic100.jpg", "synpic200.jpg",
                                                                  "synpic300.jpg"]
    manifest = _json(out / "prepare.json")
    assert manifest["splits"]["test"] == {"questions": 3, "open": 1, "closed": 2, "images": 2,
                                          "skipped": 0, "other_language": 0}
    assert manifest["standard_release"] is True


def test_vqa_rad_strict_mismatch_fails_and_writes_nothing(cli, tmp_path):
    src = make_vqa_rad_json(tmp_path / "raw")
    out = tmp_path / "out"
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", out, "--strict")
    assert res.exit_code == 1
    assert "Error:" in res.stderr and "split sizes differ" in res.stderr
    assert "test questions 3 (published 451)" in res.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary folder left behind


def test_vqa_rad_standard_sizes_pass_the_check(tmp_path):
    # A release with exactly the published figures: train 1,797 (770 open / 1,027 closed,
    # 313 images), test 451 (179 / 272, 203 images).
    recs, qid = [], 0
    for split, n_open, n_closed, n_img, first in (("train", 770, 1027, 313, 0),
                                                  ("test", 179, 272, 203, 313)):
        for i in range(n_open + n_closed):
            closed = i >= n_open
            recs.append(_rad_record(qid, f"synpic{first + i % n_img}.jpg", f"Question {qid}?",
                                    "yes" if closed else "lung", "CLOSED" if closed else "OPEN", split))
            qid += 1
    src = make_vqa_rad_json(tmp_path / "raw", recs)
    res = prepare_vqa(PrepareConfig("vqa-rad", src, tmp_path / "out", strict=True, link=True))
    assert res.mismatches == [] and len(res.checks) == 8
    assert res.splits["train"].images == 313 and res.splits["test"].questions == 451


def test_vqa_rad_parquet(cli, tmp_path):
    src = make_parquet_release(tmp_path / "raw")
    out = tmp_path / "out"
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", out, "--json")
    assert res.exit_code == 0, res
    summary = json.loads(res.stdout)
    assert summary["source_kind"] == "parquet" and summary["files"] == ["train.json", "test.json"]
    train = _json(out / "train.json")
    assert [r["id"] for r in train] == ["train-00000", "train-00001", "train-00002"]
    assert [r["answer_type"] for r in train] == ["CLOSED", "OPEN", "CLOSED"]   # yes/no → CLOSED
    assert [r["question_type"] for r in train] == ["is", "where", "is"]       # first word
    # the image repeated in every row is written once, under its content hash
    assert train[0]["image"] == train[1]["image"] != train[2]["image"]
    assert train[0]["image"].endswith(".png") and train[2]["image"].endswith(".jpg")
    assert (out / "images" / train[0]["image"]).read_bytes() == _image_bytes(1)
    assert len(list((out / "images").iterdir())) == 3


def test_parquet_with_plain_binary_image_column(tmp_path):
    src = make_parquet_release(tmp_path / "raw", struct=False)
    res = prepare_vqa(PrepareConfig("vqa-rad", src, tmp_path / "out"))
    assert res.splits["test"].questions == 3 and res.splits["test"].images == 2


# ---------------------------------------------------------------------------------------------
# SLAKE
# ---------------------------------------------------------------------------------------------


def test_slake_english_by_default(cli, tmp_path):
    src = make_slake(tmp_path / "Slake1.0")
    out = tmp_path / "out"
    res = cli("data", "prepare", "slake", "--src", src, "--out", out)
    assert res.exit_code == 0, res
    assert sorted(p.name for p in out.glob("*.json")) == ["prepare.json", "test.json", "train.json",
                                                          "val.json"]
    train = _json(out / "train.json")
    assert [r["id"] for r in train] == [1, 3]                    # the Chinese question is left out
    assert train[0]["image"] == "xmlab1/source.jpg" and (out / "images/xmlab1/source.jpg").is_file()
    assert train[0]["modality"] == "CT" and train[0]["question_type"] == "Organ"
    assert train[1]["answer_type"] == "CLOSED" and train[1]["question_type"] == "Abnormality"
    manifest = _json(out / "prepare.json")
    assert manifest["splits"]["train"]["other_language"] == 1
    assert manifest["lang"] == "en"
    assert "1061" in res.stdout.replace(",", "")                # published test size shown


def test_slake_other_languages(tmp_path):
    src = make_slake(tmp_path / "Slake1.0")
    res = prepare_vqa(PrepareConfig("slake", src, tmp_path / "all", lang="all"))
    assert res.splits["train"].questions == 3 and res.checks == []
    zh = prepare_vqa(PrepareConfig("slake", src, tmp_path / "zh", lang="zh"))
    assert zh.files == ["train.json", "test.json"]
    rec = _json(tmp_path / "zh" / "test.json")[0]
    assert rec["conversations"][1]["value"] == "是" and rec["q_lang"] == "zh"


# ---------------------------------------------------------------------------------------------
# PathVQA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pathvqa_pickles(tmp_path, protocol):
    src = make_pathvqa_pickles(tmp_path / "pvqa", protocol)
    out = tmp_path / "out"
    res = prepare_vqa(PrepareConfig("pathvqa", src, out))
    assert res.source_kind == "pickle" and res.standard
    assert res.files == ["train.json", "val.json", "test.json"]
    train = _json(out / "train.json")
    assert [r["id"] for r in train] == ["train-00000", "train-00001", "train-00002"]
    assert [r["answer_type"] for r in train] == ["CLOSED", "OPEN", "OPEN"]
    assert [r["question_type"] for r in train] == ["is", "what", "how"]
    assert train[0]["image"] == "train/train_0001.jpg"
    assert (out / "images" / "train" / "train_0001.jpg").is_file()
    assert res.splits["test"].images == 2 and res.splits["val"].closed == 1
    assert {c.figure for c in res.mismatches} >= {"questions"}


def test_pickle_that_runs_code_is_refused(cli, tmp_path):
    src = make_pathvqa_pickles(tmp_path / "pvqa")
    marker = tmp_path / "PWNED"
    evil = [{"image": "test_0001", "question": "q?", "answer": _RunsCode(marker)}]
    (src / "split" / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(evil))
    out = tmp_path / "out"
    res = cli("data", "prepare", "pathvqa", "--src", src, "--out", out)
    assert res.exit_code == 1
    assert "test_qa.pkl: refused to load" in res.stderr
    assert f"'{os.system.__module__}.system'" in res.stderr and "can run code" in res.stderr
    assert "Hint:" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval), pickle.dumps(Path("/etc")), pickle.dumps([OrderedDict(a=1), io.BytesIO]),
])
def test_restricted_unpickler_refuses_globals(tmp_path, payload):
    f = tmp_path / "x.pkl"
    f.write_bytes(payload)
    with pytest.raises(DataError, match="refused to load"):
        load_plain_pickle(f)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_restricted_unpickler_loads_plain_data(tmp_path, protocol):
    obj = [{"a": "b", "n": 1, "x": 2.5, "t": (1, 2), "s": {1, 2}, "f": frozenset({"q"}),
            "b": b"\x00\xff", "none": None, "ok": True, "od": OrderedDict(k="v")}]
    f = tmp_path / "ok.pkl"
    f.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert load_plain_pickle(f) == obj


def test_truncated_pickle_is_a_clear_error(tmp_path):
    f = tmp_path / "t.pkl"
    f.write_bytes(pickle.dumps([{"a": "b"}] * 10)[:-5])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_plain_pickle(f)


def test_pathvqa_parquet_with_validation_split(tmp_path):
    src = make_parquet_release(tmp_path / "raw", splits=("train", "validation", "test"))
    res = prepare_vqa(PrepareConfig("pathvqa", src, tmp_path / "out"))
    assert res.source_kind == "parquet" and res.files == ["train.json", "val.json", "test.json"]
    assert [(c.split, c.expected) for c in res.checks] == [("train", 19654), ("val", 6259),
                                                           ("test", 6719)]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _rad_with(tmp_path, **changes) -> Path:
    recs = [_rad_record(0, "synpic100.jpg", "Is there a mass?", "yes", "CLOSED"),
            _rad_record(1, "synpic100.jpg", "Where?", "left", "OPEN", "test")]
    recs[1].update(changes)
    return make_vqa_rad_json(tmp_path / "raw", recs)


@pytest.mark.parametrize("changes,needle", [
    ({"answer": None}, "record 1, field 'answer': missing"),
    ({"answer": ""}, "record 1, field 'answer': empty"),
    ({"question": 5}, "record 1, field 'question': expected text, found int"),
    ({"answer_type": "MAYBE"}, "record 1, field 'answer_type': expected OPEN or CLOSED"),
    ({"image_name": "../../etc/passwd"}, "record 1, field 'image': missing, empty, or a path outside"),
    ({"image_name": "nothere.jpg"}, "record 1, field 'image': image file not found"),
    ({"qid": 0, "phrase_type": "freeform"}, "record 0, field 'qid': duplicate id within the train split"),
    ({"phrase_type": None}, "record 1, field 'phrase_type': missing"),
])
def test_bad_records_name_file_record_field(cli, tmp_path, changes, needle):
    src = _rad_with(tmp_path, **changes)
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out")
    assert res.exit_code == 1, res
    assert "VQA_RAD Dataset Public.json, " + needle in res.stderr
    assert "Hint:" in res.stderr and not (tmp_path / "out").exists()


def test_image_that_does_not_decode(cli, tmp_path):
    src = _rad_with(tmp_path, image_name="broken.jpg")
    (src / "VQA_RAD Image Folder" / "broken.jpg").write_bytes(b"not an image at all")
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "record 1, field 'image'" in res.stderr and "does not decode" in res.stderr


def test_max_bad_skips_and_reports(cli, tmp_path):
    src = _rad_with(tmp_path, image_name="nothere.jpg")
    out = tmp_path / "out"
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", out, "--max-bad", "1")
    assert res.exit_code == 0, res
    assert "skipped 1 bad record(s); first:" in res.stderr and "nothere.jpg" in res.stderr
    manifest = _json(out / "prepare.json")
    assert manifest["skipped_records"] == 1 and "record 1, field 'image'" in manifest["problems"][0]
    assert not (out / "test.json").exists()  # its only question was skipped


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "raw" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"]}), path)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet, field 'answer': column missing"):
        prepare_vqa(PrepareConfig("vqa-rad", tmp_path / "raw", tmp_path / "out"))


def test_parquet_image_bytes_that_do_not_decode(tmp_path):
    _write_parquet(tmp_path / "raw" / "test-0.parquet",
                   [{"image": b"garbage", "question": "Is it?", "answer": "yes"}])
    with pytest.raises(DataError, match=r"record test-00000, field 'image': image does not decode"):
        prepare_vqa(PrepareConfig("pathvqa", tmp_path / "raw", tmp_path / "out"))


def test_slake_file_that_is_not_a_list(tmp_path):
    src = make_slake(tmp_path / "s")
    (src / "validate.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match=r"validate.json: expected a JSON list of records, found dict"):
        prepare_vqa(PrepareConfig("slake", src, tmp_path / "out"))


@pytest.mark.parametrize("args,needle,code", [
    (["slake", "--src", "{tmp}/nowhere"], "nowhere: not found", 1),
    (["slake", "--src", "{tmp}"], "no SLAKE release found", 1),
    (["pathvqa", "--src", "{tmp}"], "no PathVQA release found", 1),
    (["vqa-rad", "--src", "{tmp}", "--lang", "zh"], "only SLAKE has questions in several languages", 1),
    (["slake", "--src", "{tmp}", "--lang", "fr"], "unknown --lang 'fr'", 1),
    (["mimic", "--src", "{tmp}"], "", 2),
])
def test_bad_options(cli, tmp_path, args, needle, code):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = cli("data", "prepare", *args, "--out", tmp_path / "out")
    assert res.exit_code == code, res
    assert needle in res.stderr


def test_existing_output_needs_overwrite(cli, tmp_path):
    src = make_slake(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = cli("data", "prepare", "slake", "--src", src, "--out", out)
    assert res.exit_code == 1 and "exists and is not empty" in res.stderr
    assert (out / "keep.txt").exists()
    res = cli("data", "prepare", "slake", "--src", src, "--out", out, "--overwrite")
    assert res.exit_code == 0 and not (out / "keep.txt").exists() and (out / "test.json").exists()


def test_link_hard_links_images(tmp_path):
    src = make_slake(tmp_path / "s")
    prepare_vqa(PrepareConfig("slake", src, tmp_path / "out", link=True))
    a, b = src / "imgs/xmlab1/source.jpg", tmp_path / "out/images/xmlab1/source.jpg"
    assert os.stat(a).st_ino == os.stat(b).st_ino


def test_progress_events(tmp_path):
    events = []
    prepare_vqa(PrepareConfig("slake", make_slake(tmp_path / "s"), tmp_path / "out"), events.append)
    assert events and events[-1].finished and events[-1].done == 3


def test_vqa_rad_src_may_be_the_json_file(tmp_path):
    src = make_vqa_rad_json(tmp_path / "raw")
    res = prepare_vqa(PrepareConfig("vqa-rad", src / "VQA_RAD Dataset Public.json", tmp_path / "out"))
    assert res.standard and res.files == ["train.json", "test.json"]
