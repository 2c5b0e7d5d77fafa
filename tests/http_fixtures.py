"""A real HTTP file server for download tests and benchmarks, with scriptable faults.

:class:`FileServer` is a threaded ``http.server`` on 127.0.0.1 (a free port) that serves bytes
held in memory, with ``Range``/``If-Range``, ``ETag``, ``HEAD`` and keep-alive, and with faults a
test scripts per path:

- ``status``: answer an HTTP status (e.g. 404 for good, or 500 the first time then succeed), with
  an optional ``Retry-After`` header (429);
- ``drop``: send the headers and part of the body, then cut the connection;
- ``stall``: wait before answering (to trip the client's read timeout);
- ``ignore_range``: answer 200 with the whole body even when ``Range`` was asked.

It also answers absolute-form requests (``GET http://host/path``), so a test can point
``HTTP_PROXY`` at it and check that the client goes through the proxy.

For benchmarks it adds a latency to every request and limits each connection's bandwidth.
Also here: builders of the test data (JPEG/PNG/TIFF bytes, a decompression bomb, tar.gz archives).

Use::

    with FileServer() as srv:
        srv.add("a/b.tar.gz", data)
        srv.fault("a/b.tar.gz", "status", times=1, status=500)
        url = srv.url("a/b.tar.gz")
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import socket
import struct
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    """One scripted misbehaviour of a path.

    Attributes:
        kind: ``status``, ``drop``, ``stall`` or ``ignore_range``.
        times: how many requests it applies to (``None``: every request).
        status: the status a ``status`` fault answers.
        retry_after: the ``Retry-After`` header of a ``status`` fault.
        after_bytes: body bytes a ``drop`` fault sends before cutting the connection.
        seconds: how long a ``stall`` fault waits.
    """

    kind: str
    times: int | None = 1
    status: int = 500
    retry_after: str | None = None
    after_bytes: int = 0
    seconds: float = 0.0


@dataclass
class RequestLog:
    """One request the server answered."""

    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hangs up (tests close streams early on purpose)."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FileServer:
    """Serve in-memory files over HTTP on 127.0.0.1 with scriptable faults.

    Args:
        latency: seconds added before every response (benchmark: 0.05).
        bandwidth: bytes per second per connection, or ``None`` for no limit.
    """

    def __init__(self, latency: float = 0.0, bandwidth: float | None = None):
        self.latency = latency
        self.bandwidth = bandwidth
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.log: list[RequestLog] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- content and faults ---------------------------------------------------------------------
    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``/path``; returns its URL."""
        self.files[path.lstrip("/")] = data
        return self.url(path)

    def fault(self, path: str, kind: str, times: int | None = 1, **kw: Any) -> None:
        """Script a fault for ``/path`` (see :class:`Fault`)."""
        with self._lock:
            self.faults.setdefault(path.lstrip("/"), []).append(Fault(kind, times, **kw))

    def clear_faults(self) -> None:
        """Forget every scripted fault."""
        with self._lock:
            self.faults.clear()

    def requests_for(self, path: str, method: str = "GET") -> list[RequestLog]:
        """The logged requests for ``/path``."""
        path = path.lstrip("/")
        with self._lock:
            return [r for r in self.log if r.path == path and r.method == method]

    def _take_faults(self, path: str) -> list[Fault]:
        """The faults that apply to this request (consuming one use of each)."""
        with self._lock:
            active = [f for f in self.faults.get(path, []) if f.times is None or f.times > 0]
            status = next((f for f in active if f.kind == "status"), None)
            if status is not None:
                # A status answer has no body: only it (and stalls) are used up by this request.
                active = [f for f in active if f.kind == "stall" or f is status]
            for f in active:
                if f.times is not None:
                    f.times -= 1
        return active

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str = "") -> str:
        """The full URL of ``/path``."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> "FileServer":
        """Start serving in a background thread (on a free port)."""
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            """Keep test output quiet."""

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
            self._serve(head=True)

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._serve(head=False)

        def _log(self, status: int) -> RequestLog:
            """Log the request before answering, so a client never sees an answer not yet logged."""
            entry = RequestLog(self.command, self._path, self.headers.get("Range"), status, 0,
                               dict(self.headers.items()))
            with server._lock:
                server.log.append(entry)
            return entry

        def _serve(self, head: bool) -> None:
            path = self.path
            if path.startswith(("http://", "https://")):
                # Absolute form: the request came through us acting as a proxy.
                path = "/" + path.split("://", 1)[1].partition("/")[2]
            self._path = path.split("?", 1)[0].lstrip("/")
            if server.latency:
                time.sleep(server.latency)
            faults = server._take_faults(self._path)
            for f in faults:
                if f.kind == "stall":
                    time.sleep(f.seconds)
            for f in faults:
                if f.kind == "status":
                    body = f"{f.status} scripted\n".encode()
                    self._log(f.status)
                    self.send_response(f.status)
                    if f.retry_after is not None:
                        self.send_header("Retry-After", f.retry_after)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
            data = server.files.get(self._path)
            if data is None:
                body = b"404 not found\n"
                self._log(404)
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
            ignore_range = any(f.kind == "ignore_range" for f in faults)
            start, end, status = 0, len(data) - 1, 200
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and not ignore_range and (if_range is None or if_range == etag):
                spec = rng.removeprefix("bytes=")
                a, _, b = spec.partition("-")
                try:
                    start = int(a)
                    end = int(b) if b else len(data) - 1
                except ValueError:
                    start, end = 0, len(data) - 1
                if start >= len(data):
                    self._log(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                end = min(end, len(data) - 1)
                status = 206
            body = data[start:end + 1]
            entry = self._log(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "none" if ignore_range else "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if head:
                return
            drop = next((f for f in faults if f.kind == "drop"), None)
            limit = len(body) if drop is None else min(drop.after_bytes, len(body))
            entry.sent = self._send_paced(body[:limit])
            if drop is not None:
                self.close_connection = True
                # The client may already be gone; the cut is what we wanted either way.
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

        def _send_paced(self, body: bytes) -> int:
            """Write ``body``, at most ``server.bandwidth`` bytes/s on this connection."""
            chunk = 16384
            t0 = time.monotonic()
            sent = 0
            try:
                for i in range(0, len(body), chunk):
                    piece = body[i:i + chunk]
                    self.wfile.write(piece)
                    sent += len(piece)
                    if server.bandwidth:
                        ahead = sent / server.bandwidth - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return sent

    return Handler


# -- test data builders ---------------------------------------------------------------------------

def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small RGB JPEG with random content (different for each seed)."""
    from PIL import Image

    rnd = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rnd.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGBA") -> bytes:
    """A small PNG (RGBA by default) with random content."""
    from PIL import Image

    rnd = random.Random(seed)
    n = size[0] * size[1] * len(mode)
    img = Image.frombytes(mode, size, bytes(rnd.getrandbits(8) for _ in range(n)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def tiff_bytes(seed: int, size: tuple[int, int] = (36, 30)) -> bytes:
    """A small 16-bit greyscale TIFF (as microscopy figures often are)."""
    from PIL import Image

    rnd = random.Random(seed)
    raw = b"".join(struct.pack("<H", rnd.getrandbits(16)) for _ in range(size[0] * size[1]))
    img = Image.frombytes("I;16", size, raw)
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


def bomb_png(side: int = 40000) -> bytes:
    """A tiny PNG that claims ``side`` × ``side`` pixels (a decompression bomb; ~1.6 gigapixels)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    idat = zlib.compress(row * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_tarball(members: dict[str, bytes], symlinks: dict[str, str] | None = None,
                 truncate_to: float | None = None) -> bytes:
    """A tar.gz holding ``members`` (name → bytes) in order, optionally symlinks, optionally truncated.

    Args:
        members: member names (may hold folders, or hostile names such as ``../x``) and contents.
        symlinks: member names → link targets.
        truncate_to: keep only this fraction of the compressed bytes (a truncated gzip).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mtime = 1_700_000_000
            tf.addfile(info)
    data = buf.getvalue()
    if truncate_to is not None:
        data = data[: int(len(data) * truncate_to)]
    return data
