"""The shared HTTP layer (``llavamed_core.http``) against a real local server with scripted faults.

Covers: resume with Range after a dropped body, a server that ignores Range, a file that changed
between runs (If-Range), 500-then-OK, 429 with Retry-After, no retry on 404/403, read timeouts,
sha256 verification, TLS and DNS failures, proxies from the environment, and the streaming reader
that ``data extract`` feeds to ``tarfile``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest

from http_fixtures import FileServer
from llavamed_core.errors import NetworkError
from llavamed_core.http import HttpClient, HttpConfig, HttpStatusError


class RecordingStop(threading.Event):
    """A stop event that records the waits the client asks for and returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:  # noqa: D102 - Event API
        self.waits.append(timeout or 0.0)
        return self.is_set()


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def client(**kw) -> tuple[HttpClient, RecordingStop]:
    stop = RecordingStop()
    cfg = HttpConfig(**{"backoff": 0.5, "retries": 3, **kw})
    return HttpClient(cfg, stop=stop, rng=random.Random(0)), stop


DATA = os.urandom(200_000)
SHA = hashlib.sha256(DATA).hexdigest()


def test_download_resumes_with_range_after_a_dropped_body(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "drop", after_bytes=70_000)
    c, stop = client()
    res = c.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert res.sha256 == SHA and res.size == len(DATA)
    gets = server.requests_for("f.bin")
    assert [g.range for g in gets] == [None, "bytes=70000-"]
    assert [g.status for g in gets] == [200, 206]
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no .part / .part.json left


def test_download_resumes_a_part_left_by_an_earlier_process(server, tmp_path):
    server.add("f.bin", DATA)
    # What a killed run leaves: the bytes so far and the state naming URL and validator.
    server.fault("f.bin", "drop", after_bytes=50_000)
    c, _ = client(retries=0)
    with pytest.raises(NetworkError):
        c.download(server.url("f.bin"), tmp_path / "f.bin")
    assert (tmp_path / "f.bin.part").stat().st_size == 50_000
    state = json.loads((tmp_path / "f.bin.part.json").read_text())
    assert state["url"] == server.url("f.bin") and state["etag"]
    c2, _ = client()
    res = c2.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert res.resumed_from == 50_000 and res.downloaded == len(DATA) - 50_000
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.requests_for("f.bin")[-1].range == "bytes=50000-"


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "drop", after_bytes=60_000)
    server.fault("f.bin", "ignore_range", times=None)
    c, _ = client()
    res = c.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert res.resumed_from == 0
    assert [g.status for g in server.requests_for("f.bin")] == [200, 200]


