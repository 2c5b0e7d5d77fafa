"""``llavamed serve`` end to end: the real command on a free port, the official ``openai`` client.

One server (the real ``llavamed serve`` subprocess, tiny checkpoint, API key from
``LLAVAMED_API_KEY``, ``--log-requests``) answers plain and streamed image chats, text-only chats,
every kind of malformed request with its status and message, 32 concurrent requests exactly as
one at a time, and ``llavamed chat --server``.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import (data_url, image_message, png_bytes, random_image, start_cli_server,
                           tiny_engine)  # noqa: F401  (tiny_engine is a fixture)

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = start_cli_server(["--model", str(tiny_ckpt), "--max-batch", "32", "--max-wait-ms", "50",
                            "--log-requests"], log, env={"LLAVAMED_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _image_url(seed: int = 0) -> str:
    return data_url(png_bytes(random_image(seed)))


def test_plain_image_chat_matches_the_engine(client, tiny_engine):
    from llavamed_core.infer import ChatRequest, GenerationParams

    res = client.chat.completions.create(model="tiny", messages=image_message(_image_url(1)),
                                         max_tokens=12, temperature=0)
    assert res.object == "chat.completion" and res.model == "tiny" and res.id.startswith("chatcmpl-")
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # The same request in-process gives the same greedy answer: the image reached the model intact.
    msgs = [{"role": "user", "content": [{"type": "image", "image": random_image(1)},
                                         {"type": "text", "text": "What does the image show?"}]}]
    want = tiny_engine.generate([ChatRequest(msgs, GenerationParams(max_new_tokens=12))])[0]
    assert choice.message.content == want.text
    assert res.usage.prompt_tokens == want.prompt_tokens > 16  # 16 image tokens + text
    assert res.usage.completion_tokens == want.completion_tokens
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_streamed_image_chat_equals_plain(client, server):
    kw = dict(model="tiny", messages=image_message(_image_url(2)), max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # On the wire: SSE "data:" events ending with [DONE].
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={**kw, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == plain.choices[0].finish_reason


def test_text_only_chat_with_history_and_stop(client):
    msgs = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "text", "text": "Describe a chest X-ray."}]}]
    res = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, seed=3)
    assert isinstance(res.choices[0].message.content, str)
    assert 1 <= res.usage.completion_tokens <= 10
    first = res.choices[0].message.content
    if len(first) > 3:  # a stop string cuts the answer where it starts
        stopped = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10,
                                                 temperature=0, stop=[first[2:4]])
        assert stopped.choices[0].message.content == first[:first.index(first[2:4])].strip()
        assert stopped.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server.url + "/health")  # no key needed for health checks
    assert health.status_code == 200 and health.json()["status"] == "ok"
    raw = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["data"][0]["max_model_len"] == 512


def test_auth_is_required_and_checked(server):
    for key, message in (("wrong-key", "incorrect API key"),):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
        assert message in exc.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "missing API key" in r.json()["error"]["message"]


def _huge_png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("L", (5000, 5000)))  # 25 M pixels in ~25 kB


def _truncated_png() -> bytes:
    data = png_bytes(random_image(5, size=64))
    return data[: len(data) // 2]


MALFORMED = [
    # (name, request body, status, code, words in the message)
    ("bad base64", {"messages": image_message("data:image/png;base64,@@not*base64@@")}, 400,
     "invalid_base64", "not valid base64"),
    ("not an image", {"messages": image_message(data_url(b"just some text, not pixels"))}, 400,
     "invalid_image", "not an image"),
    ("truncated image", {"messages": image_message(data_url(_truncated_png()))}, 400,
     "invalid_image", "could not be decoded"),
    ("huge image", {"messages": image_message(data_url(_huge_png()))}, 400, "image_too_large",
     "5000x5000 = 25,000,000 pixels"),
    ("text media type", {"messages": image_message("data:text/plain;base64,aGVsbG8=")}, 400,
     "invalid_image", "not an image"),
    ("remote url refused", {"messages": image_message("https://example.org/x.png")}, 400,
     "remote_image_not_allowed", "does not fetch remote image URLs"),
    ("empty messages", {"messages": []}, 422, "empty_messages", "'messages' is empty"),
    ("missing messages", {}, 422, "invalid_type", "'messages' is missing"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found", "'gpt-9' does not exist"),
    ("n over the cap", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n_too_large",
     "'n' is 9, over this server's limit of 8"),
    ("temperature type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     422, "invalid_type", "'temperature' must be a number"),
    ("bad role", {"messages": [{"role": "tool", "content": "hi"}]}, 422, "invalid_value",
     "messages[0].role"),
    ("max_tokens over cap", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     422, "max_tokens_too_large", "over this server's limit of 2048"),
]


@pytest.mark.parametrize("name,body,status,code,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors(server, name, body, status, code, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **body} if "model" not in body
                   else body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and words in err["message"]
    assert "Traceback" not in r.text


def test_malformed_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=image_message("data:image/png;base64,%%%"))
    assert exc.value.code == "invalid_base64" and exc.value.param == "messages[0].content[0].image_url"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_invalid_json_body(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_32_concurrent_requests_equal_one_at_a_time(client, server):
    reqs = [dict(model="tiny", messages=image_message(_image_url(100 + i), f"Question number {i}?"),
                 max_tokens=6, temperature=0) for i in range(32)]

    def ask(kw):
        return client.chat.completions.create(**kw).choices[0].message.content

    before = httpx.get(server.url + "/health").json()
    alone = [ask(kw) for kw in reqs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, reqs))
    assert together == alone
    after = httpx.get(server.url + "/health").json()
    assert after["requests"] - before["requests"] == 64
    # The concurrent half ran in far fewer batches than requests (micro-batching happened).
    assert after["batches"] - before["batches"] < 32 + 16 and after["max_batch_seen"] > 1


def test_one_log_line_per_request_without_secrets_or_image_data(client, server):
    url = _image_url(7)
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=image_message(url),
                                                           max_tokens=4, temperature=0)
    rid = raw.headers["x-request-id"]
    res = raw.parse()
    deadline = time.monotonic() + 30  # the line is written once the response has been sent
    while f"{rid} POST /v1/chat/completions 200" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    lines = [line for line in log.splitlines() if rid in line]
    done = [line for line in lines if "POST /v1/chat/completions 200" in line]
    assert len(done) == 1
    assert f"prompt_tokens={res.usage.prompt_tokens}" in done[0]
    assert f"completion_tokens={res.usage.completion_tokens}" in done[0]
    assert re.search(r"latency_ms=\d+", done[0])
    body = [line for line in lines if " body " in line]  # --log-requests
    assert len(body) == 1 and "base64 chars>" in body[0] and url[40:80] not in body[0]
    assert KEY not in log and url[30:90] not in log


def test_web_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "LLaVA-Med chat" in page and 'id="image-input"' in page and "/v1/chat/completions" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # works offline: nothing external


def test_chat_command_against_the_server(cli, server, tiny_ckpt, tmp_path):
    img = tmp_path / "scan.png"
    random_image(11).save(img)
    args = [str(img), "--prompt", "Is there an abnormality?", "--temperature", "0",
            "--max-new-tokens", "8", "--json"]
    remote = cli("chat", *args, "--server", server.url, "--api-key", KEY)
    assert remote.exit_code == 0, remote
    local = cli("chat", *args, "--model", str(tiny_ckpt))
    assert local.exit_code == 0, local
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]
    refused = cli("chat", *args, "--server", server.url, "--api-key", "wrong")
    assert refused.exit_code == 1 and "401" in refused.stderr and "Error:" in refused.stderr
