"""Resumable, retried, verified HTTP downloads (used by ``data download``, ``data extract``, weights).

Hand-written over ``requests`` because no library resumes a body mid-transfer: ``urllib3``'s Retry
and ``huggingface_hub`` restart or resume only whole requests, not a stream a tar reader is consuming.

Two ways to fetch a URL, both built on one retry policy:

- :meth:`HttpClient.download` streams a body to ``<dest>.part`` beside the destination and renames
  it into place only when it is complete (size from ``Content-Length`` or the caller) and verified
  (sha256 when known). A small state file ``<dest>.part.json`` records the URL and the server's
  validator (ETag / Last-Modified), so that a later run, even after the process was killed, resumes
  with an HTTP ``Range`` request; a server that ignores ``Range`` (answers 200) restarts cleanly.
- :meth:`HttpClient.open_stream` returns a read-only file object over a body that survives dropped
  connections: it reconnects with ``Range: bytes=<position>-`` and carries on (discarding the
  already-read prefix when the server ignores ``Range``). ``tarfile.open(fileobj=..., mode="r|gz")``
  reads from it directly, so a tarball never has to touch the disk.

Retry policy: the one in :mod:`llavamed_core.retry` (connection errors, timeouts, 408/409/425/429
and 5xx are retried with exponential backoff and jitter, honouring ``Retry-After``); any other 4xx
(404, 403, ...) is not retried and raises :class:`HttpStatusError`. The attempt counter resets
whenever bytes arrive, so a long download over a flaky link finishes. TLS and DNS failures get one clear message. Proxies come from the usual
environment variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), as ``requests`` reads them.

Progress goes to a :data:`~llavamed_core.progress.ProgressCallback` in bytes (``done``/``total``),
with ``rate`` ("1.80 MB/s") and ``eta`` ("12 s") as display strings in the event's info.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3

from . import __version__
from .errors import NetworkError
from .io import atomic_write_json
from .progress import ProgressCallback, emit
from .retry import Backoff, RetryPolicy, is_transient, retry_after_seconds, retryable_status

__all__ = [
    "HttpConfig",
    "HttpClient",
    "HttpStatusError",
    "DownloadResult",
    "ResumableStream",
    "sha256_file",
]


@dataclass
class HttpConfig:
    """How requests are made and retried.

    Attributes:
        connect_timeout: seconds to wait for a TCP/TLS connection.
        read_timeout: seconds to wait for the next bytes of a response.
        retries: attempts after the first one, per request, while no bytes arrive; a response
            that delivers bytes resets the count.
        backoff: base delay in seconds; attempt ``n`` waits about ``backoff * 2**(n-1)``, with
            jitter (half fixed, half random), capped at ``backoff_max``.
        backoff_max: the longest delay between attempts when the server says nothing.
        retry_after_max: the longest ``Retry-After`` honoured (a longer one is cut to this).
        chunk_size: bytes read from the socket at a time.
        pool_size: connections kept open per host and thread.
        user_agent: the ``User-Agent`` header.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 6
    backoff: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 600.0
    chunk_size: int = 1 << 16
    pool_size: int = 4
    user_agent: str = f"llavamed/{__version__}"

    @property
    def retry_policy(self) -> RetryPolicy:
        """The attempt limit and delays as a :class:`~llavamed_core.retry.RetryPolicy`."""
        return RetryPolicy(self.retries, self.backoff, self.backoff_max, self.retry_after_max)


class HttpStatusError(NetworkError):
    """An HTTP status that is final (404, 403, ...) or that stayed bad after every retry.

    Attributes:
        url: the requested URL.
        status: the HTTP status code.
    """

    def __init__(self, url: str, status: int, reason: str = "", hint: str | None = None):
        text = f"{status} {reason}".strip()
        super().__init__(f"{url}: HTTP {text}", hint)
        self.url = url
        self.status = status


