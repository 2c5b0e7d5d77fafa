"""The server's guards: per-request checks (API key, content type, readiness, body size and time)
and the ASGI middleware around every route (request log, Host/Origin guard, CORS).

Middleware order, outermost first: :class:`RequestLog` (an id and one log line for every
request), :class:`HostGuard` (only without an API key: the DNS-rebinding and cross-site
defence), :class:`Cors` (only with ``--cors-origin``: Starlette's CORS middleware, its refusals
answered as OpenAI-style JSON), then the routes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import random
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from .api_errors import APIError, error_body
from .config import ServeConfig, ServeLimits

__all__ = ["check_auth", "check_json", "check_ready", "read_body", "HostGuard", "RequestLog", "Cors"]

log = logging.getLogger("llavamed.serve")

_QUIET_PATHS = ("/health", "/favicon.ico")
_IDS = random.Random()  # seeded from os.urandom once: request ids are unique, not secret
"""Source of request ids (``uuid4`` asks the kernel for randomness on every request; in profiles
under load that was the largest single cost of the event loop)."""
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def check_auth(request: Request, api_key: str | None) -> None:
    """Raise 401 unless the request carries ``Authorization: Bearer <api_key>`` (or no key is set)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        msg = "missing API key: send the header 'Authorization: Bearer <key>'"
    elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        msg = "incorrect API key"
    else:
        return
    raise APIError(401, msg, "authentication_error", None, "invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


def check_ready(backend: Any, failed: bool) -> None:
    """Raise 503 (with ``Retry-After``) while the model is loading or after it failed to load."""
    if backend.failure:
        raise APIError(503, backend.failure, "server_error", None, "engine_died")
    if not backend.ready:
        what = "failed to load" if failed else "is loading"
        raise APIError(503, f"the model {what}; retry when GET /health answers 200",
                       "server_error", None, "model_loading", headers={"Retry-After": "2"})


def check_json(request: Request) -> None:
    """Raise 415 unless the body is sent as ``application/json`` (or ``application/*+json``)."""
    # A browser sends text/plain, form or multipart bodies cross-site without asking (no CORS
    # preflight); only application/json needs one, which this server grants only to --cors-origin.
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    got = f"'{ctype[:60]}'" if ctype else "missing"
    raise APIError(415, f"the request's Content-Type is {got}; send the JSON body with "
                        f"'Content-Type: application/json'", "invalid_request_error", None,
                   "unsupported_media_type")


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes`` (declared or streamed) and 408
    when it does not arrive within ``body_timeout_s``."""
    cap = limits.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over this server's limit of {cap:,} bytes",
                       "invalid_request_error", None, "request_too_large")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                            f"(--body-timeout)", "invalid_request_error", None, "request_timeout",
                       headers={"Connection": "close"}) from None
    return b"".join(chunks)


def _split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a ``Host`` value (``[::1]:8000``, ``example.org``); names lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return host.rstrip("."), port


def _origin_key(origin: str) -> tuple[str, str, str] | None:
    """``(scheme, host, port)`` of a web origin, the port made explicit; ``None`` if it is not one."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep:
        return None
    host, port = _split_host(rest.split("/")[0])
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, "")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware used when no API key is set: the DNS-rebinding and cross-site defence.

    ``Host`` must be a loopback name, an IP address, the bound host or an ``--allow-host`` value
    (a page on a DNS name the attacker controls, rebound to this machine, sends that name). A
    browser's ``Origin``, when sent, must be this server itself (same host and port as ``Host``),
    one of the named hosts (loopback, bound, ``--allow-host``) or a ``--cors-origin``. Otherwise: 403.
    """

    def __init__(self, app: Any, config: ServeConfig):
        self.app = app
        self.any = "*" in config.allow_hosts or "*" in config.cors_origins
        named = {_split_host(h)[0] for h in config.allow_hosts if h != "*"}
        bound = _split_host(config.host)[0]
        if bound not in ("0.0.0.0", "::", ""):
            named.add(bound)
        self.named = named | set(_LOOPBACK_NAMES)
        self.any_host = "*" in config.allow_hosts
        self.cors = {_origin_key(o) for o in config.cors_origins if o != "*"}

    def _host_ok(self, host: str) -> bool:
        return self.any_host or host in self.named or host.endswith(".localhost") or _is_ip(host)

    def _refusal(self, scope: dict) -> tuple[str, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host_header = headers.get("host", "")
        host, port = _split_host(host_header)
        if host_header and not self._host_ok(host):
            return ("host_not_allowed", f"the Host header {host_header[:80]!r} is not a name this server "
                    f"answers to without an API key; start it with --allow-host {host[:60]} (or --api-key)",
                    "host")
        origin = headers.get("origin")
        if origin is None or self.any:
            return None
        key = _origin_key(origin)
        if key is not None:
            scheme, o_host, o_port = key
            if ((o_host, o_port) == (host, port or _DEFAULT_PORTS.get(scheme, "")) or o_host in self.named
                    or o_host.endswith(".localhost") or key in self.cors):
                return None
        o_name = key[1] if key else ""
        return ("origin_not_allowed", f"requests from the web origin {origin[:80]!r} are refused: without "
                f"an API key this server only answers its own page, local origins and --cors-origin; "
                f"start it with --cors-origin {origin[:60] if key else 'ORIGIN'} or --allow-host "
                f"{o_name[:60] or 'HOST'} (or --api-key)", "origin")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self._refusal(scope)
            if refused is not None:
                code, message, param = refused
                rec = scope.get("llavamed.log")
                if rec is not None:
                    rec["code"] = code
                response = JSONResponse(error_body(message, "permission_error", param, code), status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware for ``--cors-origin``: preflights and responses allow those
    origins only (any request header, ``GET``/``POST``, no cookies); a refused preflight is
    answered as OpenAI-style JSON rather than plain text."""

    def __init__(self, app: Any, origins: list[str]):
        super().__init__(app, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
                         expose_headers=["X-Request-Id", "Retry-After"], allow_credentials=False,
                         max_age=600)

    def preflight_response(self, request_headers: Any) -> Any:
        """The preflight answer; a refusal (400) carries an OpenAI-style error body."""
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = response.body.decode(errors="replace")
        origin = request_headers.get("origin", "")
        message = (f"CORS preflight refused ({reason}) for the web origin {origin[:80]!r}; "
                   f"start the server with --cors-origin {origin[:60] or 'ORIGIN'} to allow it")
        return JSONResponse(error_body(message, "invalid_request_error", "origin", "cors_not_allowed"),
                            status_code=400, headers={"Vary": "Origin"})


class RequestLog:
    """ASGI middleware: a request id, and one log line per request when its response ends.

    The line carries the id, method, path, status, tokens, the time spent reading and checking the
    request (``ingest_ms``), waiting for a batch (``queue_ms``) and generating (``gen_ms``), batch
    size and total latency; streamed responses are logged when the stream ends, so latency covers
    the whole answer. With several API processes, ``api=I`` names the one that answered.
    """

    def __init__(self, app: Any, api_process: int | None = None):
        self.app = app
        self.api_process = api_process

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec: dict[str, Any] = {"id": f"chatcmpl-{_IDS.getrandbits(96):024x}", "api": self.api_process}
        scope["llavamed.log"] = rec
        t0 = scope["llavamed.t0"] = time.monotonic()
        status = {"code": 0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status["code"] = status["code"] or 500
            raise
        finally:
            path = scope.get("path", "")
            if path not in _QUIET_PATHS:
                latency = (time.monotonic() - t0) * 1000
                fields = " ".join(f"{k}={_fmt(v)}" for k, v in rec.items()
                                  if k != "id" and v is not None)
                log.info("%s %s %s %s %s latency_ms=%.0f", rec["id"], scope.get("method"), path,
                         status["code"] or "-", fields, latency)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
