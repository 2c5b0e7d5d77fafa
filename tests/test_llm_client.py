"""The LLM client (`llavamed_core.llm`) against a real OpenAI-compatible server on 127.0.0.1.

Covers: retries on 429 (Retry-After honoured), 5xx, timeouts, dropped connections and malformed
bodies; no retry on 401/403 (and the key never shows); per-request failures on 4xx and exhausted
retries (the policy itself, shared with downloads and the remote engine: tests/test_retry.py); the response cache (hit, refresh, bypass, key covers every parameter); usage and cost;
Azure-style configuration (path, api-version, api-key header); endpoint resolution from the
environment; the rate limiter (with an injected clock); concurrency.
"""

from __future__ import annotations

import time

import pytest
from llm_server import LLMServer, drop, error, malformed, reply, slow

from llavamed_core.errors import ConfigError, LLMError
from llavamed_core.llm import (LLMClient, LLMConfig, LLMRequestFailed, RateLimiter, estimate_tokens,
                               request_key, resolve_endpoint, run_concurrent)

SECRET = "sk-test-SECRET-0123456789abcdef"
MSGS = [{"role": "user", "content": "Figure caption:\nalpha figure"}]


@pytest.fixture(autouse=True)
def _llm_env(monkeypatch, tmp_path):
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY",
              "OPENAI_API_VERSION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LLAVAMED_HOME", str(tmp_path / "home"))


@pytest.fixture
def server():
    with LLMServer() as srv:
        yield srv


def make_client(srv, tmp_path, sleeps=None, **kw) -> LLMClient:
    cfg = LLMConfig(model="m", base_url=srv.url, cache_dir=tmp_path / "cache", timeout=kw.pop("timeout", 5.0),
                    backoff=kw.pop("backoff", 0.01), **kw)
    env = {"OPENAI_API_KEY": SECRET}
    return LLMClient(cfg, environ=env, sleep=(sleeps.append if sleeps is not None else time.sleep))


def test_retry_after_is_honoured_on_429(server, tmp_path):
    sleeps: list[float] = []
    server.script("alpha", error(429, retry_after=7), error(429, retry_after="2.5"))
    with make_client(server, tmp_path, sleeps) as c:
        comp = c.complete(MSGS)
    assert comp.attempts == 3 and "alpha figure" in comp.text
    assert sleeps == [7.0, 2.5]  # the server's waits, not our backoff
    assert c.usage.retries == 2 and c.usage.requests == 1
    assert len(server.completion_requests()) == 3


@pytest.mark.parametrize("fault", [error(500), error(503), slow(1.5), drop(), malformed(),
                                   malformed(b"not json at all"),
                                   malformed(b'{"id": "x", "object": "chat.completion", "choices": []}'),
                                   reply("   ")],
                         ids=["500", "503", "timeout", "dropped", "cut-json", "not-json", "no-choices", "empty"])
def test_transient_faults_are_retried(server, tmp_path, fault):
    sleeps: list[float] = []
    server.script("alpha", fault)
    with make_client(server, tmp_path, sleeps, timeout=0.5) as c:
        comp = c.complete(MSGS)
    assert comp.attempts == 2 and comp.text.startswith("User:")
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.01  # our backoff (base 0.01 s)
    assert c.usage.retries == 1


def test_retries_exhausted_is_a_request_failure(server, tmp_path):
    server.script("alpha", *[error(500)] * 3)
    with make_client(server, tmp_path, [], max_retries=2) as c:
        with pytest.raises(LLMRequestFailed) as ei:
            c.complete(MSGS)
    assert ei.value.attempts == 3 and "HTTP 500 after 3 attempts" in ei.value.reason
    assert ei.value.kind == "HTTP 500"
    assert len(server.completion_requests()) == 3


def test_bad_request_fails_at_once_without_retry(server, tmp_path):
    server.script("alpha", error(400, message="context length exceeded"))
    with make_client(server, tmp_path, []) as c:
        with pytest.raises(LLMRequestFailed, match="HTTP 400: context length exceeded"):
            c.complete(MSGS)
    assert len(server.completion_requests()) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_stop_at_once_and_never_show_the_key(server, tmp_path, status):
    server.script("alpha", error(status, message=f"Incorrect API key provided: {SECRET}"))
    with make_client(server, tmp_path, []) as c:
        with pytest.raises(LLMError) as ei:
            c.complete(MSGS)
    assert not isinstance(ei.value, LLMRequestFailed)
    assert f"HTTP {status}" in ei.value.message and "OPENAI_API_KEY" in ei.value.hint
    assert SECRET not in ei.value.message and SECRET not in repr(c.endpoint)
    assert len(server.completion_requests()) == 1