@dataclass
class DownloadResult:
    """What :meth:`HttpClient.download` did.

    Attributes:
        path: the completed file.
        size: its size in bytes.
        sha256: its sha256 (hex).
        downloaded: bytes transferred by this call (less than ``size`` after a resume).
        resumed_from: bytes that were already in the ``.part`` file and were kept (0 if none).
        seconds: wall time of the call.
    """

    path: Path
    size: int
    sha256: str
    downloaded: int
    resumed_from: int
    seconds: float


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20,
                hasher: Any | None = None) -> str:
    """The sha256 (hex) of a file, read in chunks; updates ``hasher`` when one is given."""
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``requests``/``urllib3`` error chain."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None and exc.args and isinstance(exc.args[0], BaseException):
            nxt = exc.args[0]
        if nxt is None and hasattr(exc, "reason") and isinstance(exc.reason, BaseException):
            nxt = exc.reason
        if nxt is None:
            break
        exc = nxt
    return exc


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        nxt = cur.__cause__ or cur.__context__
        if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        if nxt is None and isinstance(getattr(cur, "reason", None), BaseException):
            nxt = cur.reason
        cur = nxt
    return chain


def _is_dns_failure(exc: BaseException) -> bool:
    """A host name that does not resolve (``socket.gaierror``): no network, or a wrong host. Not
    worth retrying: the answer comes back at once and the same."""
    return any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError"
               for e in _error_chain(exc))


def _describe_connection_error(url: str, exc: BaseException) -> tuple[str, str]:
    """A one-line message and a hint for a failed connection."""
    chain = _error_chain(exc)
    if _is_dns_failure(exc):
        host = urllib3.util.parse_url(url).host
        return (f"{url}: cannot resolve host '{host}' (no network, or DNS failure)",
                "check that this machine is online, the URL, and your proxy settings (HTTPS_PROXY, NO_PROXY)")
    if any(isinstance(e, requests.exceptions.ProxyError) for e in chain):
        return (f"{url}: the proxy refused or failed the connection ({_root_cause(exc)})",
                "check HTTPS_PROXY / HTTP_PROXY / NO_PROXY")
    if any(isinstance(e, requests.Timeout) or "Timeout" in type(e).__name__ for e in chain):
        return (f"{url}: timed out ({_root_cause(exc)})",
                "the server is slow or unreachable; rerun later (downloads resume), or raise --timeout")
    return (f"{url}: connection failed ({_root_cause(exc)})",
            "check your network and proxy settings; rerun to resume")


