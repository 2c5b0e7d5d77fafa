"""``n`` > 1: one request for ``n`` choices answered as ``n`` single-choice requests, merged.

Choice ``i`` is the request with ``n`` = 1 and seed ``seed + i`` (:meth:`ParsedChat.for_choice`),
prepared and generated as a request of its own, so it joins the running batch like any other and
both engines answer it the same way (vLLM's own ``n`` draws every choice from one seed, which the
native engine cannot reproduce). The answers are merged into one ``chat.completion`` (choices
``0..n-1``; ``usage.prompt_tokens`` counted once, as OpenAI and vLLM report it, completion tokens
summed), or one stream whose chunks carry each choice's ``index``. The first failure fails the
whole request and cancels the other choices; so does the client going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from .backend import Backend, RequestContext, sse
from .protocol import ParsedChat, chunk_body

__all__ = ["split_choices", "complete_choices", "stream_choices", "merge_completions", "sse_events"]


def split_choices(chat: ParsedChat, body: dict) -> list[tuple[ParsedChat, dict]]:
    """The ``n`` single-choice requests of ``chat``: each its :class:`ParsedChat` and the body a
    proxying backend forwards (``n`` 1, the choice's seed, usage asked for when streamed)."""
    out = []
    for i in range(chat.n):
        sub = chat.for_choice(i)
        sub_body = {**body, "n": 1}
        if sub.seed is not None:
            sub_body["seed"] = sub.seed
        if chat.stream:
            sub_body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        out.append((sub, sub_body))
    return out


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def merge_completions(results: list[dict], request_id: str) -> dict:
    """One ``chat.completion`` from the single-choice answers, choice ``i`` from ``results[i]``."""
    merged = dict(results[0], id=request_id)
    merged["choices"] = [{**r["choices"][0], "index": i} for i, r in enumerate(results)]
    usages = [r.get("usage") or {} for r in results]
    merged["usage"] = _usage(usages[0].get("prompt_tokens") or 0,
                             sum(u.get("completion_tokens") or 0 for u in usages))
    return merged


def _note(record: dict, usage: dict, finishes: list) -> None:
    record.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                  finish=",".join(str(f) for f in finishes))


async def complete_choices(backend: Backend, subs: list[tuple[ParsedChat, dict]],
                           ctxs: list[RequestContext], request_id: str, record: dict) -> dict:
    """Run the choices together and merge them.

    Raises:
        APIError: the first choice that failed (the others are cancelled).
        ClientGone: the client went away (all choices are cancelled).
    """
    tasks = [asyncio.ensure_future(backend.complete(sub, ctx, body)) for (sub, body), ctx in zip(subs, ctxs)]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    merged = merge_completions(results, request_id)
    _note(record, merged["usage"], [c.get("finish_reason") for c in merged["choices"]])
    return merged


async def stream_choices(backend: Backend, subs: list[tuple[ParsedChat, dict]],
                         ctxs: list[RequestContext], chat: ParsedChat, request_id: str, model: str,
                         created: int, record: dict) -> AsyncIterator[bytes]:
    """Queue every choice's stream and return the merged SSE byte stream.

    Raises (before the stream starts):
        APIError: a choice could not be queued (429, ...); those already queued are cancelled.
    """
    streams: list[Any] = []
    try:
        for (sub, body), ctx in zip(subs, ctxs):
            streams.append(await backend.stream(sub, ctx, body))
    except BaseException:
        for s in streams:
            await _discard(s)
        raise
    return _merged(streams, chat, request_id, model, created, record)


async def _discard(stream: Any) -> None:
    # A stream that was never iterated has not run its own clean-up (which cancels its job):
    # start it, then close it.
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(stream.__anext__(), 5)
    with contextlib.suppress(Exception):
        await stream.aclose()


async def sse_events(stream: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The ``data:`` payloads of a Server-Sent Events byte stream, however its bytes are cut."""
    buf = b""
    async for chunk in stream:
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = [line[5:].lstrip() for line in event.replace(b"\r\n", b"\n").split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data).decode("utf-8", errors="replace")


async def _merged(streams: list[Any], chat: ParsedChat, request_id: str, model: str, created: int,
                  record: dict) -> AsyncIterator[bytes]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for data in sse_events(stream):
                await queue.put((i, data))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    usages: list[dict] = [{} for _ in streams]
    finishes: list[Any] = [None] * len(streams)
    running = len(streams)
    try:
        while running:
            i, data = await queue.get()
            if data is None:
                running -= 1
                continue
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:  # one choice failed: so does the request
                record.update(status_in_stream=event["error"].get("code"), code=event["error"].get("code"))
                yield sse(event)
                yield sse("[DONE]")
                return
            if event.get("usage"):
                usages[i] = event["usage"]
            if not event.get("choices"):
                continue
            for choice in event["choices"]:
                choice["index"] = i
                if choice.get("finish_reason"):
                    finishes[i] = choice["finish_reason"]
            event.pop("usage", None)
            yield sse({**event, "id": request_id, "model": model, "created": created})
        usage = _usage(usages[0].get("prompt_tokens") or 0,
                       sum(u.get("completion_tokens") or 0 for u in usages))
        _note(record, usage, finishes)
        if chat.include_usage:
            yield sse(chunk_body(request_id, model, created, None, usage=usage))
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
