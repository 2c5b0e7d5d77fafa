"""Incremental detokenisation (llavamed_core.infer.detok.TextAssembler) on the tiny checkpoint's
byte-level tokenizer, where one character can span several tokens.

The streamed deltas plus what ``finish`` holds back add up to the final text, which equals a
plain decode of all the ids (cut at the first stop string, stripped); no delta ends inside a
character; a stop string that spans tokens ends the text at the token that completes it.
"""

from __future__ import annotations

import pytest

TEXT = "  Läsion im Lungenflügel 肺 ✓ done ### after  "


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


def _feed(tokenizer, ids, stops):
    from llavamed_core.infer.detok import TextAssembler

    asm = TextAssembler(tokenizer, stops)
    deltas, used = [], 0
    for token in ids:
        used += 1
        if asm.add(token):
            break
        delta = asm.take_delta()
        if delta:
            deltas.append(delta)
    final, rest = asm.finish()
    return asm, deltas, final, rest, used


def test_deltas_add_up_to_the_plain_decode_and_never_split_a_character(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # characters span tokens
    asm, deltas, final, rest, used = _feed(tokenizer, ids, [])
    assert used == len(ids) and not asm.stopped
    assert "".join(deltas) + rest == final == plain.strip()
    assert len(deltas) > 5 and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop", ["###", "genfl", "ügel 肺"])
def test_a_stop_string_spanning_tokens_ends_the_text_at_the_token_completing_it(tokenizer, stop):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    asm, deltas, final, rest, used = _feed(tokenizer, ids, [stop])
    expected = plain[:plain.index(stop)].strip()
    assert asm.stopped and final == expected
    assert "".join(deltas) + rest == expected  # nothing of the stop string was ever streamed
    assert used == min(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    assert len(asm.ids) == used