class HttpClient:
    """Makes retried HTTP requests with one ``requests.Session`` per thread.

    Args:
        config: timeouts, retry and backoff settings.
        stop: an event that, once set, makes waits and transfers end promptly with
            :class:`NetworkError` (used when the user interrupts a parallel job).
        rng: random source for the jitter (tests pass a seeded one).
        sleep: waits between attempts (default: a wait on ``stop``, so an interrupt ends it);
            tests pass a recorder.
    """

    def __init__(self, config: HttpConfig | None = None, stop: threading.Event | None = None,
                 rng: random.Random | None = None, sleep: Callable[[float], object] | None = None):
        self.config = config or HttpConfig()
        self.stop = stop or threading.Event()
        self._sleep = sleep
        self.backoff = Backoff(self.config.retry_policy, self._wait, rng)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    # -- sessions -------------------------------------------------------------------------------
    def session(self) -> requests.Session:
        """This thread's session (proxies and CA bundle from the environment, as requests does)."""
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=self.config.pool_size,
                                                    pool_maxsize=self.config.pool_size, max_retries=0)
            sess.mount("http://", adapter)
            sess.mount("https://", adapter)
            # Bytes on disk must be the bytes of the file: no transparent gzip decoding, which
            # would also make Range offsets meaningless.
            sess.headers.update({"User-Agent": self.config.user_agent, "Accept-Encoding": "identity"})
            self._local.session = sess
            with self._lock:
                self._sessions.append(sess)
        return sess

    def close(self) -> None:
        """Close every session this client opened."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- retries --------------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
            self.check_stop()
        elif self.stop.wait(max(0.0, seconds)):
            raise NetworkError("interrupted")

    def check_stop(self) -> None:
        """Raise :class:`NetworkError` when the client was asked to stop."""
        if self.stop.is_set():
            raise NetworkError("interrupted")

    def request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None,
                ok_statuses: frozenset[int] = frozenset({416})) -> requests.Response:
        """Send a request, retrying what is worth retrying; the body is left unread (streamed).

        Args:
            url: the URL.
            method: ``GET`` or ``HEAD``.
            headers: extra request headers.
            ok_statuses: error statuses handed back to the caller instead of raised (416 by
                default, which resume logic handles).

        Returns:
            The response (status < 400 or in ``ok_statuses``); close it when done.

        Raises:
            HttpStatusError: a final 4xx, or a 429/5xx that outlasted the retries.
            NetworkError: connection failures after the retries, or a TLS error.
        """
        attempt = 0
        while True:
            self.check_stop()
            retry_after: float | None = None
            try:
                resp = self.session().request(
                    method, url, headers=headers, stream=True, allow_redirects=True,
                    timeout=(self.config.connect_timeout, self.config.read_timeout))
            except requests.exceptions.SSLError as exc:
                raise NetworkError(f"{url}: TLS error ({_root_cause(exc)})",
                                   "check the URL's scheme and your clock; behind an inspecting "
                                   "proxy set REQUESTS_CA_BUNDLE to its certificate") from None
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if _is_dns_failure(exc):  # offline or a wrong host: say so at once
                    msg, hint = _describe_connection_error(url, exc)
                    raise NetworkError(msg, hint) from None
                failure: BaseException | HttpStatusError = exc
            else:
                if resp.status_code < 400 or resp.status_code in ok_statuses:
                    return resp
                status, reason = resp.status_code, resp.reason or ""
                retry_after = retry_after_seconds(resp.headers, cap=self.config.retry_after_max)
                resp.close()
                if not retryable_status(status):
                    hint = ("the file is not on this server; check --base-url / --mirror"
                            if status in (404, 410) else
                            "the server refused the request; check the URL and any credentials"
                            if status in (401, 403) else None)
                    raise HttpStatusError(url, status, reason, hint)
                failure = HttpStatusError(url, status, reason,
                                          "the server is failing or rate limiting; rerun later (the job resumes)")
            attempt += 1
            if self.backoff.gives_up(attempt):
                if isinstance(failure, HttpStatusError):
                    raise failure
                msg, hint = _describe_connection_error(url, failure)
                raise NetworkError(msg, hint) from None
            self.backoff.wait(attempt, retry_after)

    def give_up_or_wait(self, url: str, attempt: int, exc: BaseException) -> None:
        """After a body failed mid-transfer: raise if out of attempts, else sleep the backoff."""
        if self.backoff.gives_up(attempt):
            msg, hint = _describe_connection_error(url, exc)
            raise NetworkError(msg, hint) from None
        self.backoff.wait(attempt)

    # -- whole-file download ----------------------------------------------------------------------
    def download(self, url: str, dest: str | os.PathLike, size: int | None = None,
                 sha256: str | None = None, progress: ProgressCallback | None = None,
                 task: str | None = None) -> DownloadResult:
        """Download ``url`` to ``dest``: resumable, retried, verified, renamed into place at the end.

        The partial body lives in ``<dest>.part`` with its state in ``<dest>.part.json``; both
        survive a killed process, and the next call resumes with ``Range``.

        Args:
            url: the URL.
            dest: the final path (its folder is created).
            size: the expected size in bytes, when known (checked in addition to Content-Length).
            sha256: the expected sha256 (hex), when known.
            progress: callback receiving byte counts.
            task: the progress task name (default: the file name).

        Returns:
            A :class:`DownloadResult`.

        Raises:
            HttpStatusError: a final HTTP status (404, 403, ...).
            NetworkError: the transfer failed after the retries, or the file did not verify.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        state_path = dest.with_name(dest.name + ".part.json")
        task = task or dest.name
        started = time.monotonic()
        state = _load_state(state_path)
        if state is None or state.get("url") != url or not part.exists():
            _remove(part, state_path)
            state = None
        retried_fresh = False
        while True:
            try:
                return self._download_once(url, dest, part, state_path, state, size, sha256,
                                           progress, task, started)
            except _ChecksumMismatch as exc:
                # Bytes kept from an earlier run may have come from another version of the file:
                # start over once from zero before calling the file bad.
                _remove(part, state_path)
                if exc.resumed and not retried_fresh:
                    retried_fresh = True
                    state = None
                    continue
                raise NetworkError(str(exc), "the server's file differs from the expected one; "
                                   "check --base-url, or rerun to try again") from None

    def _download_once(self, url: str, dest: Path, part: Path, state_path: Path,
                       state: dict | None, size: int | None, sha256: str | None,
                       progress: ProgressCallback | None, task: str,
                       started: float) -> DownloadResult:
        hasher = hashlib.sha256()
        offset = part.stat().st_size if (state is not None and part.exists()) else 0
        if offset:
            sha256_file(part, hasher=hasher)
        resumed_from = offset
        total: int | None = size
        downloaded = 0
        attempt = 0
        rate = _Rate()
        # A run killed between the last byte and the rename left a whole body: just verify it.
        whole = state is not None and offset > 0 and state.get("size") == offset
        if whole:
            total = offset
        while not whole:
            headers: dict[str, str] = {}
            if offset and state is not None:
                headers["Range"] = f"bytes={offset}-"
                validator = state.get("etag") or state.get("last_modified")
                if validator:
                    headers["If-Range"] = validator
            resp = self.request(url, headers=headers)
            try:
                if resp.status_code == 416:
                    # The part is as long as (or longer than) the file, or the file changed.
                    resp.close()
                    _remove(part, state_path)
                    hasher, offset, resumed_from, state = hashlib.sha256(), 0, 0, None
                    attempt += 1
                    if self.backoff.gives_up(attempt):
                        raise NetworkError(f"{url}: the server keeps refusing the byte range",
                                           "delete the .part file and rerun")
                    continue
                if resp.status_code == 206 and offset:
                    start, _end, full = _content_range(resp.headers.get("Content-Range"))
                    if start != offset:
                        resp.close()
                        _remove(part, state_path)
                        hasher, offset, resumed_from, state = hashlib.sha256(), 0, 0, None
                        continue
                    if full is not None:
                        total = full
                else:
                    # 200: a full body; the server ignored Range (or we asked for none).
                    if offset:
                        hasher, offset, resumed_from = hashlib.sha256(), 0, 0
                    length = resp.headers.get("Content-Length")
                    if length is not None and length.isdigit():
                        total = int(length)
                    state = {"url": url, "etag": resp.headers.get("ETag"),
                             "last_modified": resp.headers.get("Last-Modified"), "size": total}
                    atomic_write_json(state_path, state)
                if size is not None and total is not None and total != size:
                    raise NetworkError(f"{url}: the server's file is {total:,} bytes, expected {size:,}",
                                       "check --base-url; the mirror may hold another version")
                mode = "ab" if offset else "wb"
                progressed = False
                try:
                    with open(part, mode) as fh:
                        for chunk in resp.raw.stream(self.config.chunk_size, decode_content=False):
                            self.check_stop()
                            if not chunk:
                                continue
                            fh.write(chunk)
                            hasher.update(chunk)
                            offset += len(chunk)
                            downloaded += len(chunk)
                            progressed = True
                            r = rate.update(downloaded)
                            emit(progress, task, offset, total, "B", rate=f"{r / 1e6:.2f} MB/s",
                                 eta=f"{(total - offset) / r:.0f} s" if (total and r) else "?")
                        fh.flush()
                        os.fsync(fh.fileno())
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    attempt = 0 if progressed else attempt
                    attempt += 1
                    self.give_up_or_wait(url, attempt, exc)
                    continue
            finally:
                resp.close()
            if total is not None and offset != total:
                # The body ended early without an error (no Content-Length enforcement): resume.
                attempt += 1
                self.give_up_or_wait(url, attempt, ConnectionError(
                    f"body ended after {offset:,} of {total:,} bytes"))
                continue
            break
        digest = hasher.hexdigest()
        if sha256 is not None and digest.lower() != sha256.lower():
            raise _ChecksumMismatch(f"{url}: sha256 {digest} does not match the expected {sha256}",
                                    resumed=resumed_from > 0)
        os.replace(part, dest)
        _remove(state_path)
        emit(progress, task, offset, offset, "B", finished=True)
        return DownloadResult(dest, offset, digest, downloaded, resumed_from,
                              time.monotonic() - started)

    # -- streaming ------------------------------------------------------------------------------
    def open_stream(self, url: str, progress: Callable[[int], None] | None = None) -> "ResumableStream":
        """Open ``url`` as a read-only file object that resumes after dropped connections.

        Args:
            url: the URL.
            progress: called with the number of new bytes each time some arrive.

        Raises:
            HttpStatusError: a final HTTP status on the first request.
            NetworkError: the connection could not be made after the retries.
        """
        return ResumableStream(self, url, progress)