def test_changed_file_is_not_spliced_onto_an_old_part(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "drop", after_bytes=80_000)
    c, _ = client(retries=0)
    with pytest.raises(NetworkError):
        c.download(server.url("f.bin"), tmp_path / "f.bin")
    new = os.urandom(150_000)
    server.add("f.bin", new)  # new ETag: the If-Range no longer matches, the server sends it whole
    c2, _ = client()
    res = c2.download(server.url("f.bin"), tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == new and res.resumed_from == 0


def test_500_then_success_retries_with_exponential_backoff(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "status", times=3, status=500)
    c, stop = client(backoff=0.5)
    c.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert [g.status for g in server.requests_for("f.bin")] == [500, 500, 500, 200]
    # Equal jitter: attempt n waits between half and all of backoff * 2**(n-1).
    assert len(stop.waits) == 3
    for n, w in enumerate(stop.waits, 1):
        cap = 0.5 * 2 ** (n - 1)
        assert cap / 2 <= w <= cap


def test_429_honours_retry_after(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "status", times=1, status=429, retry_after="7")
    c, stop = client()
    c.download(server.url("f.bin"), tmp_path / "f.bin")
    assert stop.waits == [7.0]
    assert [g.status for g in server.requests_for("f.bin")] == [429, 200]


def test_persistent_503_gives_up_with_the_status(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "status", times=None, status=503)
    c, stop = client(retries=2)
    with pytest.raises(HttpStatusError) as ei:
        c.download(server.url("f.bin"), tmp_path / "f.bin")
    assert ei.value.status == 503 and "HTTP 503" in ei.value.message
    assert len(server.requests_for("f.bin")) == 3 and len(stop.waits) == 2
    assert not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize("status", [404, 403])
def test_no_retry_on_404_or_403(server, tmp_path, status):
    server.add("f.bin", DATA)
    server.fault("f.bin", "status", times=None, status=status)
    c, stop = client()
    with pytest.raises(HttpStatusError) as ei:
        c.download(server.url("f.bin"), tmp_path / "f.bin")
    assert ei.value.status == status and ei.value.hint
    assert len(server.requests_for("f.bin")) == 1 and stop.waits == []
    assert os.listdir(tmp_path) == []


def test_read_timeout_is_retried(server, tmp_path):
    server.add("f.bin", DATA)
    server.fault("f.bin", "stall", times=1, seconds=1.5)
    c, stop = client(read_timeout=0.3)
    c.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert len(stop.waits) == 1


def test_sha256_mismatch_fails_and_leaves_nothing(server, tmp_path):
    server.add("f.bin", DATA)
    c, _ = client()
    with pytest.raises(NetworkError, match="sha256"):
        c.download(server.url("f.bin"), tmp_path / "f.bin", sha256="0" * 64)
    assert os.listdir(tmp_path) == []


def test_tls_failure_has_a_clear_message(server):
    server.add("f.bin", DATA)
    c, stop = client()
    with pytest.raises(NetworkError) as ei:
        c.open_stream(server.url("f.bin").replace("http://", "https://"))
    assert ei.value.message.startswith("https://127.0.0.1") and "TLS error" in ei.value.message
    assert "REQUESTS_CA_BUNDLE" in ei.value.hint
    assert stop.waits == []  # not retried


def test_dns_failure_has_a_clear_message():
    c, _ = client(retries=1)
    with pytest.raises(NetworkError) as ei:
        c.open_stream("http://no-such-host.invalid/x.tar.gz")
    assert "cannot resolve host 'no-such-host.invalid' (no network, or DNS failure)" in ei.value.message
    assert "proxy" in ei.value.hint


def test_dns_failure_is_not_retried():
    """Offline: the first lookup fails and the error comes at once, without backoff waits."""
    c, stop = client(retries=5)
    with pytest.raises(NetworkError) as ei:
        c.open_stream("http://no-such-host.invalid/x.tar.gz")
    assert "DNS failure" in ei.value.message
    assert stop.waits == []


def test_proxy_is_taken_from_the_environment(monkeypatch, tmp_path):
    # The origin does not exist (a closed port): only the proxy can answer.
    with FileServer() as proxy:
        proxy.add("f.bin", DATA)
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.delenv("no_proxy")
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        c, _ = client(retries=0)
        c.download("http://origin.invalid:9/f.bin", tmp_path / "f.bin", sha256=SHA)
        assert proxy.log[0].path == "f.bin"
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_stream_survives_drops_and_ignored_range(server):
    server.add("f.bin", DATA)
    server.fault("f.bin", "drop", times=2, after_bytes=45_000)
    server.fault("f.bin", "ignore_range", times=None)
    c, _ = client()
    got = bytearray()
    with c.open_stream(server.url("f.bin")) as s:
        while chunk := s.read(10_240):
            got += chunk
        assert s.reconnects == 2
    assert bytes(got) == DATA


def test_stream_resumes_with_range(server):
    server.add("f.bin", DATA)
    server.fault("f.bin", "drop", times=1, after_bytes=33_000)
    c, _ = client()
    with c.open_stream(server.url("f.bin")) as s:
        assert s.read() == DATA
    assert [g.range for g in server.requests_for("f.bin")] == [None, "bytes=33000-"]


def test_stream_404_is_final(server):
    c, stop = client()
    with pytest.raises(HttpStatusError) as ei:
        c.open_stream(server.url("missing.tar.gz"))
    assert ei.value.status == 404 and stop.waits == []


def test_a_whole_part_left_before_the_rename_is_only_verified(server, tmp_path):
    # What a run killed after its last byte but before the rename leaves behind.
    server.add("f.bin", DATA)
    (tmp_path / "f.bin.part").write_bytes(DATA)
    (tmp_path / "f.bin.part.json").write_text(json.dumps(
        {"url": server.url("f.bin"), "etag": None, "last_modified": None, "size": len(DATA)}))
    c, _ = client()
    res = c.download(server.url("f.bin"), tmp_path / "f.bin", sha256=SHA)
    assert res.downloaded == 0 and res.resumed_from == len(DATA)
    assert (tmp_path / "f.bin").read_bytes() == DATA and server.log == []
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
