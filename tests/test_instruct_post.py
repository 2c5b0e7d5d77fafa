"""``llavamed instruct post`` on hand-written generations covering every splitting and filtering rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llavamed_core.instruct.postprocess import has_leak, is_refusal, split_turns, strip_leaks
from llavamed_core.records import load_conversations

DOM = {"chest_xray": False, "mri": True, "histology": False, "gross": False, "ct_scan": False}

# pair_id -> (generated text, what post must do with it)
CASES = {
    "clean": ("User: What modality is this?\nAssistant: It is an MRI of the brain.\n"
              "User: Is there a lesion?\nAssistant: Yes, a bright lesion in the left frontal lobe.", "kept"),
    "markdown": ("Sure! Here is the conversation:\n\n**User:** What organ is shown?\n**Assistant:** The liver is shown.\n"
                 "- **User**: Any fat?\n- **Assistant**: Yes, there are many fat droplets.", "kept"),
    "inline-labels": ("USER: Which side is affected? ASSISTANT: The right lung is affected. "
                      "User: How large? Assistant: It occupies most of the hemithorax.", "kept"),
    "ragged": ("Assistant: Hello there.\nUser: What is it?\nHuman: (continued) Please be brief.\n"
               "GPT: A CT scan of the abdomen.\nUser: And the last question?", "kept"),
    "stripped": ("User: What does the image show?\nAssistant: According to the caption, the image shows a "
                 "meningioma with a dural tail. It enhances avidly, as described in the text.\n"
                 "User: Where is it?\nAssistant: Along the left frontal convexity.", "kept"),
    "refusal-whole": ("I'm sorry, but I can't create a conversation about an image I cannot see.", "refusal"),
    "refusal-one-round": ("User: What is shown?\nAssistant: A chest X-ray with an effusion.\n"
                          "User: What is the patient's name?\nAssistant: As an AI language model, I cannot "
                          "provide personal information.", "kept"),
    "refusal-all": ("User: What is shown?\nAssistant: I am unable to view images, so I cannot tell.", "refusal"),
    "leak-question": ("User: What does the caption say about the lesion?\nAssistant: It is a benign cyst.\n"
                      "User: Is it large?\nAssistant: No, it is small and well defined.", "kept"),
    "leak-all": ("User: What is shown?\nAssistant: The caption says it is a CT of the chest, and the provided "
                 "text mentions nodules.", "leak"),
    "leak-and-refusal": ("User: Describe it.\nAssistant: As an AI, I cannot see it.\n"
                         "User: What does the figure legend say?\nAssistant: It lists three nodules.", "leak and refusal"),
    "empty": ("   ", "no response"),
    "unlabelled": ("This figure shows a histology slide with many inflammatory cells.", "no User/Assistant turns"),
}


def write_gens(path: Path, order=None) -> Path:
    ids = list(CASES) if order is None else order
    with open(path, "w") as fh:
        for pid in ids:
            fh.write(json.dumps({"pair_id": pid, "fig_caption": "c", "domain": DOM,
                                 "response": CASES[pid][0]}) + "\n")
        # A duplicate line (e.g. two generation runs concatenated) is dropped and counted.
        fh.write(json.dumps({"pair_id": "clean", "domain": DOM, "response": CASES["clean"][0]}) + "\n")
        # The original tools' key for the text.
        fh.write(json.dumps({"pair_id": "old-style", "domain": DOM,
                             "result": "User: What is it?\nAssistant: A gross specimen of the kidney."}) + "\n")
    return path


@pytest.fixture
def post_run(cli, tmp_path):
    gens = write_gens(tmp_path / "gen.jsonl")
    out = tmp_path / "instruct.json"
    res = cli("instruct", "post", "--input", gens, "--output", out, "--json")
    assert res.exit_code == 0, res
    return json.loads(res.stdout), {c["id"]: c for c in json.loads(out.read_text())}, out


def turns(conv):
    return [(t["from"], t["value"].replace("<image>", "").strip()) for t in conv["conversations"]]


def test_counts_per_rule(post_run):
    stats, _, _ = post_run
    assert stats["samples_in"] == len(CASES) + 2
    assert stats["kept"] == 8  # 7 kept cases + old-style
    assert stats["samples_dropped"] == {"refusal": 2, "leak": 1, "leak and refusal": 1, "no response": 1,
                                        "no User/Assistant turns": 1, "duplicate pair_id": 1}
    assert stats["rounds_dropped"] == {"refusal": 3, "leak": 3}
    assert stats["phrases_stripped"] == 2 and stats["kept_with_strips"] == 1
    assert stats["image_before"] + stats["image_after"] == 8


def test_kept_conversations(post_run):
    _, convs, out = post_run
    expected_kept = {pid for pid, (_, what) in CASES.items() if what == "kept"} | {"old-style"}
    assert set(convs) == expected_kept
    assert turns(convs["markdown"]) == [("human", "What organ is shown?"), ("gpt", "The liver is shown."),
                                        ("human", "Any fat?"), ("gpt", "Yes, there are many fat droplets.")]
    assert turns(convs["inline-labels"]) == [("human", "Which side is affected?"), ("gpt", "The right lung is affected."),
                                             ("human", "How large?"), ("gpt", "It occupies most of the hemithorax.")]
    # Leading answer dropped, same-speaker turns merged, trailing question dropped.
    assert turns(convs["ragged"]) == [("human", "What is it?\n(continued) Please be brief."),
                                      ("gpt", "A CT scan of the abdomen.")]
    assert turns(convs["stripped"])[1] == ("gpt", "The image shows a meningioma with a dural tail. It enhances avidly.")
    assert turns(convs["refusal-one-round"]) == [("human", "What is shown?"), ("gpt", "A chest X-ray with an effusion.")]
    assert turns(convs["leak-question"]) == [("human", "Is it large?"), ("gpt", "No, it is small and well defined.")]
    for conv in convs.values():
        assert conv["image"] == f"{conv['id']}.jpg" and conv["domain"] == DOM
        first = conv["conversations"][0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
    # The file is a valid conversation file (one <image>, alternating turns).
    assert len(load_conversations(out)) == len(convs)


def test_image_placement_is_seeded_per_pair_id(cli, tmp_path):
    gens = write_gens(tmp_path / "gen.jsonl")
    rev = write_gens(tmp_path / "rev.jsonl", order=list(reversed(CASES)))
    outs = {}
    for name, src, seed in (("a", gens, "0"), ("b", gens, "0"), ("rev", rev, "0"), ("s1", gens, "1")):
        assert cli("instruct", "post", "-i", src, "-o", tmp_path / f"{name}.json", "--seed", seed).exit_code == 0
        outs[name] = {c["id"]: c for c in json.loads((tmp_path / f"{name}.json").read_text())}
    assert outs["a"] == outs["b"] == outs["rev"]  # same seed: same placement, whatever the order
    assert outs["s1"] != outs["a"]

    many = tmp_path / "many.jsonl"
    with open(many, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"pair_id": f"p{i}", "response": "User: Q?\nAssistant: An answer here."}) + "\n")
    res = cli("instruct", "post", "-i", many, "-o", tmp_path / "many.json", "--json")
    stats = json.loads(res.stdout)
    assert stats["image_before"] > 5 and stats["image_after"] > 5


def test_summary_table_on_stdout(cli, tmp_path):
    gens = write_gens(tmp_path / "gen.jsonl")
    res = cli("instruct", "post", "-i", gens, "-o", tmp_path / "o.json")
    assert res.exit_code == 0
    for label in ("samples in", "kept", "rounds dropped: refusal", "rounds dropped: leak",
                  "samples dropped: no response", "leak phrases stripped"):
        assert label in res.stdout


def test_bad_generation_file(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"pair_id": "x", "text_wrong_key": "User: a\nAssistant: b"}) + "\n")
    res = cli("instruct", "post", "-i", bad, "-o", tmp_path / "o.json")
    assert res.exit_code == 1 and f"{bad}, record x, field 'response'" in res.stderr
    assert not (tmp_path / "o.json").exists()
    bad.write_text(json.dumps({"response": "User: a\nAssistant: b"}) + "\n")
    res = cli("instruct", "post", "-i", bad, "-o", tmp_path / "o.json")
    assert res.exit_code == 1 and "record line 1, field 'pair_id'" in res.stderr
    # A JSON array input works as well as JSONL.
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"pair_id": "y", "response": "User: Q?\nAssistant: An answer."}]))
    res = cli("instruct", "post", "-i", arr, "-o", tmp_path / "o.json", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["kept"] == 1


def test_rule_helpers():
    assert split_turns("no labels at all") == []
    assert split_turns("User: only a question") == []
    assert is_refusal("I'm afraid I cannot answer that.") and not is_refusal("The size cannot be determined.")
    assert has_leak("As mentioned in the article, x") and not has_leak("In the context of trauma, x")
    assert strip_leaks("Based on the provided information, there is a mass.") == ("There is a mass.", 1)
    assert strip_leaks("There is a mass (see caption).") == ("There is a mass.", 1)
