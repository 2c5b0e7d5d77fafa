"""The native backend: our engine behind the continuous-batching scheduler.

The model and the decode loop run in an engine process of their own (:mod:`.engine_proc`); with
an ``engine_loader`` (tests sharing one loaded engine) they run in a thread of this process.
Loading (``start``) runs in a background thread so the server answers ``/health`` (503) and
``/v1/models`` while the checkpoint loads. A request is checked completely before it may join a
batch: :meth:`NativeBackend.precheck` (on the event loop, cheap: text length against the context,
no image placeholder in the text) and :meth:`NativeBackend.prepare` (in the server's small pool
of preparation threads: images decoded, resized and normalised, the prompt rendered and tokenised,
its exact length checked), so the decode loop only generates. Each prepared request becomes one
job of the :class:`~.scheduler.BatchScheduler`, which admits it into the running batch between
two decode steps; a plain request waits for its result, a streamed one relays the engine's deltas
as ``chat.completion.chunk`` events. If the client goes away the job is cancelled, which frees its
row in the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import LlavamedError
from .api_errors import APIError
from .backend import Backend, ClientGone, RequestContext, sse
from .config import ServeConfig
from .engine_proc import EngineDied
from .protocol import ParsedChat, chunk_body, completion_body, decode_images
from .scheduler import BatchScheduler, Job, QueueFull, SchedulerClosed

__all__ = ["NativeBackend", "RequestContext", "ClientGone", "map_engine_error", "sse"]

log = logging.getLogger("llavamed.serve")


def map_engine_error(exc: BaseException) -> APIError:
    """The API error for an exception raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SchedulerClosed):
        return APIError(503, "the server is shutting down", "server_error", None, "shutting_down")
    if isinstance(exc, EngineDied):
        return APIError(503, str(exc), "server_error", None, "engine_died")
    if isinstance(exc, QueueFull):  # the engine's own queue (several API processes share it)
        return _queue_full()
    if isinstance(exc, LlavamedError):
        # ConfigError/DataError from the engine: the request cannot be rendered or does not fit.
        return APIError(400, exc.message, "invalid_request_error", "messages", "invalid_request")
    return APIError(500, "internal error while generating; see the server log", "server_error",
                    None, "internal_error")


def _queue_full(queued: int | None = None) -> APIError:
    many = f" ({queued} requests queued)" if queued is not None else ""
    return APIError(429, f"the server is busy{many}; retry shortly", "rate_limit_error", None,
                    "queue_full", headers={"Retry-After": "1"})


