"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the LLM client's tests and benchmark.

It answers ``POST …/chat/completions`` (any prefix, so ``/v1/chat/completions`` and Azure's
``/openai/deployments/<name>/chat/completions?api-version=…`` both work) and ``GET …/models``.
What it answers is scripted:

- a *responder* turns each request body into the assistant's text (the default echoes a
  conversation built from the last user message; :func:`judge_responder` answers like a judge);
- :meth:`LLMServer.script` queues faults for requests whose last user message contains a given
  substring (``""`` matches every request): :func:`reply`, :func:`error` (any status, optional
  ``Retry-After``), :func:`slow` (a reply after a delay), :func:`drop` (close the connection
  without answering) and :func:`malformed` (a 200 with a body that is not a completion);
- ``latency`` delays every answer (the benchmark uses 200 ms);
- a request with ``"stream": true`` gets its reply as Server-Sent Events: one chunk per word,
  a finish chunk, a usage chunk when ``stream_options.include_usage`` asks for one, ``[DONE]``.

Every request is recorded (method, path, query, headers, JSON body) for assertions. Usage figures
are deterministic: ``prompt_tokens`` = characters of all messages // 4, ``completion_tokens`` =
characters of the answer // 4 (at least 1).

Run standalone (the benchmark does, so the server's threads do not share the client's GIL)::

    python tests/llm_server.py --latency 0.2        # prints "PORT <n>" then serves until killed
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["Action", "LLMServer", "RecordedRequest", "reply", "error", "slow", "drop", "malformed",
           "conversation_responder", "judge_responder", "message_text", "last_user_text"]


@dataclass
class Action:
    """One scripted answer. Build it with :func:`reply`, :func:`error`, :func:`slow`, :func:`drop`
    or :func:`malformed`."""

    kind: str  # "reply" | "error" | "drop" | "raw"
    text: str | None = None
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    finish_reason: str = "stop"


def reply(text: str | None = None, *, delay: float = 0.0, finish_reason: str = "stop") -> Action:
    """A normal completion; ``text=None`` uses the responder's text."""
    return Action("reply", text=text, delay=delay, finish_reason=finish_reason)


def slow(seconds: float, text: str | None = None) -> Action:
    """A normal completion sent after ``seconds`` (longer than the client's timeout → a timeout)."""
    return Action("reply", text=text, delay=seconds)


def error(status: int, *, retry_after: float | str | None = None, message: str = "scripted error",
          delay: float = 0.0) -> Action:
    """An HTTP error in OpenAI's error shape, with an optional ``Retry-After`` header."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    body = json.dumps({"error": {"message": message, "type": "scripted", "code": status}}).encode()
    return Action("error", status=status, headers=headers, body=body, delay=delay)


def drop(delay: float = 0.0) -> Action:
    """Close the connection without sending any response."""
    return Action("drop", delay=delay)


def malformed(body: bytes = b'{"id": "chatcmpl-broken", "choices": [{"mess', delay: float = 0.0) -> Action:
    """A 200 response whose JSON body is cut short (or any ``body`` given)."""
    return Action("raw", status=200, body=body, delay=delay)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many clients connect at once in the concurrency tests


@dataclass
class RecordedRequest:
    """What the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None
    time: float


