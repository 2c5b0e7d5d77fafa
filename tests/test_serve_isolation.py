"""One bad request fails alone: "batched with a bad request == alone".

Each hostile request (image placeholder in the text, seed 2**70, NaN/inf sampling values, text
over the context, images tiny on the wire but huge or extremely thin once decoded, a text/plain
POST, a foreign Host or Origin) is sent at the same time as valid greedy requests that the
scheduler puts in one batch (``max_batch`` = their number, a long ``max_wait_ms``). The hostile
one must get its exact 4xx with a clear message, never reach the engine, and every valid one
must get 200 with exactly the answer it gets alone. A failure forced inside the engine for one
row must fail that row only: the batch is run again one request at a time. Slow clients are cut
off (headers: connection closed; body: 408), and the web page carries a Content-Security-Policy.

All servers are the real uvicorn app on 127.0.0.1 in a thread of the test process, sharing one
tiny engine (serve_helpers.ThreadServer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import (ThreadServer, data_url, image_message, png_bytes, random_image,
                           tiny_engine)  # noqa: F401  (tiny_engine is a fixture)

VALID = [
    {"messages": image_message(data_url(png_bytes(random_image(31))), "What is shown?"),
     "max_tokens": 8, "temperature": 0},
    {"messages": [{"role": "user", "content": "Name one imaging modality."}], "max_tokens": 8,
     "temperature": 0, "stream": True},
    {"messages": image_message(data_url(png_bytes(random_image(32, size=48))), "Any lesion here?"),
     "max_tokens": 6, "temperature": 0},
]


def _config(model, **kw):
    from llavamed_core.serve.config import ServeConfig

    return ServeConfig(model=model, port=0, **kw)


def _ask(url: str, body: dict) -> tuple[int, str]:
    """Send a valid request; return (status, answer text), reading the stream when streamed."""
    if not body.get("stream"):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"]:
                    text.append(event["choices"][0]["delta"].get("content") or "")
        return r.status_code, "".join(text)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


@pytest.fixture(scope="module")
def alone(tiny_ckpt, tiny_engine):
    """The answer of every valid request sent alone (a server that never batches)."""
    with ThreadServer(_config(tiny_ckpt, max_batch=1, max_wait_ms=0), engine_loader=lambda: tiny_engine) as srv:
        answers = [_ask(srv.url, body) for body in VALID]
    assert all(status == 200 for status, _ in answers)
    return answers


@pytest.fixture(scope="module")
def batching(tiny_ckpt, tiny_engine):
    """A server whose batches wait (up to 5 s) until all the valid requests of a round are in."""
    cfg = _config(tiny_ckpt, max_batch=len(VALID), max_wait_ms=5000)
    with ThreadServer(cfg, engine_loader=lambda: tiny_engine) as srv:
        yield srv


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    return png_bytes(Image.new("L", (width, height)))


def _post_raw(url: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=120,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _text(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


def _image(png: bytes) -> dict:
    return {"messages": image_message(data_url(png)), "max_tokens": 4, "temperature": 0}


def _noise_text(n: int) -> str:
    import random

    rng = random.Random(0)
    return "".join(rng.choice("qzxjkvbwfy0123456789#%&") for _ in range(n))


# (name, how to build the request: url -> response, status, code, words in the message)
HOSTILE = [
    ("image placeholder in the text",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json={
         "messages": image_message(data_url(png_bytes(random_image(40))), "Compare <image> with this"),
         "max_tokens": 4}),
     400, "image_token_in_text", "messages[0].content[1].text: the text contains '<image>'"),
    ("seed 2**70 with sampling",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120,
                            json=_text("hi", temperature=0.7, seed=2 ** 70)),
     422, "invalid_value", "'seed' must be between -2**63 and 2**64-1, got 1180591620717411303424"),
    ("NaN temperature",
     lambda url: _post_raw(url, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
     422, "invalid_value", "'temperature' must be a finite number, got nan"),
    ("infinite top_p",
     lambda url: _post_raw(url, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}'),
     422, "invalid_value", "'top_p' must be a finite number"),
    ("10 MB of text",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_text("x" * 10_000_000)),
     400, "context_length_exceeded", "the messages hold 10,000,000 characters of text; this model's "
                                     "context of 512 tokens holds at most"),
    ("text over the context in tokens",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_text(_noise_text(3000))),
     400, "context_length_exceeded", "the prompt has 3002 tokens, the context length is 512; shorten"),
    ("16777216x1 PNG",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_image(_png(16_777_216, 1))),
     400, "image_too_large", "the image is 16777216x1 pixels, over this server's limit of 8,192 pixels "
                             "per side (--max-image-side)"),
    ("2000000x8 PNG",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_image(_png(2_000_000, 8))),
     400, "image_too_large", "the image is 2000000x8 pixels, over this server's limit of 8,192"),
    ("4000x100 PNG",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_image(_png(4000, 100))),
     400, "image_aspect_ratio", "an aspect ratio of 40:1, over this server's limit of 20:1"),
    ("text/plain POST",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, headers={"Content-Type": "text/plain"},
                            content=json.dumps(_text("hi")).encode()),
     415, "unsupported_media_type", "Content-Type is 'text/plain'; send the JSON body with "
                                    "'Content-Type: application/json'"),
    ("foreign Origin",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_text("hi"),
                            headers={"Origin": "http://evil.example"}),
     403, "origin_not_allowed", "requests from the web origin 'http://evil.example' are refused"),
    ("null Origin",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_text("hi"),
                            headers={"Origin": "null"}),
     403, "origin_not_allowed", "'null'"),
    ("rebound Host",
     lambda url: httpx.post(url + "/v1/chat/completions", timeout=120, json=_text("hi"),
                            headers={"Host": "attacker.example:8000"}),
     403, "host_not_allowed", "the Host header 'attacker.example:8000' is not a name this server answers to"),
]


@pytest.mark.parametrize("name,send,status,code,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_request_fails_alone(batching, alone, monkeypatch, name, send, status, code, words):
    from PIL import ImageFile

    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    before = _health(batching.url)
    with ThreadPoolExecutor(len(VALID) + 1) as pool:
        hostile = pool.submit(send, batching.url)
        valid = [pool.submit(_ask, batching.url, body) for body in VALID]
        r = hostile.result()
        answers = [f.result() for f in valid]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err
    assert "Traceback" not in r.text
    # Batched with a bad request == alone, and the bad one never reached the engine.
    assert answers == alone
    after = _health(batching.url)
    assert after["requests"] - before["requests"] == len(VALID)
    assert after["batches"] - before["batches"] == 1
    # Images are refused from their header: nothing over the side limit was ever decoded.
    assert all(max(size) <= 8192 for size in decoded), decoded


def test_an_engine_failure_in_one_row_fails_that_row_only(tiny_ckpt, tiny_engine, alone, monkeypatch):
    from llavamed_core.infer.batch import RunningBatch

    real_step = RunningBatch.step

    def faulty_step(self):
        poisoned = [r for r in self.rows if "POISON" in json.dumps(r.request.messages, default=str)]
        if poisoned and len(poisoned[0].ids) == 2:  # after the streamed rows have sent some text
            raise RuntimeError("simulated device fault")
        return real_step(self)

    monkeypatch.setattr(RunningBatch, "step", faulty_step)
    cfg = _config(tiny_ckpt, max_batch=len(VALID) + 1, max_wait_ms=5000)
    poison = {"messages": [{"role": "user", "content": "POISON: describe the scan"}], "max_tokens": 8,
              "temperature": 0}
    with ThreadServer(cfg, engine_loader=lambda: tiny_engine) as srv:
        with ThreadPoolExecutor(len(VALID) + 1) as pool:
            bad = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=poison, timeout=120)
            valid = [pool.submit(_ask, srv.url, body) for body in VALID]
            r = bad.result()
            answers = [f.result() for f in valid]
        health = _health(srv.url)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "simulated" not in r.text  # details stay in the server log
    assert answers == alone  # the streamed one resumed without repeating its text
    assert health["batches"] == 1 and health["max_batch_seen"] == len(VALID) + 1
    assert health["failed_batches"] == 1 and health["retried_alone"] == len(VALID) + 1


def test_prepared_requests_batched_equal_unprepared_alone(tiny_engine):
    """Engine.prepare (other threads, while nothing is shared) + one batch == generate alone."""
    from llavamed_core.infer import ChatRequest, GenerationParams

    def request(i):
        content = [{"type": "text", "text": f"Finding {i}?" + " more" * i}]
        if i % 2 == 0:
            content.insert(0, {"type": "image", "image": random_image(50 + i, size=24 + 8 * i)})
        return ChatRequest([{"role": "user", "content": content}],
                           GenerationParams(max_new_tokens=6, temperature=0.0))

    requests = [request(i) for i in range(4)]
    alone_results = [tiny_engine.generate([r])[0] for r in requests]
    with ThreadPoolExecutor(2) as pool:
        prepared = list(pool.map(tiny_engine.prepare, requests))
    for r, p in zip(requests, prepared):
        r.prepared = p
    batched = tiny_engine.generate(requests, batch_size=4)
    assert [(b.text, b.prompt_tokens) for b in batched] == [(a.text, a.prompt_tokens) for a in alone_results]
    assert [len(p.input_ids) for p in prepared] == [tiny_engine.count_tokens(r) for r in requests]


def test_slow_clients_are_cut_off_and_others_are_served(tiny_ckpt, tiny_engine):
    from llavamed_core.serve.config import ServeLimits

    limits = ServeLimits(header_timeout_s=0.5, body_timeout_s=0.5)
    with ThreadServer(_config(tiny_ckpt, limits=limits), engine_loader=lambda: tiny_engine) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)

        def slow_headers() -> bytes:
            with socket.create_connection((host, int(port)), timeout=60) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                return s.recv(65536)  # b"": the server closed the connection

        def slow_body() -> bytes:
            with socket.create_connection((host, int(port)), timeout=60) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data

        with ThreadPoolExecutor(3) as pool:
            heads, body = pool.submit(slow_headers), pool.submit(slow_body)
            ok = pool.submit(_ask, srv.url, VALID[0])
            assert heads.result() == b""
            reply = body.result().decode()
            assert ok.result()[0] == 200
        assert reply.startswith("HTTP/1.1 408")
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert "did not arrive within 0.5 s" in reply


def test_host_allowlist_and_web_page_policy(tiny_ckpt, tiny_engine):
    cfg = _config(tiny_ckpt, allow_hosts=["llavamed.internal"])
    with ThreadServer(cfg, engine_loader=lambda: tiny_engine) as srv:
        port = srv.url.rsplit(":", 1)[1]
        ok_hosts = [f"localhost:{port}", f"[::1]:{port}", f"llavamed.internal:{port}", f"10.1.2.3:{port}"]
        for host in ok_hosts:
            assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200, host
        page = httpx.get(srv.url + "/", headers={"Host": "evil.example"})
        assert page.status_code == 403 and page.json()["error"]["code"] == "host_not_allowed"
        # The page's own requests (same origin) and local origins are fine; others are not.
        body = _text("hi", temperature=0)
        for origin, status in [(srv.url, 200), (f"http://localhost:{port}", 200),
                               ("http://llavamed.internal", 200), ("http://10.9.9.9:8000", 403)]:
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": origin}, timeout=60)
            assert r.status_code == status, (origin, r.text)
        page = httpx.get(srv.url + "/")
        csp = page.headers["content-security-policy"]
        script = re.search(r"<script>(.*?)</script>", page.text, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}';" in csp and "unsafe-inline" not in csp
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
    # With an API key the key is the defence: any Host is answered (and still checked for the key).
    with ThreadServer(_config(tiny_ckpt, api_key="k"), engine_loader=lambda: tiny_engine) as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k"})
        assert r.status_code == 200
