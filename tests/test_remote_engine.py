"""The remote engine (``llavamed_core.infer.remote.RemoteEngine``, on the ``openai`` package) against a
real OpenAI-compatible server on 127.0.0.1 (``tests/llm_server.py``).

Covers: many requests in flight give the answers of one request at a time, in order; streamed
answers (``generate`` with ``on_delta``, ``stream``) equal the whole ones, usage included; what goes
over the wire (parameters, the image as a PNG data URL, the API key); ``connect`` picking the
server's model; cancelling a streamed answer; bodies that are not completions and a refused request
in a batch as one-line errors. Against ``llavamed serve`` itself: tests/test_chat_server.py; the
retry policy: tests/test_retry.py.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from llm_server import LLMServer, error, malformed
from PIL import Image

from llavamed_core.errors import LLMError
from llavamed_core.infer import ChatRequest, GenerationParams
from llavamed_core.infer.remote import RemoteEngine

KEY = "remote-test-key"


def _req(text: str, **params) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], GenerationParams(**params))


@pytest.fixture
def server():
    with LLMServer(latency=0.05) as srv:
        yield srv


def test_concurrent_and_streamed_answers_equal_one_at_a_time(server):
    reqs = [_req(f"Figure caption:\nfigure number {i}", max_new_tokens=16) for i in range(10)]
    with RemoteEngine.connect(server.root, api_key=KEY, concurrency=4) as engine:
        one_by_one = [engine.generate([r])[0] for r in reqs]
        seen: list[int] = []
        together = engine.generate(reqs, on_result=lambda i, res: seen.append(i))
        deltas: dict[int, list[str]] = {}
        streamed = engine.generate(reqs, on_delta=lambda i, d: deltas.setdefault(i, []).append(d))
        alone = ["".join(engine.stream(r)) for r in reqs[:3]]
    assert together == one_by_one and sorted(seen) == list(range(10))
    assert 1 < server.max_in_flight <= 4
    assert [r.text for r in streamed] == [r.text for r in one_by_one]
    assert [(r.prompt_tokens, r.completion_tokens) for r in streamed] == \
        [(r.prompt_tokens, r.completion_tokens) for r in one_by_one]
    assert all(r.finish_reason == "stop" and f"figure number {i}" in r.text for i, r in enumerate(streamed))
    assert {i: "".join(d) for i, d in deltas.items()} == {i: r.text for i, r in enumerate(streamed)}
    assert alone == [r.text for r in one_by_one[:3]]


def test_what_goes_over_the_wire(server):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8"))
    req = ChatRequest([{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": "What is shown?"}]}],
                      GenerationParams(max_new_tokens=7, temperature=0.3, top_p=0.9, stop=["###"], seed=5))
    with RemoteEngine(server.root, "my-model", api_key=KEY) as engine:
        engine.generate([req])
        "".join(engine.stream(req))
    whole, streamed = server.completion_requests()
    assert whole.path == "/v1/chat/completions" and whole.headers["authorization"] == f"Bearer {KEY}"
    body = whole.body
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == \
        ("my-model", 7, 0.3, 0.9, ["###"], 5)
    assert body["stream"] is False and streamed.body["stream"] is True
    assert streamed.body["stream_options"] == {"include_usage": True}
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "What is shown?"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and np.array_equal(np.asarray(sent), np.asarray(image))


def test_connect_takes_the_servers_model_unless_named(server):
    with RemoteEngine.connect(server.root + "/v1/") as engine:
        assert engine.model_name == "scripted" and engine.base_url == server.url
        engine.generate([_req("hello")])
    assert server.completion_requests()[-1].body["model"] == "scripted"
    with RemoteEngine.connect(server.url, model_name="named"):
        pass
    assert [r.path for r in server.requests if r.method == "GET"] == ["/v1/models"]


def test_cancelling_a_streamed_answer(server):
    with RemoteEngine(server.root, "m") as engine:
        (res,) = engine.generate([_req("hello")], should_stop=lambda i: True)
    assert res.finish_reason == "cancelled" and res.text == ""


@pytest.mark.parametrize("body, words", [(b"not json at all", "not JSON"),
                                         (b'{"id": "x", "choices": [{"mess', "not JSON"),
                                         (b'{"id": "x", "object": "chat.completion", "choices": []}',
                                          "unexpected answer")])
def test_a_body_that_is_not_a_completion_is_a_one_line_error(server, body, words):
    server.script("", malformed(body))
    with RemoteEngine(server.root, "m", sleep=lambda s: pytest.fail("no retry expected")) as engine:
        with pytest.raises(LLMError) as ei:
            engine.generate([_req("hello")])
    assert words in ei.value.message and "\n" not in ei.value.message
    assert len(server.completion_requests()) == 1


def test_a_refused_request_stops_the_batch(server):
    server.script("item 5", error(400, message="the image is too large\nmore detail"))
    with RemoteEngine(server.root, "m", concurrency=2) as engine:
        with pytest.raises(LLMError) as ei:
            engine.generate([_req(f"item {i}") for i in range(40)])
    assert ei.value.message.endswith("HTTP 400: the image is too large")
    assert len(server.completion_requests()) < 40  # the rest was not sent