def _without_images(messages: list[dict]) -> list[dict]:
    """Messages with image parts reduced to ``{"type": "image"}`` (their pixels are prepared)."""
    return [{**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in messages]


class NativeBackend(Backend):
    """Our :class:`~llavamed_core.infer.engine.Engine` with continuous batching.

    Args:
        config: the server settings.
        engine_loader: builds the engine (default: ``Engine.load`` of ``config.model``).
        link: with several API processes, this one's link to the engine process they share.
    """

    name = "native"

    def __init__(self, config: ServeConfig, engine_loader: Callable[[], Any] | None = None,
                 link: Any = None):
        self.config = config
        self._loader = engine_loader
        self._link = link
        self.engine: Any = None
        """The engine (in this process), or a ``Preparer`` when the model runs in its own process."""
        self.scheduler: Any = None
        """The :class:`BatchScheduler`, or the :class:`~.engine_proc.EngineProcess` that runs one."""
        self.image_token = "<image>"
        self.max_token_chars = 16
        self._process: Any = None

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and requests can be answered."""
        return self.scheduler is not None and self.scheduler.alive

    def api_identity(self) -> dict:
        """With several API processes: this one's index, their count and its process id."""
        if self._link is None:
            return {}
        import os

        return {"api_process": self._link.index, "api_processes": self._link.count, "api_pid": os.getpid()}

    @property
    def failure(self) -> str | None:
        """Why the loaded engine stopped answering (its process died), else ``None``."""
        return self.scheduler.failure if self.scheduler is not None else None

    @property
    def context_length(self) -> int | None:
        """The model's context length, once loaded."""
        return getattr(self.engine, "context_length", None)

    def start(self) -> None:
        """Load the engine and start the batching worker (blocking; run in a thread).

        With an ``engine_loader`` the engine runs in this process; otherwise the model and the
        decode loop run in an engine process of their own (:mod:`.engine_proc`) and this process
        keeps a ``Preparer`` on the engine's processor.
        """
        if self._loader is not None:
            engine = self._loader()
        else:
            from .engine_proc import EngineProcess

            self._process = EngineProcess(self.config, self._link)
            engine = self._process.start()
        self.engine = engine
        self.image_token = getattr(engine.processor, "image_token", None) or "<image>"
        # The longest token's spelling bounds the characters one token can cover, so a text over
        # context_length * max_token_chars characters cannot fit, and is refused untokenised.
        self.max_token_chars = max(1, max((len(t) for t in engine.tokenizer.get_vocab()), default=16))
        from ..infer.engine import ChatRequest

        engine.prepare(ChatRequest([{"role": "user", "content": "ready?"}]))  # warm the preparer
        if self._process is not None:
            self.scheduler = self._process
            return
        self.scheduler = BatchScheduler(engine, max_batch=self.config.max_batch,
                                        max_wait_ms=self.config.max_wait_ms,
                                        join_wait_ms=self.config.join_wait_ms,
                                        max_queue=self.config.limits.max_queue)

    def close(self) -> None:
        """Stop the batching worker or the engine process (queued requests get 503)."""
        if self.scheduler is not None:
            self.scheduler.close()
        elif self._process is not None:  # still loading
            self._process.close()

    def stats(self) -> dict:
        """Scheduler counters for ``/health``."""
        if self.scheduler is None:
            return {}
        s = self.scheduler.stats
        out = {"queued": self.scheduler.queued, "batches": s.batches, "requests": s.requests,
               "max_batch_seen": s.max_batch_seen, "cancelled": s.cancelled,
               "failed_batches": s.failed_batches, "retried_alone": s.retried_alone, "steps": s.steps}
        if self._process is not None:
            out["engine_pid"] = self._process.pid
        out.update(self.api_identity())  # which of several API processes answered
        return out

    def precheck(self, chat: ParsedChat) -> None:
        """Cheap checks on the event loop, before any tokenising or image work.

        Raises:
            APIError: 400 ``context_length_exceeded`` when the text has more characters than the
                context could hold even at the longest token per position; 400
                ``image_token_in_text`` when a text contains the model's image placeholder.
        """
        ctx = self.engine.context_length
        parts = chat.text_parts()
        chars = sum(len(text) for _param, text in parts)
        bound = ctx * self.max_token_chars
        if chars > bound:
            raise APIError(400, f"the messages hold {chars:,} characters of text; this model's context "
                                f"of {ctx:,} tokens holds at most {bound:,} characters ({self.max_token_chars} "
                                f"per token at most); shorten the conversation", "invalid_request_error",
                           "messages", "context_length_exceeded")
        for param, text in parts:
            if self.image_token in text:
                raise APIError(400, f"{param}: the text contains '{self.image_token}', the model's image "
                                    f"placeholder; send images as image_url parts (the server places "
                                    f"them) and remove '{self.image_token}' from the text",
                               "invalid_request_error", param, "image_token_in_text")

    def prepare(self, chat: ParsedChat) -> None:
        """Decode the images and build the engine's prepared request (blocking; runs in one of the
        preparation threads, never the generation thread). Sets ``chat.engine_request``.

        Raises:
            APIError: 400 for an image that cannot be used, a prompt over the context length or
                any other request the engine refuses.
        """
        decode_images(chat, self.config.limits)
        request = self._engine_request(chat)
        try:
            request.prepared = self.engine.prepare(request)
        except LlavamedError as exc:
            code = "context_length_exceeded" if "context length" in exc.message else "invalid_request"
            raise APIError(400, exc.message + (f"; {exc.hint}" if exc.hint else ""),
                           "invalid_request_error", "messages", code) from None
        # The pixels now live in the prepared tensors: let the decoded images go.
        request.messages = _without_images(request.messages)
        for ref in chat.images:
            ref.image = None
        chat.engine_request = request

    def _engine_request(self, chat: ParsedChat) -> Any:
        from ..infer.engine import ChatRequest, GenerationParams

        params = GenerationParams(max_new_tokens=chat.max_tokens or self.config.limits.max_tokens,
                                  temperature=chat.temperature, top_p=chat.top_p,
                                  stop=list(chat.stop), seed=chat.seed,
                                  frequency_penalty=chat.frequency_penalty,
                                  presence_penalty=chat.presence_penalty,
                                  repetition_penalty=chat.repetition_penalty)
        return ChatRequest(messages=chat.engine_messages(), params=params)

    def _submit(self, chat: ParsedChat, sink: Callable[[str, Any], None], stream: bool) -> Job:
        assert self.scheduler is not None
        if chat.engine_request is None:
            raise RuntimeError("the request was not prepared")
        try:
            return self.scheduler.submit(chat.engine_request, sink, stream=stream)
        except QueueFull:
            raise _queue_full(self.scheduler.max_queue) from None
        except (SchedulerClosed, EngineDied) as exc:
            raise map_engine_error(exc) from None

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