class _ChecksumMismatch(Exception):
    def __init__(self, message: str, resumed: bool):
        super().__init__(message)
        self.resumed = resumed


class _Rate:
    """Bytes per second over the whole transfer (smooth enough for a progress line)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def update(self, done: int) -> float:
        dt = time.monotonic() - self.t0
        return done / dt if dt > 0 else 0.0


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    if not value or not value.startswith("bytes "):
        return None, None, None
    try:
        span, _, full = value[6:].partition("/")
        start, _, end = span.partition("-")
        return int(start), int(end), (int(full) if full.isdigit() else None)
    except ValueError:
        return None, None, None


def _load_state(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class ResumableStream:
    """A read-only, forward-only file object over an HTTP body that survives dropped connections.

    When the connection breaks, it asks again with ``Range: bytes=<position>-`` (and ``If-Range``
    so a changed file is not spliced); a 200 answer (Range ignored, or the file changed) is read
    from the start and the bytes already delivered are skipped, so the reader sees one clean,
    continuous body. A changed file (a different ETag) is an error rather than a splice.

    Args:
        client: the :class:`HttpClient` that makes the requests.
        url: the URL.
        progress: called with the number of new bytes each time some arrive.
    """

    def __init__(self, client: HttpClient, url: str, progress: Callable[[int], None] | None = None):
        self.client = client
        self.url = url
        self.position = 0
        self.total: int | None = None
        self.reconnects = 0
        self._progress = progress
        self._etag: str | None = None
        self._resp: requests.Response | None = None
        self._iter: Iterator[bytes] | None = None
        self._buf = b""
        self._eof = False
        self._buf = self._open(0)

    def _open(self, skip_to: int) -> bytes:
        """(Re)connect at ``skip_to``; returns bytes already received past that point, if any."""
        headers = {}
        if skip_to:
            headers["Range"] = f"bytes={skip_to}-"
            if self._etag:
                headers["If-Range"] = self._etag
        resp = self.client.request(self.url, headers=headers, ok_statuses=frozenset())
        etag = resp.headers.get("ETag")
        if skip_to and self._etag and etag and etag != self._etag:
            resp.close()
            raise NetworkError(f"{self.url}: the file changed on the server during the transfer",
                               "rerun to fetch it again")
        self._etag = self._etag or etag
        discard = 0
        if resp.status_code == 206 and skip_to:
            start, _end, full = _content_range(resp.headers.get("Content-Range"))
            if start != skip_to:
                discard = skip_to if start in (None, 0) else -1
                if discard < 0:
                    resp.close()
                    raise NetworkError(f"{self.url}: the server sent bytes from {start}, asked for {skip_to}",
                                       "rerun; if it persists the server's Range support is broken")
            if full is not None:
                self.total = full
        else:
            discard = skip_to
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                self.total = int(length)
        self._resp = resp
        self._iter = resp.raw.stream(self.client.config.chunk_size, decode_content=False)
        while discard > 0:
            chunk = next(self._iter, b"")
            if not chunk:
                raise ConnectionError("body ended while skipping the bytes already read")
            if len(chunk) > discard:
                return chunk[discard:]
            discard -= len(chunk)
        return b""

    def _next_chunk(self) -> bytes:
        attempt = 0
        while True:
            self.client.check_stop()
            try:
                if self._iter is None:
                    leftover = self._open(self.position)
                    if leftover:
                        return leftover
                assert self._iter is not None
                chunk = next(self._iter, b"")
                if chunk:
                    return chunk
                if self.total is not None and self.position < self.total:
                    raise ConnectionError(f"body ended after {self.position:,} of {self.total:,} bytes")
                return b""
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._drop()
                attempt += 1
                self.reconnects += 1
                self.client.give_up_or_wait(self.url, attempt, exc)

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = None
        self._iter = None
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all remaining when ``n`` < 0); ``b""`` at the end."""
        if self._eof:
            return b""
        parts: list[bytes] = []
        have = 0
        while n < 0 or have < n:
            if not self._buf:
                chunk = self._next_chunk()
                if not chunk:
                    self._eof = True
                    break
                self._buf = chunk
            take = self._buf if n < 0 else self._buf[: n - have]
            self._buf = self._buf[len(take):]
            parts.append(take)
            have += len(take)
            self.position += len(take)
            if self._progress is not None:
                self._progress(len(take))
        return b"".join(parts)

    def readable(self) -> bool:  # noqa: D102 - file protocol
        return True

    def close(self) -> None:
        """Close the connection."""
        self._drop()
        self._eof = True

    def __enter__(self) -> "ResumableStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
