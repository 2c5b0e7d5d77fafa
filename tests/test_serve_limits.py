"""Server behaviour that needs particular settings: loading (503), auth off, limits (413/400/422),
a full queue (429), client disconnects, and the remote-image policy.

Each test runs the real uvicorn app in a thread on a free port with its own ``ServeConfig``; they
share one tiny engine loaded in this process, so a server starts in milliseconds.
"""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import (ThreadServer, data_url, hang_up_after_first_text, image_message, png_bytes,
                           random_image, tiny_engine, wait_healthy)  # noqa: F401  (tiny_engine is a fixture)


def _config(model, **kw):
    from llavamed_core.serve.config import ServeConfig

    return ServeConfig(model=model, port=0, **kw)


def _post(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60, **kw)


def test_health_is_503_until_the_model_is_loaded(tiny_ckpt, tiny_engine):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_engine

    with ThreadServer(_config(tiny_ckpt), engine_loader=slow_loader, wait=False) as srv:
        for _ in range(100):  # wait for uvicorn to accept connections
            try:
                health = httpx.get(srv.url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = _post(srv.url, {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"]
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "tiny"
        release.set()
        wait_healthy(srv.url, 30)
        r = _post(srv.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200


def test_a_failed_load_stops_the_server_with_the_error(tiny_ckpt):
    from llavamed_core.errors import ModelError

    def broken_loader():
        raise ModelError("weights are corrupt", "rebuild the checkpoint")

    srv = ThreadServer(_config(tiny_ckpt), engine_loader=broken_loader, wait=False)
    with srv:
        srv._thread.join(20)
        assert not srv._thread.is_alive()
    assert isinstance(srv.error, ModelError) and "corrupt" in srv.error.message


def test_auth_off_accepts_any_or_no_key(tiny_ckpt, tiny_engine):
    with ThreadServer(_config(tiny_ckpt), engine_loader=lambda: tiny_engine) as srv:
        res = srv.client(api_key="anything").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert res.choices[0].message.content is not None
        assert _post(srv.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code == 200


def test_request_limits(tiny_ckpt, tiny_engine):
    from llavamed_core.serve.config import ServeLimits

    limits = ServeLimits(max_body_bytes=100_000, max_image_pixels=48 * 48, max_image_bytes=20_000,
                         max_images=1, max_tokens=16)
    with ThreadServer(_config(tiny_ckpt, limits=limits), engine_loader=lambda: tiny_engine) as srv:
        client = srv.client()
        small = data_url(png_bytes(random_image(1)))
        # Body over the cap → 413, whether declared (Content-Length) or not.
        big = "x" * 150_000
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": big}])
        assert exc.value.status_code == 413 and exc.value.code == "request_too_large"

        def chunked():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"y" * 10_000
            yield b'"}]}'

        r = httpx.post(srv.url + "/v1/chat/completions", content=chunked(), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        # Too many images → 400.
        two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}},
                                            {"type": "image_url", "image_url": {"url": small}},
                                            {"type": "text", "text": "compare"}]}]
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=two)
        assert exc.value.code == "too_many_images" and "limit of 1 per request" in exc.value.body["message"]
        # Too many pixels (checked from the header) → 400.
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=image_message(
                data_url(png_bytes(random_image(2, size=64)))))
        assert exc.value.code == "image_too_large" and "64x64 = 4,096 pixels" in exc.value.body["message"]
        # Too many encoded bytes → 400.
        from PIL import Image

        noisy = png_bytes(random_image(3, size=40).resize((40, 40), Image.NEAREST))
        padded = noisy + b"\0" * 25_000  # trailing garbage makes the file big, not the image
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=image_message(data_url(padded)))
        assert exc.value.code == "image_too_large" and "20,000" in exc.value.body["message"]
        # max_tokens over the cap → 422; within it → fine, and the default is the cap.
        with pytest.raises(openai.UnprocessableEntityError) as exc:
            client.chat.completions.create(model="tiny", messages=image_message(small), max_tokens=17)
        assert exc.value.code == "max_tokens_too_large"
        res = client.chat.completions.create(model="tiny", messages=image_message(small), temperature=0)
        assert res.usage.completion_tokens <= 16


class _Batch:
    """A running batch of the real engine, with hooks around its decode steps."""

    def __init__(self, batch, before_step=None, on_finished=None):
        self.batch = batch
        self.before_step = before_step or (lambda: None)
        self.on_finished = on_finished or (lambda finished: None)

    def __getattr__(self, name):  # rows, can_admit, clear: the real batch's
        return getattr(self.batch, name)

    def admit(self, items):
        finished = self.batch.admit(items)
        self.on_finished(finished)
        return finished

    def step(self):
        self.before_step()
        finished = self.batch.step()
        self.on_finished(finished)
        return finished