def test_unknown_model_stops_the_run(server, tmp_path):
    server.script("alpha", error(404, message="The model `m` does not exist"))
    with make_client(server, tmp_path, []) as c:
        with pytest.raises(LLMError, match="model or deployment 'm' not found"):
            c.complete(MSGS)


def test_cache_hit_refresh_and_key(server, tmp_path):
    with make_client(server, tmp_path, []) as c:
        a = c.complete(MSGS)
        b = c.complete(MSGS)
        assert not a.cached and b.cached and b.text == a.text and b.attempts == 0
        assert len(server.completion_requests()) == 1
        c.complete(MSGS, temperature=0.3)  # another parameter: another request
        assert len(server.completion_requests()) == 2
        server.script("alpha", reply("fresh answer"))
        assert c.complete(MSGS, refresh=True).text == "fresh answer"
        assert c.complete(MSGS).text == "fresh answer"  # the refreshed answer replaced the old one
        assert len(server.completion_requests()) == 3
        u = c.usage.snapshot()
    assert u["cache_hits"] == 2 and u["requests"] == 3
    # A new client (a rerun) on the same cache pays nothing.
    with make_client(server, tmp_path, []) as c2:
        assert c2.complete(MSGS).cached
    assert len(server.completion_requests()) == 3
    with make_client(server, tmp_path, [], use_cache=False) as c3:
        assert not c3.complete(MSGS).cached
    assert len(server.completion_requests()) == 4


def test_request_key_covers_model_messages_and_params():
    base = request_key("m", MSGS, {"temperature": 0.7})
    assert base == request_key("m", [dict(MSGS[0])], {"temperature": 0.7})
    assert base != request_key("m2", MSGS, {"temperature": 0.7})
    assert base != request_key("m", MSGS, {"temperature": 0.2})
    assert base != request_key("m", [{"role": "user", "content": "other"}], {"temperature": 0.7})


def test_default_cache_lives_under_llavamed_home(server, tmp_path):
    cfg = LLMConfig(model="m", base_url=server.url)
    with LLMClient(cfg, environ={"LLAVAMED_HOME": str(tmp_path / "h")}) as c:
        c.complete(MSGS)
    assert len(list((tmp_path / "h" / "llm-cache").rglob("*.json"))) == 1


def test_usage_and_cost(server, tmp_path):
    with make_client(server, tmp_path, [], price_in=2.0, price_out=10.0) as c:
        comp = c.complete(MSGS)
        u = c.usage
    # The server reports chars//4 for the prompt and the answer.
    assert comp.prompt_tokens == len(MSGS[0]["content"]) // 4
    assert u.prompt_tokens == comp.prompt_tokens and u.completion_tokens == comp.completion_tokens
    assert u.cost == pytest.approx((comp.prompt_tokens * 2.0 + comp.completion_tokens * 10.0) / 1e6)


def test_azure_configuration_reaches_the_server(server, tmp_path):
    cfg = LLMConfig(model="my-deploy", cache_dir=tmp_path / "c")
    env = {"AZURE_OPENAI_ENDPOINT": server.root, "AZURE_OPENAI_API_KEY": SECRET,
           "OPENAI_API_VERSION": "2024-06-01", "OPENAI_API_KEY": "sk-not-this-one"}
    with LLMClient(cfg, environ=env) as c:
        assert c.endpoint.provider == "azure"
        c.complete(MSGS)
    (req,) = server.completion_requests()
    assert req.path == "/openai/deployments/my-deploy/chat/completions"
    assert req.query == {"api-version": ["2024-06-01"]}
    assert req.headers["api-key"] == SECRET
    assert "sk-not-this-one" not in str(req.headers)
    assert SECRET not in str(c.endpoint.describe())


