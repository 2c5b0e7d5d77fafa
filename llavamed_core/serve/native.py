"""The native backend: our engine in this process, behind the batching scheduler.

Loading (``start``) runs in a background thread so the server answers ``/health`` (503) and
``/v1/models`` while the checkpoint loads. Each request becomes one job of the
:class:`~.scheduler.BatchScheduler`; a plain request waits for its result, a streamed one relays
the engine's deltas as ``chat.completion.chunk`` events. If the client goes away the job is
cancelled, which frees its slot in the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import LlavamedError
from .api_errors import APIError
from .config import ServeConfig
from .protocol import ParsedChat, chunk_body, completion_body
from .scheduler import BatchScheduler, Job, QueueFull, SchedulerClosed

__all__ = ["NativeBackend", "RequestContext", "ClientGone", "map_engine_error", "sse"]

log = logging.getLogger("llavamed.serve")


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


def map_engine_error(exc: BaseException) -> APIError:
    """The API error for an exception raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SchedulerClosed):
        return APIError(503, "the server is shutting down", "server_error", None, "shutting_down")
    if isinstance(exc, LlavamedError):
        # ConfigError/DataError from the engine: the request cannot be rendered or does not fit.
        return APIError(400, exc.message, "invalid_request_error", "messages", "invalid_request")
    return APIError(500, "internal error while generating; see the server log", "server_error",
                    None, "internal_error")


