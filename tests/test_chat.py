"""Tests of ``llavamed chat``: one-shot answers, a scripted interactive session on the real program
(pexpect on a pty) with ``/image``, a typed image path, ``/reset``, ``/save`` and ``/exit``, and bad input.

Expected answers come from :class:`~llavamed_core.infer.session.ChatSession` on the same tiny
checkpoint with greedy decoding, so the CLI must show exactly what the engine generates.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pexpect
import pytest
from PIL import Image

from llavamed_core.infer import Engine, GenerationParams
from llavamed_core.infer.session import ChatSession, find_image_path

GREEDY = ["--temperature", "0", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def engine(tiny_ckpt) -> Engine:
    return Engine.load(tiny_ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_images")
    paths = []
    for i in range(2):
        rng = np.random.default_rng(i)
        p = d / f"scan{i}.png"
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


def _expected(engine: Engine, exchanges: list[tuple[str | None, str]]) -> list[str]:
    """Greedy answers of a session: (image path to attach first or None, question) per turn."""
    s = ChatSession(engine, GenerationParams(max_new_tokens=10, temperature=0.0))
    out = []
    for img, q in exchanges:
        if img == "reset":
            s.reset()
        elif img is not None:
            s.attach_image(img)
        out.append(s.answer(q).text)
    return out


def test_one_shot_prints_the_answer(cli, tiny_ckpt, engine, images):
    r = cli("chat", images[0], "--model", tiny_ckpt, "--prompt", "Is there a lesion?", *GREEDY)
    assert r.exit_code == 0, r
    expected = _expected(engine, [(images[0], "Is there a lesion?")])[0]
    assert r.stdout == expected + "\n"
    r = cli("chat", images[0], "--model", tiny_ckpt, "--prompt", "Is there a lesion?", "--json", *GREEDY)
    rec = json.loads(r.stdout)
    assert rec["text"] == expected and rec["model"] == tiny_ckpt.name
    assert rec["finish_reason"] in ("stop", "length") and rec["prompt_tokens"] > 16
    assert rec["image"] == str(images[0])


def test_bad_inputs(cli, tiny_ckpt, tmp_path, images):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    r = cli("chat", bad, "--model", tiny_ckpt, "--prompt", "hi")
    assert r.exit_code == 1 and "does not decode as an image" in r.stderr and str(bad) in r.stderr
    assert r.stdout == ""
    r = cli("chat", images[0], "--prompt", "hi")  # no model given or configured (tests/test_config.py)
    assert r.exit_code == 1 and "no model" in r.stderr and "--server URL" in r.stderr
    r = cli("chat", images[0], "--model", tmp_path / "nope", "--prompt", "hi")
    assert r.exit_code == 1 and "checkpoint directory not found" in r.stderr


def test_history_is_trimmed_to_the_context(engine, images):
    s = ChatSession(engine, GenerationParams(max_new_tokens=8, temperature=0.0))
    s.attach_image(images[0])
    for _ in range(12):
        s.answer("Describe the lesion, its size, the modality and the location in detail " * 3)
    assert s.dropped > 0
    req = s.request_for("and now?")
    assert engine.count_tokens(req) + 64 <= engine.context_length
    # The image moved to the first exchange that was kept.
    assert req.messages[0]["content"][0]["type"] == "image"


def test_find_image_path(images, tmp_path):
    path, rest = find_image_path(f"what is in {images[0]} please")
    assert path == str(images[0]) and rest == "what is in please"
    assert find_image_path("no path here.png at all") == (None, "no path here.png at all")


def test_interactive_session(tiny_ckpt, engine, images, tmp_path):
    expected = _expected(engine, [(images[0], "Is there a lesion?"), (None, "Where is it?"),
                                  ("reset", "hello"), (images[1], "What is the modality?")])
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    child = pexpect.spawn(sys.executable, ["-m", "llavamed_cli.main", "chat", "--model", str(tiny_ckpt), *GREEDY],
                          env=env, encoding="utf-8", timeout=120, cwd=str(tmp_path))
    try:
        def answer_is(text: str) -> None:
            child.expect_exact("assistant> ")
            child.expect_exact(text.replace("\n", "\r\n") + "\r\n")
            child.expect_exact("you> ")

        child.expect_exact("you> ")
        assert "/image PATH" in child.before
        child.sendline(f"/image {images[0]}")
        child.expect_exact("image attached")
        child.expect_exact("you> ")
        child.sendline("Is there a lesion?")
        answer_is(expected[0])
        child.sendline("Where is it?")  # second turn: the history is part of the prompt
        answer_is(expected[1])
        child.sendline("/save first.json")
        child.expect_exact("saved")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("cleared")
        child.expect_exact("you> ")
        child.sendline("hello")
        answer_is(expected[2])
        child.sendline(f"{images[1]} What is the modality?")  # a typed path attaches the image
        child.expect_exact("image attached")
        answer_is(expected[3])
        child.sendline("/image missing.png")
        child.expect_exact("image file not found")  # an error does not end the session
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "first.json").read_text())
    assert saved[0]["image"] == str(images[0])
    assert [t["value"] for t in saved[0]["conversations"]] == [
        "<image>\nIs there a lesion?", expected[0], "Where is it?", expected[1]]


def test_repl_keys_history_help_and_ctrl_c(tiny_ckpt, images, tmp_path):
    """On a terminal: /help, Up recalls the last line (no raw escape echoed), Tab completes an image
    path, the history is kept in a file, a question without an image warns, and Ctrl-C clears the
    line once and leaves (exit 0) the second time."""
    hist = tmp_path / "hist"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", TERM="xterm", LLAVAMED_HISTORY=str(hist))
    child = pexpect.spawn(sys.executable, ["-m", "llavamed_cli.main", "chat", "--model", str(tiny_ckpt), *GREEDY],
                          env=env, encoding="utf-8", timeout=120, cwd=str(tmp_path))
    try:
        child.expect_exact("you> ")
        child.sendline("/help")
        child.expect_exact("Up/Down recall")
        child.expect_exact("you> ")
        child.send("\x1b[A")  # Up: recalls /help
        child.send("\r")
        child.expect_exact("Up/Down recall")
        child.expect_exact("you> ")
        assert "^[[A" not in child.before
        child.sendline("hello")
        child.expect_exact("no image attached")
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        child.send(f"/image {str(images[0])[:-4]}\t")  # Tab completes .../scan0 to .../scan0.png
        child.send("\r")
        child.expect_exact(f"image attached: {images[0]}")
        child.expect_exact("you> ")
        child.send("half a question")
        # Wait for readline to echo the text: a Ctrl-C that lands before readline has started reading
        # is only noticed at the next key press (CPython checks pending signals when select wakes).
        child.expect_exact("half a question")
        _interrupt(child, "Ctrl-C again")  # clears the line
        child.expect_exact("you> ")
        _interrupt(child, pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in child.before
    lines = hist.read_text().splitlines()
    assert "/help" in lines and "hello" in lines and "half a question" not in lines


def _interrupt(child, expected) -> None:
    """Ctrl-C, then wait for ``expected``. A SIGINT that lands in the instant before readline waits
    for input is only acted on at the next key, as for a person at the keyboard: if nothing comes,
    press a key that changes nothing (Right arrow at the end of the line)."""
    child.sendintr()
    if child.expect([expected, pexpect.TIMEOUT], timeout=15) == 1:
        child.send("\x1b[C")
        child.expect(expected)


def test_repl_completion(tmp_path, monkeypatch):
    from llavamed_cli.chat import complete

    (tmp_path / "scans").mkdir()
    (tmp_path / "scan1.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert complete("/im", "/im") == ["/image "]
    assert complete("/", "/") == ["/image ", "/reset", "/save ", "/help", "/exit"]
    assert complete("sca", "/image sca") == ["scan1.png", "scans/"]
    assert complete("scans/", "what about scans/") == []