class _GatedEngine:
    """The real engine behind a gate: decoding waits until the test opens it."""

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.context_length = engine.context_length

    def __getattr__(self, name):  # prepare, processor, tokenizer: the real engine's
        return getattr(self.engine, name)

    def running_batch(self, *args, **kw):
        return _Batch(self.engine.running_batch(*args, **kw), before_step=lambda: self.gate.wait(60))

    def generate(self, requests, **kw):
        self.gate.wait(60)
        return self.engine.generate(requests, **kw)


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_full_queue_answers_429_and_the_rest_succeed(tiny_ckpt, tiny_engine):
    from llavamed_core.serve.config import ServeLimits

    gated = _GatedEngine(tiny_engine)
    cfg = _config(tiny_ckpt, max_batch=1, max_wait_ms=0, limits=ServeLimits(max_queue=1))
    with ThreadServer(cfg, engine_loader=lambda: gated) as srv:
        health = lambda: httpx.get(srv.url + "/health").json()  # noqa: E731
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        with ThreadPoolExecutorContext() as pool:
            first = pool.submit(_post, srv.url, body)
            _wait_for(lambda: health()["batches"] == 1)      # running (held at the gate)
            second = pool.submit(_post, srv.url, body)
            _wait_for(lambda: health()["queued"] == 1)       # waiting in the queue
            third = _post(srv.url, body)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"] == "1"
            gated.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
            assert first.result().json()["choices"][0]["message"] == second.result().json()["choices"][0]["message"]


class ThreadPoolExecutorContext:
    """A small thread pool that is shut down when the block ends."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(4)
        return self.pool

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)


class _RecordingEngine:
    """The real engine, recording the finish reasons it returns."""

    def __init__(self, engine):
        self.engine = engine
        self.context_length = engine.context_length
        self.finishes: list[str] = []

    def __getattr__(self, name):  # prepare, processor, tokenizer: the real engine's
        return getattr(self.engine, name)

    def running_batch(self, *args, **kw):
        def record(finished):
            self.finishes += [res.finish_reason for _key, res in finished]

        return _Batch(self.engine.running_batch(*args, **kw), on_finished=record)

    def generate(self, requests, **kw):
        results = self.engine.generate(requests, **kw)
        self.finishes += [r.finish_reason for r in results]
        return results


def test_client_disconnect_frees_its_slot(tiny_ckpt, tiny_engine):
    rec = _RecordingEngine(tiny_engine)
    with ThreadServer(_config(tiny_ckpt), engine_loader=lambda: rec) as srv:
        # Long answer (up to the context length); hang up after the first content chunk.
        body = {"messages": [{"role": "user", "content": "Tell me a very long story."}],
                "stream": True, "temperature": 0.7, "seed": 1}
        hang_up_after_first_text(srv.url, body)
        _wait_for(lambda: rec.finishes, 60)
        assert rec.finishes == ["cancelled"]
        assert httpx.get(srv.url + "/health").json()["cancelled"] == 1
        # The server goes on answering.
        ok = _post(srv.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert ok.status_code == 200


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves /scan.png, /big.png (over the cap), /moved (redirect to another host), else 404."""

    png = b""

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/scan.png":
            self._send(200, self.png, "image/png")
        elif self.path == "/big.png":
            self._send(200, self.png + b"\0" * 300_000, "image/png")
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/scan.png")
            self.end_headers()
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, code, data, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        return


@pytest.fixture
def image_host():
    _ImageHandler.png = png_bytes(random_image(21))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_images_follow_the_policy(tiny_ckpt, tiny_engine, image_host):
    from llavamed_core.serve.config import RemoteImagePolicy, ServeLimits

    policy = RemoteImagePolicy(allow=True, allowed_domains=["127.0.0.1"], timeout_s=5)
    cfg = _config(tiny_ckpt, remote_images=policy, limits=ServeLimits(max_image_bytes=200_000))
    with ThreadServer(cfg, engine_loader=lambda: tiny_engine) as srv:
        client = srv.client()
        remote = client.chat.completions.create(model="tiny", messages=image_message(image_host + "/scan.png"),
                                                max_tokens=6, temperature=0)
        inline = client.chat.completions.create(
            model="tiny", messages=image_message(data_url(_ImageHandler.png)), max_tokens=6, temperature=0)
        assert remote.choices[0].message.content == inline.choices[0].message.content
        cases = [("/missing.png", "remote_image_failed", "HTTP 404"),
                 ("/big.png", "image_too_large", "over this server's limit of 200,000"),
                 ("/moved", "remote_image_not_allowed", "host 'localhost' is not in this server's allowed")]
        for path, code, words in cases:
            with pytest.raises(openai.BadRequestError) as exc:
                client.chat.completions.create(model="tiny", messages=image_message(image_host + path))
            assert exc.value.code == code and words in exc.value.body["message"], path
        port = image_host.rsplit(":", 1)[1]
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=image_message(f"http://localhost:{port}/scan.png"))
        assert exc.value.code == "remote_image_not_allowed"


def test_remote_images_need_an_allowlist():
    from llavamed_core.errors import ConfigError
    from llavamed_core.serve.config import RemoteImagePolicy

    with pytest.raises(ConfigError, match="--allowed-domains"):
        RemoteImagePolicy(allow=True).validate()
    p = RemoteImagePolicy(allow=True, allowed_domains=["nih.gov"])
    assert p.host_allowed("www.ncbi.nlm.nih.gov") and p.host_allowed("NIH.GOV")
    assert not p.host_allowed("nih.gov.evil.com") and not p.host_allowed("evilnih.gov")