def message_text(message: dict) -> str:
    """The text of one chat message (string content or text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def last_user_text(body: dict) -> str:
    """The text of the last ``user`` message of a request body."""
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            return message_text(m)
    return ""


def conversation_responder(body: dict) -> str:
    """A deterministic two-round conversation mentioning the first line of the last user message."""
    first = last_user_text(body).strip().splitlines()
    topic = first[1] if len(first) > 1 else (first[0] if first else "the image")
    return (f"User: What does this image show?\nAssistant: It shows {topic[:120]}\n"
            f"User: Is anything unusual visible?\nAssistant: The appearance is consistent with {topic[:60]}")


def judge_responder(scores: Callable[[dict], tuple[float, float]] | None = None) -> Callable[[dict], str]:
    """A responder that answers like the judge: two scores on the first line, then a reason.

    Args:
        scores: maps the request body to (reference score, model score); default (8, 6).
    """

    def respond(body: dict) -> str:
        a, b = scores(body) if scores else (8, 6)
        return f"{a:g} {b:g}\nAssistant 1 is more complete; Assistant 2 misses details."

    return respond


class LLMServer:
    """A scriptable OpenAI-compatible server running in a background thread.

    Args:
        responder: request body → assistant text for normal replies.
        latency: seconds added to every answer.
        port: 0 for a free port.
    """

    def __init__(self, responder: Callable[[dict], str] | None = None, latency: float = 0.0,
                 port: int = 0):
        self.responder = responder or conversation_responder
        self.latency = latency
        self._lock = threading.Lock()
        self._scripts: list[tuple[str, list[Action]]] = []
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self.max_in_flight = 0  # most completion requests handled at the same moment
        self._server = _Server(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, client_address: None  # client hung up: expected here
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT`` (for Azure-style endpoints)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (an OpenAI-style base URL)."""
        return f"{self.root}/v1"

    def start(self) -> "LLMServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------------------------------
    def script(self, match: str, *actions: Action) -> None:
        """Answer the next requests whose last user message contains ``match`` with ``actions``,
        one per request, in order; afterwards those requests get normal replies again."""
        with self._lock:
            self._scripts.append((match, list(actions)))

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded requests, in arrival order."""
        with self._lock:
            return list(self._requests)

    def completion_requests(self) -> list[RecordedRequest]:
        """Recorded ``chat/completions`` requests only."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def _next_action(self, body: dict) -> Action:
        text = last_user_text(body)
        with self._lock:
            for match, actions in self._scripts:
                if actions and match in text:
                    return actions.pop(0)
        return reply()

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- HTTP --------------------------------------------------------------------------------------
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # keep test output clean
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up (its timeout): nothing to answer.
                    self.close_connection = True

            def do_GET(self):
                parts = urlsplit(self.path)
                server._record(RecordedRequest("GET", parts.path, parse_qs(parts.query),
                                               {k.lower(): v for k, v in self.headers.items()},
                                               None, time.time()))
                if parts.path.endswith("/models"):
                    body = {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = None
                server._record(RecordedRequest("POST", parts.path, parse_qs(parts.query),
                                               {k.lower(): v for k, v in self.headers.items()},
                                               body, time.time()))
                if not parts.path.endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                if not isinstance(body, dict):
                    self._send(400, b'{"error": {"message": "the body is not a JSON object"}}')
                    return
                action = server._next_action(body)
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    self._answer(body, action)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _answer(self, body: dict, action: Action) -> None:
                delay = server.latency + action.delay
                if delay:
                    time.sleep(delay)
                if action.kind == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # already closed by the client
                    return
                if action.kind in ("error", "raw"):
                    self._send(action.status, action.body or b"", action.headers)
                    return
                text = action.text if action.text is not None else server.responder(body)
                prompt_chars = sum(len(message_text(m)) for m in body.get("messages") or [])
                resp = {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "scripted"),
                    "choices": [{"index": 0, "finish_reason": action.finish_reason,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": prompt_chars // 4,
                              "completion_tokens": max(1, len(text) // 4),
                              "total_tokens": prompt_chars // 4 + max(1, len(text) // 4)},
                }
                if body.get("stream"):
                    self._send(200, _sse_body(resp, bool((body.get("stream_options") or {}).get("include_usage"))),
                               content_type="text/event-stream")
                    return
                self._send(200, json.dumps(resp).encode())

        return Handler


def _sse_body(resp: dict, include_usage: bool) -> bytes:
    """A completion as the Server-Sent Events of a streamed answer (one chunk per word)."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
            "model": resp["model"]}
    choice = resp["choices"][0]
    text = choice["message"]["content"]
    words = re.findall(r"\s*\S+|\s+$", text)  # joined, they are the text again
    deltas = [{"role": "assistant", "content": ""}] + [{"content": w} for w in words]
    chunks = [dict(base, choices=[{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]))
    if include_usage:
        chunks.append(dict(base, choices=[], usage=resp["usage"]))
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    ap.add_argument("--judge", action="store_true", help="answer like the judge (\"8 6\\n…\")")
    args = ap.parse_args(argv)
    srv = LLMServer(judge_responder() if args.judge else None, latency=args.latency, port=args.port)
    srv.start()
    print(f"PORT {srv.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
        sys.exit(0)


if __name__ == "__main__":
    _main()
