"""The rest of the OpenAI surface of ``llavamed serve``: ``n`` choices, penalties, unsupported and
harmless fields, tool-call history, ``GET /v1/models/{id}``, CORS, and the schema's error table.

Servers are the real uvicorn app on 127.0.0.1 in a thread of the test process sharing one tiny
engine (serve_helpers.ThreadServer); clients are the official ``openai`` package and httpx. Each
shortcut is checked against the straight path: ``n`` choices == ``n`` single requests with seeds
``seed + i``, streamed == plain, harmless fields == without them, penalties through the server ==
the engine called directly.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serve_helpers import (ThreadServer, data_url, hang_up_after_first_text, image_message, png_bytes,
                           random_image, tiny_engine)  # noqa: F401  (tiny_engine is a fixture)

HI = [{"role": "user", "content": "Describe a chest X-ray."}]


def _config(model, **kw):
    from llavamed_core.serve.config import ServeConfig

    return ServeConfig(model=model, port=0, **kw)


@pytest.fixture(scope="module")
def one_at_a_time(tiny_ckpt, tiny_engine):
    """A server generating one request at a time (so sampled answers do not depend on batching)."""
    with ThreadServer(_config(tiny_ckpt, max_batch=1, max_wait_ms=0), engine_loader=lambda: tiny_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def batching(tiny_ckpt, tiny_engine):
    with ThreadServer(_config(tiny_ckpt), engine_loader=lambda: tiny_engine) as srv:
        yield srv


def test_n_choices_equal_single_requests_with_seed_plus_i(one_at_a_time):
    client = one_at_a_time.client()
    kw = dict(model="tiny", messages=image_message(data_url(png_bytes(random_image(3)))), max_tokens=8,
              temperature=1.0)
    res = client.chat.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in res.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(seed=5 + i, **kw) for i in range(3)]
    assert [c.message.content for c in res.choices] == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in res.choices] == [s.choices[0].finish_reason for s in singles]
    assert len({c.message.content for c in res.choices}) > 1  # different seeds, different samples
    # Usage as OpenAI and vLLM report it: the prompt once, every choice's completion tokens.
    assert res.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert res.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_n_choices_streamed_equal_plain(one_at_a_time):
    client = one_at_a_time.client()
    kw = dict(model="tiny", messages=HI, max_tokens=8, temperature=0.9, seed=11, n=2)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    texts, finishes, roles = ["", ""], [None, None], [None, None]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] = roles[choice.index] or choice.delta.role
        if choice.finish_reason:
            assert finishes[choice.index] is None  # one finish per choice
            finishes[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in plain.choices]
    assert finishes == [c.finish_reason for c in plain.choices] and roles == ["assistant", "assistant"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # Without include_usage no usage chunk is sent, and the stream ends with [DONE].
    with httpx.stream("POST", one_at_a_time.url + "/v1/chat/completions", timeout=60,
                      json={**kw, "messages": HI, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["choices"] for e in events[:-1])


def test_n_greedy_choices_all_equal_the_single_answer(batching):
    client = batching.client()
    kw = dict(model="tiny", messages=HI, max_tokens=6, temperature=0)
    single = client.chat.completions.create(**kw).choices[0].message.content
    res = client.chat.completions.create(n=4, **kw)
    assert [c.message.content for c in res.choices] == [single] * 4


def test_n_over_the_cap_is_a_400(tiny_ckpt, tiny_engine):
    from llavamed_core.serve.config import ServeLimits

    with ThreadServer(_config(tiny_ckpt, limits=ServeLimits(max_n=2)), engine_loader=lambda: tiny_engine) as srv:
        with pytest.raises(openai.BadRequestError) as exc:
            srv.client().chat.completions.create(model="tiny", messages=HI, n=3, max_tokens=2)
        assert exc.value.code == "n_too_large" and exc.value.param == "n"
        assert "'n' is 3, over this server's limit of 2" in exc.value.body["message"]
        res = srv.client().chat.completions.create(model="tiny", messages=HI, n=2, max_tokens=2)
        assert len(res.choices) == 2


def test_a_client_that_hangs_up_cancels_every_choice(batching):
    before = httpx.get(batching.url + "/health").json()["cancelled"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "stream": True, "temperature": 0.7, "seed": 1, "n": 3}
    hang_up_after_first_text(batching.url, body)
    deadline = time.monotonic() + 60
    while httpx.get(batching.url + "/health").json()["cancelled"] - before < 3:
        assert time.monotonic() < deadline, "the choices were not cancelled"
        time.sleep(0.05)
    assert httpx.get(batching.url + "/health").json()["queued"] == 0


def test_penalties_reach_the_engine(batching, tiny_engine):
    from llavamed_core.infer import ChatRequest, GenerationParams

    client = batching.client()
    plain = tiny_engine.generate([ChatRequest(HI, GenerationParams(max_new_tokens=12))])[0].text
    # Each penalty alone, at a value that changes this tiny model's greedy answer.
    for name, value in (("frequency_penalty", -2.0), ("presence_penalty", -2.0), ("repetition_penalty", 0.1)):
        res = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0,
                                             extra_body={name: value})
        want = tiny_engine.generate([ChatRequest(HI, GenerationParams(max_new_tokens=12, **{name: value}))])[0]
        assert want.text != plain, name  # so an answer equal to it shows the penalty was applied
        assert res.choices[0].message.content == want.text, name
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(model="tiny", messages=HI, frequency_penalty=2.5)
    assert exc.value.param == "frequency_penalty" and "at most 2" in exc.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(model="tiny", messages=HI, extra_body={"repetition_penalty": 0})
    assert exc.value.param == "repetition_penalty" and "greater than 0" in exc.value.body["message"]


UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "function calling"),
    ("functions", [{"name": "f"}], "function calling"),
    ("tool_choice", "auto", "function calling"),
    ("response_format", {"type": "json_object"}, "structured output"),
    ("logprobs", True, "log probabilities"),
    ("top_logprobs", 2, "log probabilities"),
    ("logit_bias", {"50": 10}, "token biases"),
    ("modalities", ["text", "audio"], "output other than text"),
    ("top_k", 5, "top-k sampling"),
    ("min_p", 0.1, "min-p sampling"),
    ("guided_choice", ["yes", "no"], "guided decoding"),
]


@pytest.mark.parametrize("field,value,what", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_fields_are_a_400_naming_the_field(batching, field, value, what):
    with pytest.raises(openai.BadRequestError) as exc:
        batching.client().chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                                  extra_body={field: value})
    assert exc.value.status_code == 400 and exc.value.code == "unsupported_parameter"
    assert exc.value.param == field
    assert exc.value.body["message"].startswith(f"'{field}' ({what}) is not supported by this server")


def test_harmless_fields_and_tool_history_do_not_change_the_answer(batching):
    client = batching.client()
    kw = dict(model="tiny", max_tokens=8, temperature=0)
    history = [{"role": "user", "content": "Look at this."},
               {"role": "assistant", "content": ""},
               {"role": "user", "content": "Describe a chest X-ray."}]
    plain = client.chat.completions.create(messages=history, **kw).choices[0].message.content
    harmless = dict(user="u-1", store=False, metadata={"study": "x"}, service_tier="auto",
                    parallel_tool_calls=False, tools=[], tool_choice="none", logprobs=False,
                    response_format={"type": "text"}, stream_options=None)
    res = client.chat.completions.create(messages=history, **harmless, **kw)
    assert res.choices[0].message.content == plain
    # An assistant turn that only called a tool has content null: read as empty text.
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    tool_turn = [history[0], {"role": "assistant", "content": None, "tool_calls": calls}, history[2]]
    res = client.chat.completions.create(messages=tool_turn, **kw)
    assert res.choices[0].message.content == plain
    with pytest.raises(openai.UnprocessableEntityError) as exc:  # a user turn still needs content
        client.chat.completions.create(messages=[{"role": "user", "content": None}], **kw)
    assert exc.value.param == "messages[0].content"


def test_models_retrieve(tiny_ckpt, tiny_engine):
    with ThreadServer(_config(tiny_ckpt, served_model_name="org/tiny-med", api_key="k"),
                      engine_loader=lambda: tiny_engine) as srv:
        client = srv.client(api_key="k")
        model = client.models.retrieve("org/tiny-med")
        assert model.id == "org/tiny-med" and model.object == "model" and model.owned_by == "llavamed"
        assert model.model_dump() == client.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as exc:
            client.models.retrieve("gpt-9")
        assert exc.value.code == "model_not_found" and exc.value.param == "model"
        assert "'gpt-9' does not exist" in exc.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.retrieve("org/tiny-med")


APP = "https://app.example.org"


def _preflight(url, origin):
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang"})


def test_no_cors_headers_by_default(batching):
    port = batching.url.rsplit(":", 1)[1]
    local = f"http://localhost:{port}"  # an origin the Host/Origin guard admits
    r = httpx.post(batching.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2},
                   headers={"Origin": local}, timeout=60)
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]
    pre = _preflight(batching.url, local)
    assert pre.status_code == 405 and not [h for h in pre.headers if h.startswith("access-control-")]
    assert _preflight(batching.url, APP).status_code == 403  # a foreign origin: refused outright


def test_cors_origin_allows_that_origin_only(tiny_ckpt, tiny_engine):
    body = {"messages": HI, "max_tokens": 2, "temperature": 0}
    with ThreadServer(_config(tiny_ckpt, cors_origins=[APP]), engine_loader=lambda: tiny_engine) as srv:
        pre = _preflight(srv.url, APP)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == APP
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": APP}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # Another origin: still refused by the Origin guard (no API key), no CORS grant.
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    with ThreadServer(_config(tiny_ckpt, cors_origins=[APP], api_key="k"), engine_loader=lambda: tiny_engine) as srv:
        # With a key the guard is off: a foreign preflight is refused by CORS, as JSON.
        pre = _preflight(srv.url, "https://evil.example")
        assert pre.status_code == 400 and pre.json()["error"]["code"] == "cors_not_allowed"
        assert "access-control-allow-origin" not in pre.headers
        assert _preflight(srv.url, APP).status_code == 200  # no key needed for a preflight
        # The allowed page can read the API's errors (here: no key).
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": APP})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP


# (body, status, code, param, words in the message): the schema's answers, checked without a server.
SCHEMA = [
    ({}, 422, "invalid_type", "messages", "'messages' is missing"),
    ({"messages": {"a": 1}}, 422, "invalid_type", "messages", "'messages' must be a list"),
    ({"messages": ["hi"]}, 422, "invalid_type", "messages[0]", "'messages[0]' must be an object"),
    ({"messages": [{"role": "system", "content": "x"}]}, 422, "no_user_message", "messages", "no user message"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "invalid_type", "messages[0].content",
     "must be a string or a list of parts"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 422, "unsupported_value",
     "messages[0].content[0].type", "must be 'text' or 'image_url', got \"audio\""),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 422, "invalid_type",
     "messages[0].content[0].text", "must be a string, got 3"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]}, 422,
     "invalid_type", "messages[0].content[0].image_url", "'messages[0].content[0].image_url.url' must be"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": "data:x"}]},
                   {"role": "user", "content": "q"}]}, 422, "unsupported_value", "messages[0].content[0]",
     "images are only accepted in user messages"),
    ({"messages": HI, "max_tokens": True}, 422, "invalid_type", "max_tokens", "must be an integer, got true"),
    ({"messages": HI, "max_completion_tokens": 0}, 422, "invalid_value", "max_completion_tokens",
     "must be at least 1, got 0"),
    ({"messages": HI, "top_p": 0}, 422, "invalid_value", "top_p", "must be greater than 0, got 0"),
    ({"messages": HI, "temperature": 2.5}, 422, "invalid_value", "temperature", "must be at most 2, got 2.5"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_value", "stop", "at most 4"),
    ({"messages": HI, "stop": [""]}, 422, "invalid_type", "stop", "non-empty string"),
    ({"messages": HI, "stream": "yes"}, 422, "invalid_type", "stream", "must be true or false"),
    ({"messages": HI, "stream_options": {"include_usage": 1}}, 422, "invalid_type",
     "stream_options.include_usage", "must be true or false"),
    ({"messages": HI, "n": 0}, 422, "invalid_value", "n", "must be at least 1"),
    ({"messages": HI, "seed": -(2 ** 63) - 1}, 422, "invalid_value", "seed", "between -2**63 and 2**64-1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}] * 5}]}, 400,
     "too_many_images", "messages", "5 images, over this server's limit of 4"),
]


@pytest.mark.parametrize("body,status,code,param,words", SCHEMA, ids=[str(i) for i in range(len(SCHEMA))])
def test_schema_errors(body, status, code, param, words):
    from llavamed_core.serve.api_errors import APIError
    from llavamed_core.serve.config import ServeLimits
    from llavamed_core.serve.protocol import parse_chat_request

    with pytest.raises(APIError) as exc:
        parse_chat_request(body, ServeLimits())
    err = exc.value
    assert (err.status, err.code, err.param) == (status, code, param) and words in err.message, err.message


def test_a_parsed_request_keeps_every_field():
    from llavamed_core.serve.config import ServeLimits
    from llavamed_core.serve.protocol import parse_chat_request

    url = data_url(png_bytes(random_image(1)))
    chat = parse_chat_request({
        "model": "tiny", "messages": [{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                   {"type": "text", "text": "What?"}]}],
        "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "stop": "END",
        "seed": -3, "stream": True, "stream_options": {"include_usage": True}, "n": 2,
        "frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.1, "user": "x"}, ServeLimits())
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert [p["type"] for p in chat.messages[1]["content"]] == ["image", "text"]
    assert chat.images[0].url == url and chat.images[0].param == "messages[1].content[0].image_url"
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.stop, chat.seed) == (7, 0.5, 0.9, ["END"], -3)
    assert (chat.stream, chat.include_usage, chat.n) == (True, True, 2)
    assert (chat.frequency_penalty, chat.presence_penalty, chat.repetition_penalty) == (0.5, -1.0, 1.1)
    second = chat.for_choice(1)
    assert (second.seed, second.n) == (-2, 1) and second.images[0] is not chat.images[0]
    assert second.images[0].url == url and chat.for_choice(0).seed == -3
    top = parse_chat_request({"messages": HI, "seed": 2 ** 64 - 1}, ServeLimits()).for_choice(2)
    assert top.seed == 1  # past 2**64-1 the seed wraps around


def test_choices_are_forwarded_to_vllm_as_single_requests(tiny_ckpt):
    """What the ``--engine vllm`` proxy sends for each choice: n=1, seed + i, the penalties as sent."""
    from llavamed_core.serve.choices import split_choices
    from llavamed_core.serve.config import ServeConfig
    from llavamed_core.serve.protocol import parse_chat_request
    from llavamed_core.serve.vllm import VllmBackend

    body = {"model": "tiny", "messages": HI, "n": 3, "seed": 40, "stream": True, "frequency_penalty": 0.5,
            "presence_penalty": -1.0, "repetition_penalty": 1.2, "stream_options": {"include_usage": False}}
    chat = parse_chat_request(body, ServeConfig(model=tiny_ckpt).limits)
    backend = VllmBackend(ServeConfig(model=tiny_ckpt, engine="vllm"))
    sent = [backend._forward_body(sub, sub_body) for sub, sub_body in split_choices(chat, body)]
    assert [(s["n"], s["seed"]) for s in sent] == [(1, 40), (1, 41), (1, 42)]
    assert all((s["frequency_penalty"], s["presence_penalty"], s["repetition_penalty"]) == (0.5, -1.0, 1.2)
               for s in sent)
    assert all(s["stream_options"] == {"include_usage": True} for s in sent)  # usage is summed here
    assert all(s["messages"] == HI for s in sent)


@pytest.mark.slow
def test_n_and_penalties_through_the_vllm_proxy_equal_native(batching, tiny_ckpt, tmp_path):
    """``--engine vllm`` forwards each choice as n=1 with its seed, and the penalties unchanged
    (the stand-in vLLM is ``llavamed serve`` itself, as in test_serve_vllm.py)."""
    from serve_helpers import wait_healthy
    from test_serve_vllm import _fake_vllm, _vllm_config

    vllm, _record = _fake_vllm(tmp_path)
    kw = dict(model="tiny", messages=HI, max_tokens=8, temperature=1.0, seed=7, n=2,
              presence_penalty=-2.0, extra_body={"repetition_penalty": 0.5})
    native = batching.client().chat.completions.create(**kw)
    with ThreadServer(_vllm_config(tiny_ckpt, vllm), wait=False) as srv:
        wait_healthy(srv.url, 120)
        proxied = srv.client().chat.completions.create(**kw)
        streamed = list(srv.client().chat.completions.create(stream=True, **kw))
    assert [c.message.content for c in proxied.choices] == [c.message.content for c in native.choices]
    assert proxied.usage.model_dump() == native.usage.model_dump()
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in native.choices]
