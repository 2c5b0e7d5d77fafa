"""The FastAPI app of ``llavamed serve``: OpenAI-compatible routes, auth, limits, logs, web page.

Routes:

- ``POST /v1/chat/completions``: chat with text and images; ``stream`` answers as SSE.
- ``GET /v1/models``: the one model served.
- ``GET /health``: 200 once the model is loaded, 503 (``{"status": "loading"}``) before.
- ``GET /``: the web chat page (``static/index.html``), a client of the same API.

A request is checked completely before it may join a batch, in this order, each step with its
own status: without an API key, ``Host`` and ``Origin`` against the allowlist (403, every route:
the DNS-rebinding and cross-site defence); auth (401); ``Content-Type: application/json`` (415);
model loaded (503); body size (413) and body time (408); JSON (400); schema, sampling values and
seed range (422); model name (404); text length against the context and no image placeholder in
the text (400); then, in a small pool of preparation threads (never the generation thread),
images checked from their headers and decoded (400), the prompt rendered and tokenised and its
exact length checked (400); queue (429). Slow clients are cut off: headers must arrive within
``header_timeout_s`` (see :mod:`.server`), the body within ``body_timeout_s``.
Every error is OpenAI-style JSON (:mod:`.api_errors`); an unexpected exception becomes a 500
with no details (the traceback goes to the server log). One log line per request.

FastAPI, Starlette and httpx are imported at the top of this module: only the ``serve`` command
imports it (inside its body), so ``llavamed --help`` stays fast.

Use::

    app = create_app(ServeConfig(model=Path("ckpt/tiny")))   # then run it with uvicorn
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LlavamedError, ModelError
from .api_errors import APIError, error_body
from .config import ServeConfig
from .native import ClientGone, NativeBackend, RequestContext
from .protocol import fetch_remote_images, parse_chat_request, parse_json_body, redact_body

__all__ = ["create_app", "ServerState"]

log = logging.getLogger("llavamed.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_QUIET_PATHS = ("/health", "/favicon.ico")


class ServerState:
    """Per-app state: the backend, the loading outcome, and how to stop the server.

    Attributes:
        backend: the native or vLLM backend.
        error: the error that stopped loading, or ``None``.
        load_seconds: seconds the load took, once loaded.
        on_fatal: called (from the loading thread) when loading fails, to stop the server.
    """

    def __init__(self, config: ServeConfig, backend: Any):
        self.config = config
        self.backend = backend
        self.error: LlavamedError | None = None
        self.load_seconds: float | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.started = time.time()
        self.http: Any = None
        self.prep: ThreadPoolExecutor | None = None
        """The preparation threads (image decoding and preprocessing, tokenising)."""

    def load(self) -> None:
        """Load the backend (runs in a background thread); on failure record it and stop."""
        t0 = time.monotonic()
        try:
            self.backend.start()
        except LlavamedError as exc:
            self.error = exc
        except Exception as exc:  # an unexpected failure still stops the server with one line
            log.debug("loading the model failed", exc_info=True)  # shown with LLAVAMED_DEBUG=1
            self.error = ModelError(f"{self.config.model}: loading failed ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})",
                                    "rerun with LLAVAMED_DEBUG=1 for the traceback")
        if self.error is not None:
            log.error("loading failed: %s", self.error.message)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.load_seconds = time.monotonic() - t0
        log.info("model %s loaded in %.1f s (%s engine); ready", self.config.model_name,
                 self.load_seconds, self.backend.name)


def _make_backend(config: ServeConfig, engine_loader: Callable[[], Any] | None) -> Any:
    if config.engine == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(config)
    return NativeBackend(config, engine_loader)


def create_app(config: ServeConfig, engine_loader: Callable[[], Any] | None = None) -> Any:
    """Build the FastAPI app for ``config``; the model loads in the background once it starts.

    Args:
        config: the server settings (validated here).
        engine_loader: for the native engine, a function returning the engine (default:
            ``Engine.load`` of ``config.model``).

    Returns:
        The ASGI app (``app.state.llavamed`` holds the :class:`ServerState`).
    """
    config.validate()
    state = ServerState(config, _make_backend(config, engine_loader))

    @asynccontextmanager
    async def lifespan(_app: Any):
        state.http = httpx.AsyncClient(timeout=httpx.Timeout(config.remote_images.timeout_s))
        state.prep = ThreadPoolExecutor(config.prep_workers, thread_name_prefix="llavamed-prep")
        threading.Thread(target=state.load, name="llavamed-load", daemon=True).start()
        try:
            yield
        finally:
            state.prep.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(state.backend.close)
            if hasattr(state.backend, "aclose"):
                await state.backend.aclose()
            await state.http.aclose()

    app = FastAPI(title="llavamed", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llavamed = state

    def error_response(err: APIError, request_id: str | None = None) -> Any:
        headers = dict(err.headers)
        if request_id:
            headers["X-Request-Id"] = request_id
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Any:
        rec = request.scope.get("llavamed.log")
        if rec is not None:
            rec["code"] = exc.code
        return error_response(exc, rec.get("id") if rec else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Any:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid')}", "invalid_request_error",
                                       param, "invalid_value"), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Any:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error; see the server log", "server_error",
                                       None, "internal_error"), status_code=500)

    def check_auth(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            msg = "missing API key: send the header 'Authorization: Bearer <key>'"
        elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            msg = "incorrect API key"
        else:
            return
        raise APIError(401, msg, "authentication_error", None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

    def check_ready() -> None:
        if not state.backend.ready:
            what = "failed to load" if state.error else "is loading"
            raise APIError(503, f"the model {what}; retry when GET /health answers 200",
                           "server_error", None, "model_loading", headers={"Retry-After": "2"})

    def check_json(request: Request) -> None:
        # A browser sends text/plain, form or multipart bodies cross-site without asking (no CORS
        # preflight); only application/json needs one, which this server never grants.
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            return
        got = f"'{ctype[:60]}'" if ctype else "missing"
        raise APIError(415, f"the request's Content-Type is {got}; send the JSON body with "
                            f"'Content-Type: application/json'", "invalid_request_error", None,
                       "unsupported_media_type")

    async def read_body(request: Request) -> bytes:
        cap = config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is over this server's limit of {cap:,} bytes",
                           "invalid_request_error", None, "request_too_large")
        if declared and declared.isdigit() and int(declared) > cap:
            raise too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(config.limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {config.limits.body_timeout_s:g} s "
                                f"(--body-timeout)", "invalid_request_error", None, "request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    @app.get("/health")
    async def health() -> Any:
        body: dict[str, Any] = {"model": config.model_name, "engine": config.engine}
        if state.backend.ready:
            body.update(status="ok", **state.backend.stats())
            return JSONResponse(body)
        if state.error is not None:
            body.update(status="failed", error=state.error.message)
        else:
            body.update(status="loading")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        check_auth(request)
        card: dict[str, Any] = {"id": config.model_name, "object": "model",
                                "created": int(state.started), "owned_by": "llavamed"}
        if state.backend.context_length:
            card["max_model_len"] = state.backend.context_length
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        rec = request.scope["llavamed.log"]
        check_auth(request)
        check_json(request)
        check_ready()
        raw = await read_body(request)
        body = parse_json_body(raw)
        if config.log_requests:
            log.info("%s body %s", rec["id"], json.dumps(redact_body(body), ensure_ascii=False)[:20000])
        chat = parse_chat_request(body, config.limits)
        rec["stream"] = chat.stream
        if chat.model is not None and chat.model not in (config.model_name, str(config.model)):
            raise APIError(404, f"the model '{chat.model}' does not exist; this server serves "
                                f"'{config.model_name}'", "invalid_request_error", "model",
                           "model_not_found")
        state.backend.precheck(chat)
        await fetch_remote_images(chat, config.limits, config.remote_images, state.http)
        await asyncio.get_running_loop().run_in_executor(state.prep, state.backend.prepare, chat)
        rec["images"] = len(chat.images)

        async def wait_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                continue

        rec["ingest_ms"] = (time.monotonic() - request.scope["llavamed.t0"]) * 1000
        ctx = RequestContext(rec["id"], config.model_name, rec, wait_disconnect)
        headers = {"X-Request-Id": rec["id"]}
        if chat.stream:
            events = await state.backend.stream(chat, ctx, body)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**_SSE_HEADERS, **headers})
        try:
            result = await state.backend.complete(chat, ctx, body)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(result, headers=headers)

    @app.post("/v1/images/render")
    async def render_image(request: Request) -> Any:
        # The picture the model sees for an image data URL ({"url": ...}), as a PNG data URL: the
        # web page shows DICOM/NIfTI uploads through this (the same rendering as `data view`).
        from .images import decode_data_url, open_image, png_data_url

        check_auth(request)
        check_json(request)
        body = parse_json_body(await read_body(request))
        url = body.get("url")
        if not isinstance(url, str):
            raise APIError(400, "url: expected an image data URL", "invalid_request_error", "url",
                           "invalid_image_url")

        def render() -> str:
            data, media_type = decode_data_url(url, "url", config.limits)
            return png_data_url(open_image(data, "url", config.limits, media_type))

        return {"url": await asyncio.get_running_loop().run_in_executor(state.prep, render)}

    page = resources.files("llavamed_core.serve").joinpath("static/index.html").read_text("utf-8")
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": content_security_policy(page),
                    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}

    @app.get("/")
    async def index() -> Any:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/favicon.ico")
    async def favicon() -> Any:
        return Response(status_code=204)

    if config.api_key is None:
        app.add_middleware(_HostGuard, config=config)
    app.add_middleware(_RequestLog)
    return app


def content_security_policy(page: str) -> str:
    """The Content-Security-Policy of the web page: its own inline script and style (by hash),
    images from data/blob URLs, requests to this server only; no frames, forms, plugins."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in bodies)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            f"frame-ancestors 'none'")


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a ``Host`` value (``[::1]:8000``, ``example.org``); names lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return host.rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _HostGuard:
    """ASGI middleware used when no API key is set: the DNS-rebinding and cross-site defence.

    ``Host`` must be a loopback name, an IP address, the bound host or an ``--allow-host`` value
    (a page on a DNS name the attacker controls, rebound to this machine, sends that name). A
    browser's ``Origin``, when sent, must be this server itself (same host and port as ``Host``)
    or one of the named hosts (loopback, bound, ``--allow-host``). Otherwise: 403.
    """

    def __init__(self, app: Any, config: ServeConfig):
        self.app = app
        self.any = "*" in config.allow_hosts
        named = {_split_host(h)[0] for h in config.allow_hosts if h != "*"}
        bound = _split_host(config.host)[0]
        if bound not in ("0.0.0.0", "::", ""):
            named.add(bound)
        self.named = named | set(_LOOPBACK_NAMES)

    def _host_ok(self, host: str) -> bool:
        return self.any or host in self.named or host.endswith(".localhost") or _is_ip(host)

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
        scheme, sep, rest = origin.partition("://")
        o_host, o_port = _split_host(rest.split("/")[0]) if sep else ("", "")
        same = sep and (o_host, o_port or {"http": "80", "https": "443"}.get(scheme, "")) == \
            (host, port or {"http": "80", "https": "443"}.get(scheme, ""))
        if same or (sep and o_host in self.named) or (sep and o_host.endswith(".localhost")):
            return None
        return ("origin_not_allowed", f"requests from the web origin {origin[:80]!r} are refused: without "
                f"an API key this server only answers its own page and local origins; start it with "
                f"--allow-host {o_host[:60] or 'HOST'} (or --api-key)", "origin")

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


class _RequestLog:
    """ASGI middleware: a request id, and one log line per request when its response ends.

    The line carries the id, method, path, status, tokens, the time spent reading and checking the
    request (``ingest_ms``), waiting for a batch (``queue_ms``) and generating (``gen_ms``), batch
    size and total latency; streamed responses are logged when the stream ends, so latency covers
    the whole answer.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec: dict[str, Any] = {"id": "chatcmpl-" + uuid.uuid4().hex[:24]}
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
