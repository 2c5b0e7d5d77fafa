"""Where a served request is prepared: small images on the event loop, others in threads.

Both paths must give the same answer (the path is a speed choice, not a behaviour), bad images
must get the same 400 on either, and a large or medical image must never be decoded on the
event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pydicom
import pytest

from llavamed_core.serve.api_errors import APIError
from llavamed_core.serve.config import ServeConfig, ServeLimits
from llavamed_core.serve.protocol import INLINE_PREP_PIXELS, parse_chat_request, quick_to_prepare
from serve_helpers import (ThreadServer, data_url, image_message, png_bytes, random_image,  # noqa: F401
                           tiny_engine)

CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def _chat(*urls: str):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Findings?"}]
    return parse_chat_request({"messages": [{"role": "user", "content": content}]}, ServeLimits())


def test_small_images_are_quick_and_decoded_once():
    chat = _chat(data_url(png_bytes(random_image(0, 64))), data_url(png_bytes(random_image(1, 300))))
    assert quick_to_prepare(chat, ServeLimits())
    assert not quick_to_prepare(chat, ServeLimits(), max_pixels=0)  # --inline-prep-pixels 0
    assert not quick_to_prepare(chat, ServeLimits(), max_pixels=64 * 64 + 300 * 300 - 1)
    assert quick_to_prepare(chat, ServeLimits(), max_pixels=64 * 64 + 300 * 300)
    assert all(ref.data.startswith(b"\x89PNG") for ref in chat.images)  # kept for decode_images


def test_large_remote_and_medical_images_go_to_the_threads():
    side = int(INLINE_PREP_PIXELS ** 0.5) + 1
    assert not quick_to_prepare(_chat(data_url(png_bytes(random_image(0, side)))), ServeLimits())
    # Two images, each small, over the budget together.
    half = data_url(png_bytes(random_image(0, int((INLINE_PREP_PIXELS / 2) ** 0.5) + 1)))
    assert not quick_to_prepare(_chat(half, half), ServeLimits())
    assert not quick_to_prepare(_chat("https://example.org/x.png"), ServeLimits())
    assert not quick_to_prepare(_chat(data_url(CT.read_bytes(), "application/dicom")), ServeLimits())


def test_a_bad_image_gets_the_same_400_on_either_path():
    from llavamed_core.serve.protocol import decode_images

    for url in ("data:image/png;base64,!!!notbase64", data_url(b"not an image at all")):
        errors = []
        for check in (quick_to_prepare, decode_images):
            with pytest.raises(APIError) as info:
                check(_chat(url), ServeLimits())
            errors.append((info.value.status, info.value.message))
        assert errors[0] == errors[1] and errors[0][0] == 400


def test_both_paths_answer_alike_and_big_images_never_run_on_the_loop(tiny_ckpt, tiny_engine, monkeypatch):
    """The same image sent small (prepared on the event loop) and forced through the threads
    gives the same answer; an image over the budget is prepared in a preparation thread."""
    with ThreadServer(ServeConfig(model=tiny_ckpt, port=0), engine_loader=lambda: tiny_engine) as srv:
        backend = srv.state.backend
        seen: list[str] = []
        real_prepare = backend.prepare

        def recording(chat):
            seen.append(threading.current_thread().name)
            return real_prepare(chat)

        monkeypatch.setattr(backend, "prepare", recording)

        def ask(url: str) -> dict:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                           json={"messages": image_message(url), "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        small = data_url(png_bytes(random_image(5, 48)))
        on_loop = ask(small)
        assert not seen[-1].startswith("llavamed-prep")
        srv.state.config.inline_prep_pixels = 0  # --inline-prep-pixels 0: every image to the threads
        in_thread = ask(small)
        assert seen[-1].startswith("llavamed-prep")
        assert on_loop["choices"] == in_thread["choices"] and on_loop["usage"] == in_thread["usage"]
        srv.state.config.inline_prep_pixels = INLINE_PREP_PIXELS
        ask(small)
        assert not seen[-1].startswith("llavamed-prep")
        ask(data_url(png_bytes(random_image(6, int(INLINE_PREP_PIXELS ** 0.5) + 8))))
        assert seen[-1].startswith("llavamed-prep")
