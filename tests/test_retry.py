"""The one HTTP retry policy (``llavamed_core.retry``) and the three clients that use it.

Each contract is one test parametrised over the clients, each against a real local server: the
file downloader (``HttpClient`` → ``FileServer``), the LLM client (``LLMClient`` → ``LLMServer``)
and the remote engine, answering whole and streamed (``RemoteEngine`` → ``LLMServer``). The same
statuses are retried; ``Retry-After`` is honoured in seconds and as an HTTP date, and capped; a
refused connection is retried, then fails with one line; a final status fails at once with one line.
Waits are recorded by an injected sleep, never timed. Below: the policy's own pieces.
"""

from __future__ import annotations

import email.utils
import os
import random
import socket
import time

import pytest
from http_fixtures import FileServer
from llm_server import LLMServer, error

from llavamed_core.errors import LlavamedError, LLMError, NetworkError
from llavamed_core.http import HttpClient, HttpConfig
from llavamed_core.infer import ChatRequest, GenerationParams
from llavamed_core.infer.remote import RemoteEngine
from llavamed_core.llm import LLMClient, LLMConfig, LLMRequestFailed
from llavamed_core.retry import RETRY_STATUSES, Backoff, RetryPolicy, is_transient, retry_after_seconds

DATA = os.urandom(5_000)
MSGS = [{"role": "user", "content": "Figure caption:\nalpha figure"}]
BACKOFF = 0.01
CLIENTS = ["download", "llm", "remote", "remote-stream"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    """One client and its server behind the same four calls: ``fail``, ``call``, ``requests``,
    ``sleeps``."""

    def __init__(self, kind: str, tmp_path, retries: int = 3, dead: bool = False):
        self.kind = kind
        self.sleeps: list[float] = []
        self.server = (FileServer() if kind == "download" else LLMServer()).start()
        root = f"http://127.0.0.1:{_free_port()}" if dead else None
        if kind == "download":
            self.server.add("f.bin", DATA)
            self.url = f"{root}/f.bin" if dead else self.server.url("f.bin")
            self.dest = tmp_path / "f.bin"
            self.client = HttpClient(HttpConfig(retries=retries, backoff=BACKOFF), rng=random.Random(0),
                                     sleep=self.sleeps.append)
        elif kind == "llm":
            cfg = LLMConfig(model="m", base_url=f"{root}/v1" if dead else self.server.url, max_retries=retries,
                            backoff=BACKOFF, timeout=5.0, cache_dir=tmp_path / "cache")
            self.client = LLMClient(cfg, environ={"OPENAI_API_KEY": "sk-test"}, sleep=self.sleeps.append)
        else:
            self.client = RemoteEngine(root or self.server.root, "m", retries=retries, backoff=BACKOFF,
                                       timeout=5.0, sleep=self.sleeps.append, rng=random.Random(0))

    def fail(self, status: int, retry_after: str | None = None) -> None:
        """The next request answers ``status`` (faults queue up in order)."""
        if self.kind == "download":
            self.server.fault("f.bin", "status", times=1, status=status, retry_after=retry_after)
        else:
            self.server.script("", error(status, retry_after=retry_after))

    def call(self) -> str:
        """One request through the client; returns the body it got."""
        if self.kind == "download":
            return self.client.download(self.url, self.dest).path.read_bytes().decode("latin-1")
        if self.kind == "llm":
            return self.client.complete(MSGS, refresh=True).text
        req = ChatRequest(MSGS, GenerationParams(max_new_tokens=8))
        if self.kind == "remote":
            return self.client.generate([req])[0].text
        return "".join(self.client.stream(req))

    def requests(self) -> int:
        if self.kind == "download":
            return len(self.server.requests_for("f.bin"))
        return len(self.server.completion_requests())

    def expected(self) -> str:
        return DATA.decode("latin-1") if self.kind == "download" else "It shows alpha figure"

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture
def harness(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    made: list[Harness] = []

    def make(kind: str, **kw) -> Harness:
        made.append(Harness(kind, tmp_path, **kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
@pytest.mark.parametrize("kind", CLIENTS)
def test_every_client_retries_the_same_statuses(harness, kind, status):
    h = harness(kind)
    h.fail(status)
    assert h.expected() in h.call()
    assert h.requests() == 2
    # One wait, from the exponential backoff with equal jitter: between half and all of the base.
    assert len(h.sleeps) == 1 and BACKOFF / 2 <= h.sleeps[0] <= BACKOFF


@pytest.mark.parametrize("kind", CLIENTS)
def test_every_client_honours_retry_after(harness, kind):
    h = harness(kind)
    h.fail(503, retry_after="3")
    h.fail(429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    h.fail(429, retry_after="99999")
    assert h.expected() in h.call()
    assert h.requests() == 4
    seconds, date, capped = h.sleeps
    assert seconds == 3.0
    assert 20 < date <= 30  # an HTTP date: the time left until then (whole seconds)
    assert capped == 600.0  # a longer wait than retry_after_max is cut to it


@pytest.mark.parametrize("status", [400, 401, 403, 404, 501])
@pytest.mark.parametrize("kind", CLIENTS)
def test_every_client_fails_at_once_on_a_final_status(harness, kind, status):
    h = harness(kind)
    h.fail(status)
    with pytest.raises(LlavamedError) as ei:
        h.call()
    assert h.requests() == 1 and h.sleeps == []
    msg = ei.value.message
    assert str(status) in msg and "\n" not in msg and "Traceback" not in msg
    if kind == "llm" and status in (400, 501):
        assert isinstance(ei.value, LLMRequestFailed)  # this request failed; the batch goes on


@pytest.mark.parametrize("kind", CLIENTS)
def test_every_client_retries_a_refused_connection_then_fails_in_one_line(harness, kind):
    h = harness(kind, retries=2, dead=True)
    with pytest.raises(LlavamedError) as ei:
        h.call()
    assert len(h.sleeps) == 2  # two retries after the first attempt, each with a backoff wait
    assert BACKOFF / 2 <= h.sleeps[0] <= BACKOFF and BACKOFF <= h.sleeps[1] <= 2 * BACKOFF
    err = ei.value
    assert "\n" not in err.message
    if kind == "llm":
        assert isinstance(err, LLMRequestFailed) and err.reason == "connection error after 3 attempts"
    else:
        assert isinstance(err, NetworkError) and err.hint
        assert "refused" in err.message.lower() or "connect" in err.message.lower()


def test_retry_statuses():
    assert {408, 409, 425, 429, 500, 502, 503, 504, 507, 520, 599} <= RETRY_STATUSES
    assert not {200, 400, 401, 403, 404, 410, 416, 422, 501, 505} & RETRY_STATUSES


def test_backoff_is_exponential_with_equal_jitter_and_a_cap():
    waits: list[float] = []
    b = Backoff(RetryPolicy(retries=3, backoff=1.0, backoff_max=5.0), waits.append, random.Random(1))
    for n in range(1, 6):
        b.wait(n)
    for n, w in enumerate(waits, 1):
        cap = min(5.0, 2.0 ** (n - 1))
        assert cap / 2 <= w <= cap
    assert not b.gives_up(3) and b.gives_up(4)
    assert b.delay(1, retry_after=7.5) == 7.5 and b.delay(1, retry_after=-3) == 0.0
    assert Backoff(RetryPolicy(retry_after_max=60)).delay(1, retry_after=900) == 60


def test_retry_after_parsing():
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": " 2.5 "}) == 2.5
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    date = email.utils.formatdate(1000.0 + 12, usegmt=True)
    assert retry_after_seconds({"Retry-After": date}, now=1000.0) == pytest.approx(12.0)
    assert retry_after_seconds({"Retry-After": date}, now=2000.0) == 0.0  # already past
    assert retry_after_seconds({"Retry-After": "99999"}) == 600.0
    assert retry_after_seconds({"Retry-After": "99999"}, cap=30) == 30.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_transient_errors():
    import httpx
    import openai
    import requests

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(requests.ConnectionError()) and is_transient(requests.ReadTimeout())
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(openai.APITimeoutError(request=httpx.Request("GET", "http://x")))
    assert not is_transient(ValueError()) and not is_transient(NetworkError("interrupted"))
    assert not is_transient(LLMError("refused"))
