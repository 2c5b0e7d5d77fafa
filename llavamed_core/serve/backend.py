"""The interface every serving backend implements (native engine, vLLM), and what routes pass it.

The routes (:mod:`.routes`) and the app's lifespan (:mod:`.app`) talk to a backend only through
:class:`Backend`; a backend that lacks a member fails when it is built, not on the first request
that needs it. The request flow, in the order the server calls it: ``precheck`` (on the event
loop, cheap), ``prepare`` (in a preparation thread: images, template, tokens), then ``complete``
or ``stream``. ``start`` runs once in a loading thread; ``close`` then ``aclose`` at shutdown.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from .protocol import ParsedChat

__all__ = ["Backend", "RequestContext", "ClientGone", "sse"]


class ClientGone(Exception):
    """The client disconnected before its answer was ready (nobody to answer)."""


class RequestContext:
    """What a backend needs to know about the HTTP request it answers.

    Args:
        request_id: the ``chatcmpl-...`` id.
        model: the model name to report.
        record: the per-request log record (filled with tokens, batch size, finish reason).
        wait_disconnect: an awaitable factory that returns when the client disconnects.
    """

    def __init__(self, request_id: str, model: str, record: dict,
                 wait_disconnect: Callable[[], Any]):
        self.request_id = request_id
        self.model = model
        self.record = record
        self.wait_disconnect = wait_disconnect
        self.created = int(time.time())


def sse(obj: Any) -> bytes:
    """One Server-Sent Event carrying ``obj`` as JSON (or ``[DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Backend(ABC):
    """A model behind the OpenAI-compatible routes.

    Attributes:
        name: the engine's name in logs and ``/health`` (``native``, ``vllm``).
    """

    name: str = ""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether requests can be answered (the model is loaded and running)."""

    @property
    def failure(self) -> str | None:
        """Why a loaded backend stopped answering (its engine process died), else ``None``."""
        return None

    @property
    def context_length(self) -> int | None:
        """The model's context length when known (shown by ``/v1/models``)."""
        return None

    @abstractmethod
    def start(self) -> None:
        """Load the model (blocking; runs in a background thread while ``/health`` says 503)."""

    @abstractmethod
    def close(self) -> None:
        """Stop generating (blocking; queued requests get 503)."""

    async def aclose(self) -> None:
        """Release what lives on the event loop (HTTP clients); nothing by default."""
        return None

    @abstractmethod
    def stats(self) -> dict:
        """Counters that ``/health`` shows once ready."""

    def api_identity(self) -> dict:
        """Which of several API processes answers (``/health`` shows it in every state); none by
        default."""
        return {}

    @abstractmethod
    def precheck(self, chat: ParsedChat) -> None:
        """Cheap checks on the event loop before any image or token work (raises ``APIError``)."""

    @abstractmethod
    def prepare(self, chat: ParsedChat) -> None:
        """Decode images and build what generation needs (blocking; in a preparation thread)."""

    @abstractmethod
    async def complete(self, chat: ParsedChat, ctx: RequestContext, body: dict | None = None) -> dict:
        """The ``chat.completion`` body of a non-streamed request (raises ``APIError``,
        :class:`ClientGone`)."""

    @abstractmethod
    async def stream(self, chat: ParsedChat, ctx: RequestContext,
                     body: dict | None = None) -> AsyncIterator[bytes]:
        """The SSE byte stream of a streamed request (raises ``APIError`` before it starts)."""
