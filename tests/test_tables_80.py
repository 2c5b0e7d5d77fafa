"""Every summary table the commands print, rendered at 80 columns with realistic values: nothing is
cut (no Rich "…"), no line is wider than 80, every header word shows whole, long paths are
shortened from the middle (keeping the file name), and eval vqa marks the paper's headline numbers.

The eval tables come from the real commands (score-only ``eval vqa``, ``eval summarize``); the other
commands' tables are built with the columns and the kind of values those commands print.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llavamed_cli import _console

DEEP = "/home/radiologist/projects/llava-med-reproduction/runs/2026-11-28/instruct-vqa-rad-finetune"


@pytest.fixture
def out80(monkeypatch):
    """stdout tables rendered at 80 columns, without colour."""
    monkeypatch.setattr(_console.out, "width", 80)
    monkeypatch.setattr(_console.out, "_color_system", None)


def check(text: str, headers: list[str] = ()) -> None:
    assert "…" not in text, text
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    words = set(re.findall(r"[^\s│┃┏┓┗┛┡┩└┘━─┳┻╇┴┬╋┼]+", text))
    for h in headers:
        for w in h.split():
            assert w in words, (w, text)


def render(title, columns, rows, caption=None) -> str:
    from rich.console import Console

    con = Console(width=80, record=True, color_system=None, file=open("/dev/null", "w"))
    con.print(_console.table(title, columns, rows, caption))
    return con.export_text()


def test_shorten_path_keeps_the_file_name():
    short = _console.shorten_path(f"{DEEP}/checkpoints/answers.jsonl")
    assert short == "/home/.../checkpoints/answers.jsonl" and len(short) <= 40
    assert _console.shorten_path("data/vqa-rad/test.json") == "data/vqa-rad/test.json"
    assert _console.shorten_path("relative/" + "x" * 60 + ".png").endswith("x" * 60 + ".png")


CASES = [
    ("data download", f"data download → {DEEP}/downloads", ["file", "size", "status", "time (s)"],
     [["llava_med_instruct_60k_inline_mention.json", "1.2 GB", "downloaded (resumed)", 812.25],
      ["llava_med_alignment_500k.json", "980.1 MB", "already there (sha256 ok)", 0.01]]),
    ("data extract", f"data extract → {DEEP}/images", ["", "value"],
     [["figures", 467_710], ["already there", 12_345], ["extracted", 455_001], ["converted", 1_234],
      ["failed", 364], ["tarballs fetched", 312_000], ["downloaded (MB)", 1_234_567.89],
      ["time (s)", 86_400.5], ["figures/s", 5.27]]),
    ("data extract failures", "failures by reason", ["reason", "figures", "meaning"],
     [["too-large", 12, "the member exceeds the size limit, or the image the decompression-bomb limit"],
      ["network-error", 350, "connection failures or timeouts, after retries"]]),
    ("data prepare", f"data prepare vqa-rad (huggingface) → {DEEP}/data/vqa-rad",
     ["split", "questions", "open", "closed", "images", "skipped", "published", "check"],
     [["train", 1_797, 770, 1_027, 313, 0, 1_797, "ok"], ["test", 451, 179, 272, 203, 2, 451, "MISMATCH"]]),
    ("data validate", f"{DEEP}/llava_med_instruct_60k_inline_mention.json: 56,708 records, 56,700 ok",
     ["problem", "records", "first example"],
     [["image file not found", 8, f"record 10383 (PMC7398722_FIG_2): image {DEEP}/images/PMC7398722_FIG_2.jpg"]]),
    ("data synth", "data synth", ["file", "records", "what"],
     [[f"{DEEP}/synth/align.json", 2_000, "caption records (align stage)"],
      [f"{DEEP}/synth/test.json", 200, "VQA questions with answer_type, question_type, modality"]]),
    ("instruct gen", "instruct gen", ["", "value"],
     [["records written", 60_000], ["failed (see failures file)", 12], ["requests sent", 60_144],
      ["retries", 144], ["cache hits", 0], ["prompt tokens", 48_123_456], ["completion tokens", 21_000_000],
      ["time (s)", 86_400.0]]),
    ("instruct post", "instruct post", ["rule", "count"],
     [["dropped: no gpt turn", 3], ["dropped: answer mentions 'the caption' (leakage)", 41]]),
    ("weights init", "weights init", ["checkpoint", "from", "parameters", "image tokens", "projector"],
     [[f"{DEEP}/ckpt/llava-med-7b-init", "mistralai/Mistral-7B-Instruct-v0.2", 7_566_747_648, 576, "mlp2x_gelu"]]),
    ("weights convert", "weights convert", ["field", "value"],
     [["source", f"{DEEP}/downloads/llava_med_v1.5_mistral_7b"], ["layout", "llava-med-v1.5 (llava_mistral)"],
      ["output", f"{DEEP}/ckpt/llava-med-v1.5-hf"], ["fingerprint", "3f9a0c1d2e4b5a6978a1b2c3d4e5f60718293a4b"]]),
    ("weights merge-lora", "weights merge-lora", ["field", "value"],
     [["adapter", f"{DEEP}/lora/checkpoint-final"], ["base", f"{DEEP}/ckpt/llava-med-v1.5-hf"],
      ["output", f"{DEEP}/ckpt/merged"]]),
    ("train", "train instruct", ["", "value"],
     [["output", f"{DEEP}/ckpt/llava-med-instruct"], ["steps", 3_750], ["final loss", 0.8123],
      ["tokens/s", 12_345.6], ["time (s)", 86_400.0], ["peak memory (GB)", 71.25]]),
    ("eval vqa run", "eval vqa: vqa-rad", ["questions", "answered now", "resumed", "processes", "questions/s",
                                           "answers"],
     [[451, 400, 51, 8, 3.25, f"{DEEP}/eval/vqa-rad/answers.jsonl"]]),
    ("eval gpt-score", "eval gpt-score", ["", "value"],
     [["reviews written", 193], ["requests sent", 386], ["prompt tokens", 1_234_567]]),
    ("demo", "llavamed demo: synthetic test set, before and after training (%)", ["metric", "before", "after"],
     [["Closed acc. (paper: gt substring of prediction)", 48.5, 91.0],
      ["Open recall (paper 'Open')", 3.2, 64.1]]),
    ("demo sample", "sample chat answer", ["image", "question", "answer", "truth"],
     [["test_0007.png", "Is there a lesion in the left upper quadrant of this CT image?",
       "Yes, there is a round hyperdense lesion in the left upper quadrant.", "yes"]]),
]


@pytest.mark.parametrize("name,title,columns,rows", CASES, ids=[c[0] for c in CASES])
def test_command_tables_fit_80_columns(name, title, columns, rows):
    text = render(title, columns, rows)
    check(text, [c for c in columns if c])
    if DEEP in title:
        assert "/home/.../" in text


def _vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "a-rather-long-folder-name-for-the-evaluation-results" / "vqa-rad-test-set"
    d.mkdir(parents=True)
    qtypes = ["ABNORMALITY", "PRESENCE", "POSITION", "ORGAN SYSTEM", "MODALITY", "SIZE"]
    gt, ans = [], []
    for i in range(60):
        closed = i % 2 == 0
        truth = "yes" if closed else "left upper lobe"
        gt.append({"id": i, "image": f"img{i}.png", "answer_type": "CLOSED" if closed else "OPEN",
                   "question_type": qtypes[i % len(qtypes)], "modality": ["CT", "MRI", "X-Ray"][i % 3],
                   "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                                     {"from": "gpt", "value": truth}]})
        ans.append({"question_id": i, "text": truth if i % 3 else "no, the left lower lobe"})
    (d / "test.json").write_text(json.dumps(gt))
    (d / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ans))
    return d / "test.json", d / "answers.jsonl"


def test_eval_vqa_tables(cli, tmp_path, out80):
    gt, answers = _vqa_files(tmp_path)
    r = cli("eval", "vqa", "--answers", answers, "--gt", gt, "--out", tmp_path / "scored")
    assert r.exit_code == 0, r
    check(r.stdout, ["metric", "%", "questions", "count", "answer type", "question type", "modality",
                     "closed (paper) *", "closed (strict)", "open recall (paper) *", "exact match"])
    assert "paper_closed" not in r.stdout and "strict_c" not in r.stdout  # readable labels
    assert "Closed acc. (paper: gt substring of prediction) *" in r.stdout
    assert "* the paper's headline numbers" in r.stdout
    metrics = r.stdout.split("questions")[0]  # counts are not in the percentage table
    assert "missing predictions" not in metrics
    assert "ABNORMALITY" in r.stdout  # first-column values are not cut either


def test_eval_summarize_tables(cli, tmp_path, out80):
    from test_eval_summarize import REVIEWS_A, write_reviews

    d = tmp_path / "a-rather-long-folder-name-for-the-judged-reviews"
    d.mkdir()
    files = [write_reviews(d / f"reviews_llava-med-v1.5-mistral-7b-{k}.jsonl", REVIEWS_A) for k in "ab"]
    r = cli("eval", "summarize", *files)
    assert r.exit_code == 0, r
    check(r.stdout, ["bucket", "n", "ref", "model", "relative"])
