"""The FastAPI app of ``llavamed serve``: the server state, error handlers and middleware around
the routes.

- :mod:`.routes`: ``POST /v1/chat/completions`` (text and images; ``stream`` answers as SSE;
  ``n`` choices), ``GET /v1/models`` and ``/v1/models/{id}``, ``GET /health`` (200 once the model
  is loaded, 503 before), ``POST /v1/images/render``.
- :mod:`.page`: ``GET /``, the web chat page (``static/index.html``), a client of the same API.
- :mod:`.guards`: the per-request checks and the middleware (request log, Host/Origin guard
  without an API key, CORS with ``--cors-origin``).

Every error is OpenAI-style JSON (:mod:`.api_errors`); an unexpected exception becomes a 500
with no details (the traceback goes to the server log). One log line per request. Slow clients
are cut off: headers must arrive within ``header_timeout_s`` (see :mod:`.server`), the body within
``body_timeout_s``.

FastAPI, Starlette and httpx are imported at the top of this module: only the ``serve`` command
imports it (inside its body), so ``llavamed --help`` stays fast.

Use::

    app = create_app(ServeConfig(model=Path("ckpt/tiny")))   # then run it with uvicorn
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LlavamedError, ModelError
from .api_errors import APIError, error_body
from .backend import Backend
from .config import ServeConfig
from .guards import Cors, HostGuard, RequestLog
from .native import NativeBackend
from .page import page_router
from .routes import api_router
from .scheduler import SchedulerClosed

__all__ = ["create_app", "ServerState"]

log = logging.getLogger("llavamed.serve")


class ServerState:
    """Per-app state: the backend, the loading outcome, and how to stop the server.

    Attributes:
        backend: the native or vLLM backend.
        error: the error that stopped loading, or ``None``.
        load_seconds: seconds the load took, once loaded.
        on_fatal: called (from the loading thread) when loading fails, to stop the server.
    """

    def __init__(self, config: ServeConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.error: LlavamedError | None = None
        self.load_seconds: float | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.started = time.time()
        self.http: Any = None
        self.prep: ThreadPoolExecutor | None = None
        """The preparation threads (image decoding and preprocessing, tokenising)."""
        self.before_close: list[Callable[[], None]] = []
        """Called (in a thread) when the server stops, before the backend closes."""
        self.quiet = False
        """Log the outcome of loading at debug level (an API process other than the first: the
        first one says it)."""
        self.load_on_start = True
        """Load in the background once the app starts (``False``: loaded before it starts, by an
        API process other than the first, which takes connections only once it can answer them)."""

    def load(self) -> None:
        """Load the backend (runs in a background thread); on failure record it and stop."""
        t0 = time.monotonic()
        try:
            self.backend.start()
        except SchedulerClosed:  # the server is stopping while the model loads: nothing failed
            self._log(logging.INFO, "loading stopped: the server is shutting down")
            return
        except LlavamedError as exc:
            self.error = exc
        except Exception as exc:  # an unexpected failure still stops the server with one line
            log.debug("loading the model failed", exc_info=True)  # shown with LLAVAMED_DEBUG=1
            self.error = ModelError(f"{self.config.model}: loading failed ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})",
                                    "rerun with LLAVAMED_DEBUG=1 for the traceback")
        if self.error is not None:
            self._log(logging.ERROR, "loading failed: %s", self.error.message)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.load_seconds = time.monotonic() - t0
        self._log(logging.INFO, "model %s loaded in %.1f s (%s engine); ready", self.config.model_name,
                  self.load_seconds, self.backend.name)

    def _log(self, level: int, msg: str, *args: Any) -> None:
        log.log(logging.DEBUG if self.quiet else level, msg, *args)


def _make_backend(config: ServeConfig, engine_loader: Callable[[], Any] | None, link: Any) -> Backend:
    if config.engine == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(config)
    return NativeBackend(config, engine_loader, link)


def create_app(config: ServeConfig, engine_loader: Callable[[], Any] | None = None,
               engine_link: Any = None) -> Any:
    """Build the FastAPI app for ``config``; the model loads in the background once it starts.

    Args:
        config: the server settings (validated here).
        engine_loader: for the native engine, a function returning the engine (default:
            ``Engine.load`` of ``config.model``).
        engine_link: with ``--api-processes`` above 1, this process's
            :class:`~.engine_proc.EngineLink` to the shared engine process.

    Returns:
        The ASGI app (``app.state.llavamed`` holds the :class:`ServerState`).
    """
    config.validate()
    state = ServerState(config, _make_backend(config, engine_loader, engine_link))

    @asynccontextmanager
    async def lifespan(_app: Any):
        state.http = httpx.AsyncClient(timeout=httpx.Timeout(config.remote_images.timeout_s))
        state.prep = ThreadPoolExecutor(config.prep_workers, thread_name_prefix="llavamed-prep")
        if state.load_on_start:
            threading.Thread(target=state.load, name="llavamed-load", daemon=True).start()
        try:
            yield
        finally:
            state.prep.shutdown(wait=False, cancel_futures=True)
            for hook in state.before_close:
                await asyncio.to_thread(hook)
            await asyncio.to_thread(state.backend.close)
            await state.backend.aclose()
            await state.http.aclose()

    app = FastAPI(title="llavamed", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llavamed = state
    _add_error_handlers(app)
    app.include_router(api_router(state))
    app.include_router(page_router())
    if config.cors_origins:
        app.add_middleware(Cors, origins=config.cors_origins)
    if config.api_key is None:
        app.add_middleware(HostGuard, config=config)
    # Added last: the outermost, so it sees every request.
    app.add_middleware(RequestLog, api_process=engine_link.index if engine_link is not None else None)
    return app


def _add_error_handlers(app: Any) -> None:
    """Every failure as OpenAI-style JSON: API errors, unknown routes and methods, a bug (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Any:
        rec = request.scope.get("llavamed.log")
        if rec is not None:
            rec["code"] = exc.code
        headers = dict(exc.headers)
        if rec and rec.get("id"):
            headers["X-Request-Id"] = rec["id"]
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

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
