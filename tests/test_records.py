"""Conversation, question and answer records exactly as FORMATS.md describes them."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import REAL_QA50
from llavamed_core.errors import DataError
from llavamed_core.records import (conversation_to_dict, load_answers, load_conversations, load_qa50)


def _write(tmp_path, records, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_both_spellings_int_ids_image_before_or_after_and_extra_keys(tmp_path):
    recs = [
        {"id": "32432162_F1", "image": "a.jpg", "domain": {"chest_xray": True},
         "conversations": [{"from": "human", "value": "Describe the image.\n<image>"},
                           {"from": "gpt", "value": "A chest X-ray."}]},
        {"id": 7, "image": "b.jpg", "answer_type": "closed", "question_type": "PRES",
         "conversatons": [{"from": "human", "value": "<image>\nIs there a mass?"},
                          {"from": "gpt", "value": "yes"}]},
    ]
    convs = load_conversations(_write(tmp_path, recs))
    assert [c.id for c in convs] == ["32432162_F1", 7]
    assert convs[1].key == "conversatons" and convs[1].answer_type == "CLOSED"
    assert convs[0].extra == {"domain": {"chest_xray": True}}
    assert convs[0].question() == "Describe the image." and convs[1].answer() == "yes"
    m0 = convs[0].to_messages()[0]["content"]
    m1 = convs[1].to_messages()[0]["content"]
    assert m0[-1] == {"type": "image"} and m1[0] == {"type": "image"}
    assert conversation_to_dict(convs[1]) == recs[1]  # written back with the spelling it had


@pytest.mark.parametrize("conv,field,msg", [
    ([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "x"}], "conversations[0].value", "no <image>"),
    ([{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}], "conversations[0].value", "exactly one <image>"),
    ([], "conversations", "empty conversation"),
    ([{"from": "human", "value": "<image>q"}, {"from": "robot", "value": "x"}], "conversations[1].from", "neither human nor gpt"),
    ([{"from": "human", "value": "<image>q"}, {"from": "human", "value": "x"}], "conversations[1].from", "alternate"),
    ([{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "  "}], "conversations[1].value", "empty text"),
])
def test_bad_records_name_file_record_and_field(tmp_path, conv, field, msg):
    p = _write(tmp_path, [{"id": "ok1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
        {"id": "bad-42", "image": "a.jpg", "conversations": conv}])
    with pytest.raises(DataError) as ei:
        load_conversations(p)
    text = ei.value.message
    assert str(p) in text and "record bad-42" in text and f"field '{field}'" in text and msg in text


def test_duplicate_ids_are_an_error(tmp_path):
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>q"},
                                                         {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match="record 1, field 'id': duplicate id"):
        load_conversations(_write(tmp_path, [rec, dict(rec)]))


def test_real_qa50_questions_bucket_like_the_paper():
    qs = load_qa50(REAL_QA50)
    assert len(qs) == 193 and len({q.image for q in qs}) == 50
    assert Counter(q.type for q in qs) == {"conversation": 143, "detailed_description": 50}
    assert Counter(q.bucket_domain for q in qs) == {"chest_xray": 37, "mri": 38, "histology": 44,
                                                     "gross": 34, "ct_scan": 40}
    assert all(q.text.endswith("<image>") for q in qs)


def test_answers_reject_duplicates(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 1, "text": "no"}\n')
    with pytest.raises(DataError, match="duplicate"):
        load_answers(p)
