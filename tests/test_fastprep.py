"""The fast preparation path equals the processor's, bit for bit, or is not used.

Preparation (prompt ids and pixel values) feeds the model: any difference would change answers
silently. So every request is compared with the processor's own path, for the three
preprocessing layouts our presets use (tiny CLIP, v1 CLIP 224, v1.5 pad-to-square 336), and the
self-check that switches the fast path off is shown to catch a drift of one float ulp.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from llavamed_core.infer.engine import ChatRequest, GenerationParams, Preparer
from llavamed_core.infer.fastprep import FastPrep, fast_prep


def _processor(preset: str):
    from llavamed_core.model import build_from_preset
    from llavamed_core.model.presets import shrink_preset

    _model, processor = build_from_preset(preset if preset == "tiny" else shrink_preset(preset), seed=0)
    return processor


@pytest.fixture(scope="module", params=["tiny", "llava-med-v1", "llava-med-v1.5"])
def processor(request):
    return _processor(request.param)


def _image(rng: random.Random, mode: str = "RGB") -> Image.Image:
    w = rng.choice([1, 7, 31, 32, 33, 64, 100, 224, 335, 336, 337, 500, 801])
    h = rng.choice([w, rng.randint(1, 900)])
    arr = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _request(rng: random.Random, images: list[Image.Image]) -> ChatRequest:
    words = ["lesion", " ", "CT", "ünïcödé", "42", "\n", "  ", "左肺", "?", "the", "X-ray,"]
    text = "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    if rng.random() < 0.5:
        content.reverse()
    messages = [{"role": "user", "content": content}]
    if rng.random() < 0.3:
        messages += [{"role": "assistant", "content": [{"type": "text", "text": "An answer."}]},
                     {"role": "user", "content": [{"type": "text", "text": text[::-1] or "more"}]}]
    return ChatRequest(messages, GenerationParams(max_new_tokens=4))


def _both(preparer: Preparer, request: ChatRequest):
    fast = preparer.prepare(request)
    saved, preparer._fast = preparer._fast, None
    try:
        slow = preparer.prepare(request)
    finally:
        preparer._fast = saved
    return fast, slow


def test_fast_path_is_on_and_equals_the_processor(processor):
    """40 random requests (0–2 images of odd sizes and aspect ratios, multi-turn, unicode):
    the same ids and the same pixel values, bit for bit."""
    preparer = Preparer(processor, 4096)
    assert isinstance(preparer._fast_prep(), FastPrep), "the fast path should be on for our presets"
    rng = random.Random(7)
    for i in range(40):
        request = _request(rng, [_image(rng) for _ in range(rng.choice([0, 1, 1, 2]))])
        fast, slow = _both(preparer, request)
        assert fast.input_ids == slow.input_ids, f"request {i}: prompt ids differ"
        assert fast.tensors.keys() == slow.tensors.keys()
        for key in slow.tensors:
            assert fast.tensors[key].dtype == slow.tensors[key].dtype
            assert torch.equal(fast.tensors[key], slow.tensors[key]), f"request {i}: {key} differs"


def test_images_that_are_not_plain_rgb_go_to_the_processor(processor):
    """Greyscale, alpha and palette images: the processor's own colour conversion decides."""
    preparer = Preparer(processor, 4096)
    fast = preparer._fast_prep()
    rng = random.Random(3)
    for mode in ("L", "RGBA", "P", "I"):
        image = _image(rng, mode)
        assert fast.pixel_values([image]) is None
        a, b = _both(preparer, _request(rng, [image]))
        assert a.input_ids == b.input_ids and torch.equal(a.tensors["pixel_values"], b.tensors["pixel_values"])


def test_a_tokenizer_with_padding_set_goes_to_the_processor(processor):
    """Truncation or padding left on the Rust tokenizer would change the ids: not covered."""
    import copy

    preparer = Preparer(processor, 4096)
    fast = preparer._fast_prep()
    tok = copy.deepcopy(processor.tokenizer)
    assert fast.input_ids("a b c", tok) is not None
    tok._tokenizer.enable_padding(length=64)
    assert fast.input_ids("a b c", tok) is None
    tok._tokenizer.no_padding()
    tok._tokenizer.enable_truncation(3)
    assert fast.input_ids("a b c", tok) is None


def test_the_self_check_catches_a_one_ulp_drift(monkeypatch):
    """A fast path that differs from the processor anywhere is switched off, not used."""
    processor = _processor("tiny")
    assert fast_prep(processor, Preparer(processor, 512)._image_tokens) is not None
    real = FastPrep._one

    def drifted(self, image):
        out = real(self, image)
        out[0, 0, 0] = np.nextafter(out[0, 0, 0], np.float32(np.inf))
        return out

    monkeypatch.setattr(FastPrep, "_one", drifted)
    assert fast_prep(processor, Preparer(processor, 512)._image_tokens) is None
    preparer = Preparer(processor, 512)
    request = _request(random.Random(1), [_image(random.Random(2))])
    fast, slow = _both(preparer, request)
    assert torch.equal(fast.tensors["pixel_values"], slow.tensors["pixel_values"])


def test_processors_it_does_not_reproduce_are_left_to_themselves():
    processor = _processor("tiny")
    processor.image_processor.do_center_crop = False
    assert fast_prep(processor, 16) is None
    processor = _processor("tiny")
    processor.image_processor.size = {"height": 32, "width": 32}
    assert fast_prep(processor, 16) is None


def test_an_error_in_the_fast_path_falls_back_to_the_processor(monkeypatch):
    """A request the fast path cannot handle is prepared by the processor, not failed."""
    processor = _processor("tiny")
    preparer = Preparer(processor, 512)
    assert preparer._fast_prep() is not None
    rng = random.Random(4)
    request = _request(rng, [_image(rng)])
    want = _both(preparer, request)[1]

    def broken(self, image):
        raise RuntimeError("cannot")

    monkeypatch.setattr(FastPrep, "_one", broken)
    got = preparer.prepare(request)
    assert got.input_ids == want.input_ids and torch.equal(got.tensors["pixel_values"], want.tensors["pixel_values"])


def test_engine_batches_through_the_fast_path_equal_the_processors_batch(tiny_ckpt):
    """``Engine.generate`` (chat, eval vqa) now prepares each request through the fast path and
    left-pads them together: the model receives exactly what the processor's batched call gives."""
    from llavamed_core.infer import Engine
    from llavamed_core.infer.engine import request_images

    engine = Engine.load(tiny_ckpt, device="cpu")
    assert engine._fast_prep() is not None
    rng = random.Random(11)
    requests = [_request(rng, [_image(rng) for _ in range(rng.choice([0, 1, 2]))]) for _ in range(7)]
    got = engine._batch_inputs(requests)
    want = engine._encode([engine.render_prompt(r.messages) for r in requests],
                          [im for r in requests for im in request_images(r.messages)])
    assert set(got) == set(want) == {"input_ids", "attention_mask", "pixel_values"}
    for key in got:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