class NativeBackend:
    """Our :class:`~llavamed_core.infer.engine.Engine` with micro-batching.

    Args:
        config: the server settings.
        engine_loader: builds the engine (default: ``Engine.load`` of ``config.model``).
    """

    name = "native"

    def __init__(self, config: ServeConfig, engine_loader: Callable[[], Any] | None = None):
        self.config = config
        self._loader = engine_loader
        self.engine: Any = None
        self.scheduler: BatchScheduler | None = None

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and requests can be answered."""
        return self.scheduler is not None

    @property
    def context_length(self) -> int | None:
        """The model's context length, once loaded."""
        return getattr(self.engine, "context_length", None)

    def start(self) -> None:
        """Load the engine and start the batching worker (blocking; run in a thread)."""
        if self._loader is not None:
            engine = self._loader()
        else:
            from ..infer.engine import Engine

            engine = Engine.load(self.config.model, device=self.config.device, dtype=self.config.dtype,
                                 attn_implementation=self.config.attn_implementation)
        self.engine = engine
        self.scheduler = BatchScheduler(engine, max_batch=self.config.max_batch,
                                        max_wait_ms=self.config.max_wait_ms,
                                        max_queue=self.config.limits.max_queue,
                                        check=self._check_fits)

    def close(self) -> None:
        """Stop the batching worker (queued requests get 503)."""
        if self.scheduler is not None:
            self.scheduler.close()

    def stats(self) -> dict:
        """Scheduler counters for ``/health``."""
        if self.scheduler is None:
            return {}
        s = self.scheduler.stats
        return {"queued": self.scheduler.queued, "batches": s.batches, "requests": s.requests,
                "max_batch_seen": s.max_batch_seen, "cancelled": s.cancelled}

    def _check_fits(self, request: Any) -> None:
        # Runs in the worker thread, right before the batch: the tokenizer is not thread-safe,
        # so prompts are measured by the same thread that generates.
        n = self.engine.count_tokens(request)
        if n >= self.engine.context_length:
            raise APIError(400, f"the prompt has {n} tokens (images included); this model's context "
                                f"length is {self.engine.context_length}", "invalid_request_error",
                           "messages", "context_length_exceeded")

    def _engine_request(self, chat: ParsedChat) -> Any:
        from ..infer.engine import ChatRequest, GenerationParams

        params = GenerationParams(max_new_tokens=chat.max_tokens or self.config.limits.max_tokens,
                                  temperature=chat.temperature, top_p=chat.top_p,
                                  stop=list(chat.stop), seed=chat.seed)
        return ChatRequest(messages=chat.engine_messages(), params=params)

    def _submit(self, chat: ParsedChat, sink: Callable[[str, Any], None], stream: bool) -> Job:
        assert self.scheduler is not None
        try:
            return self.scheduler.submit(self._engine_request(chat), sink, stream=stream)
        except QueueFull:
            raise APIError(429, f"the server is busy ({self.scheduler.max_queue} requests queued); "
                                f"retry shortly", "rate_limit_error", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        except SchedulerClosed:
            raise map_engine_error(SchedulerClosed()) from None

    @staticmethod
    def _note(ctx: RequestContext, job: Job, res: Any) -> None:
        rec = ctx.record
        rec.update(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                   finish=res.finish_reason, batch=job.batch_size)
        if job.started_at is not None:
            rec["queue_ms"] = (job.started_at - job.enqueued_at) * 1000
        if job.started_at is not None and job.finished_at is not None:
            rec["gen_ms"] = (job.finished_at - job.started_at) * 1000

    async def complete(self, chat: ParsedChat, ctx: RequestContext, body: dict | None = None) -> dict:
        """Answer a non-streamed request; the client's disconnect cancels it.

        Raises:
            APIError: 429 queue full, 400 prompt too long, 500 engine failure.
            ClientGone: the client disconnected first (the job is cancelled).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(kind: str, payload: Any) -> None:
            if fut.done():
                return
            if kind == "done":
                fut.set_result(payload)
            elif kind == "error":
                fut.set_exception(payload)

        def sink(kind: str, payload: Any) -> None:
            if kind != "delta":
                loop.call_soon_threadsafe(settle, kind, payload)

        job = self._submit(chat, sink, stream=False)
        watcher = asyncio.ensure_future(ctx.wait_disconnect())
        try:
            await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                job.cancel()
                ctx.record["finish"] = "client_gone"
                raise ClientGone()
            try:
                res = fut.result()
            except BaseException as exc:
                raise map_engine_error(exc) from None
        finally:
            watcher.cancel()
            if not fut.done():
                job.cancel()
        self._note(ctx, job, res)
        finish = "length" if res.finish_reason == "length" else "stop"
        return completion_body(ctx.request_id, ctx.model, ctx.created, res.text, finish,
                               res.prompt_tokens, res.completion_tokens)

    async def stream(self, chat: ParsedChat, ctx: RequestContext,
                     body: dict | None = None) -> AsyncIterator[bytes]:
        """Queue a streamed request and return its SSE byte stream.

        Raises (before the stream starts):
            APIError: 429 when the queue is full.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        job = self._submit(chat, sink, stream=True)
        return self._events(chat, ctx, job, queue)

    async def _events(self, chat: ParsedChat, ctx: RequestContext, job: Job,
                      queue: asyncio.Queue) -> AsyncIterator[bytes]:
        watcher = asyncio.ensure_future(ctx.wait_disconnect())
        watcher.add_done_callback(lambda t: None if t.cancelled() else job.cancel())
        finished = False
        rid, model, created = ctx.request_id, ctx.model, ctx.created
        try:
            yield sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
            while True:
                kind, payload = await queue.get()
                if kind == "delta":
                    yield sse(chunk_body(rid, model, created, {"content": payload}))
                elif kind == "done":
                    finished = True
                    self._note(ctx, job, payload)
                    finish = "length" if payload.finish_reason == "length" else "stop"
                    yield sse(chunk_body(rid, model, created, {}, finish))
                    if chat.include_usage:
                        usage = {"prompt_tokens": payload.prompt_tokens,
                                 "completion_tokens": payload.completion_tokens,
                                 "total_tokens": payload.prompt_tokens + payload.completion_tokens}
                        yield sse(chunk_body(rid, model, created, None, usage=usage))
                    yield sse("[DONE]")
                    return
                else:
                    finished = True
                    err = map_engine_error(payload)
                    ctx.record.update(status_in_stream=err.status, code=err.code)
                    yield sse(err.body())
                    yield sse("[DONE]")
                    return
        finally:
            watcher.cancel()
            if not finished:
                job.cancel()
                ctx.record["finish"] = "client_gone"