def test_openai_style_request_path_and_bearer(server, tmp_path):
    with make_client(server, tmp_path, []) as c:
        c.complete(MSGS, seed=3)
    (req,) = server.completion_requests()
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.body["model"] == "m" and req.body["seed"] == 3 and req.body["messages"] == MSGS


def test_endpoint_resolution_from_environment():
    ep = resolve_endpoint(LLMConfig(model="m"), {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://h:1/v1/"})
    assert (ep.provider, ep.url, ep.key_source) == ("openai", "http://h:1/v1", "OPENAI_API_KEY")
    # A flag beats the environment; a local server needs no key.
    ep = resolve_endpoint(LLMConfig(model="m", base_url="http://x:2/v1"), {"OPENAI_BASE_URL": "http://h:1/v1"})
    assert ep.url == "http://x:2/v1" and ep.api_key == "EMPTY"
    # api.openai.com without a key, Azure without version/key: clear configuration errors.
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        resolve_endpoint(LLMConfig(model="m"), {})
    with pytest.raises(ConfigError, match="API version"):
        resolve_endpoint(LLMConfig(model="d", provider="azure", azure_endpoint="https://a"), {"AZURE_OPENAI_API_KEY": "k"})
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        resolve_endpoint(LLMConfig(model="d", azure_endpoint="https://a", api_version="v"), {})
    # An explicit --base-url wins over an Azure endpoint in the environment.
    ep = resolve_endpoint(LLMConfig(model="m", base_url="http://x:2/v1"),
                          {"AZURE_OPENAI_ENDPOINT": "https://a", "AZURE_OPENAI_API_KEY": "k"})
    assert ep.provider == "openai"
    # Credentials inside a URL are not shown either.
    ep = resolve_endpoint(LLMConfig(model="m", base_url="http://user:pw@h:1/v1"), {})
    assert ep.describe()["url"] == "http://h:1/v1"


def test_timeouts_exhausted_name_their_kind(tmp_path):
    with LLMServer() as srv:
        srv.script("alpha", slow(1.0), slow(1.0))
        with make_client(srv, tmp_path, [], timeout=0.3, max_retries=1) as c:
            with pytest.raises(LLMRequestFailed) as ei:
                c.complete(MSGS)
    assert ei.value.kind == "timeout" and ei.value.reason == "timeout (0.3 s) after 2 attempts"


def test_rate_limiter_rpm_and_tpm_with_injected_clock():
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(rpm=2, tpm=None, clock=lambda: now[0], sleep=sleep)
    rl.acquire()
    now[0] = 10.0
    rl.acquire()
    rl.acquire()  # third in a minute: waits until the first (t=0) leaves the window
    assert slept == [50.0] and now[0] == 60.0

    now[0], slept[:] = 0.0, []
    rl = RateLimiter(rpm=None, tpm=1000, clock=lambda: now[0], sleep=sleep)
    h = rl.acquire(800)
    rl.settle(h, 300)  # the real count was smaller: room for 700 more
    rl.acquire(600)
    assert slept == []
    rl.acquire(500)  # 900 used; needs the first (300) to leave the window
    assert slept == [60.0]
    # A request bigger than the whole budget still goes, alone in an empty window.
    now[0] += 120
    rl.acquire(5000)
    assert slept == [60.0]


def test_concurrency_keeps_requests_in_flight(tmp_path):
    with LLMServer(latency=0.3) as srv:
        with make_client(srv, tmp_path, [], concurrency=4) as c:
            items = [f"item {i}" for i in range(8)]
            results = dict(run_concurrent(
                lambda s: c.complete([{"role": "user", "content": s}]), items, 4))
        assert sorted(results) == items
        assert 1 < srv.max_in_flight <= 4


def test_consecutive_failures_stop_the_run():
    def always_fail(i):
        raise LLMRequestFailed("HTTP 503 after 1 attempt", 1)

    with pytest.raises(LLMError, match="3 requests in a row failed"):
        list(run_concurrent(always_fail, range(10), 2, max_consecutive_failures=3))


def test_estimate_and_config_checks():
    assert estimate_tokens(MSGS, 100) == len(MSGS[0]["content"]) // 4 + 100
    for bad in (dict(concurrency=0), dict(rpm=0), dict(timeout=0), dict(price_in=-1), dict(provider="x")):
        with pytest.raises(ConfigError):
            LLMConfig(model="m", **bad).check()
