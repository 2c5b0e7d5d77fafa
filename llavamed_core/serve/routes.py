"""The API routes of ``llavamed serve``: chat completions, models, health, image rendering.

A chat request is checked completely before it may join a batch, in this order, each step with
its own status: auth (401); ``Content-Type: application/json`` (415); model loaded (503); body
size (413) and body time (408); JSON (400); schema (422; unsupported fields and ``n`` over the
cap: 400); model name (404); text against the context and no image placeholder (400); remote
images fetched; then images decoded and the prompt tokenised (400): on the event loop when small
(:func:`~.protocol.quick_to_prepare`), else in the preparation threads; queue (429). ``n`` > 1
runs as ``n`` single-choice requests (:mod:`.choices`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .api_errors import APIError
from .choices import complete_choices, split_choices, stream_choices
from .guards import check_auth, check_json, check_ready, read_body
from .backend import ClientGone, RequestContext
from .protocol import (fetch_remote_images, parse_chat_request, parse_json_body, quick_to_prepare,
                       redact_body)

__all__ = ["api_router"]

log = logging.getLogger("llavamed.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def api_router(state: Any) -> APIRouter:
    """The routes, answering from ``state`` (the app's :class:`~.app.ServerState`)."""
    config = state.config
    router = APIRouter()
    model_name = config.model_name  # resolved once: a path resolve per request shows in profiles

    def served(name: str) -> bool:
        return name in (model_name, str(config.model))

    def model_card() -> dict:
        card: dict[str, Any] = {"id": model_name, "object": "model",
                                "created": int(state.started), "owned_by": "llavamed"}
        if state.backend.context_length:
            card["max_model_len"] = state.backend.context_length
        return card

    def not_found(name: str) -> APIError:
        return APIError(404, f"the model '{name[:100]}' does not exist; this server serves "
                             f"'{model_name}'", "invalid_request_error", "model", "model_not_found")

    @router.get("/health")
    async def health() -> Any:
        body: dict[str, Any] = {"model": model_name, "engine": config.engine}
        if state.backend.ready:
            body.update(status="ok", **state.backend.stats())
            return JSONResponse(body)
        if state.error is not None or state.backend.failure:
            body.update(status="failed", error=state.error.message if state.error else state.backend.failure)
        else:
            body.update(status="loading")
        body.update(state.backend.api_identity())  # which of several API processes answered
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})

    @router.get("/v1/models")
    async def models(request: Request) -> Any:
        check_auth(request, config.api_key)
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Any:
        check_auth(request, config.api_key)
        if not served(model_id):
            raise not_found(model_id)
        return model_card()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        rec = request.scope["llavamed.log"]
        check_auth(request, config.api_key)
        check_json(request)
        check_ready(state.backend, state.error is not None)
        body = parse_json_body(await read_body(request, config.limits))
        if config.log_requests:
            log.info("%s body %s", rec["id"], json.dumps(redact_body(body), ensure_ascii=False)[:20000])
        chat = parse_chat_request(body, config.limits)
        rec["stream"] = chat.stream
        if chat.n > 1:
            rec["n"] = chat.n
        if chat.model is not None and not served(chat.model):
            raise not_found(chat.model)
        state.backend.precheck(chat)
        await fetch_remote_images(chat, config.limits, config.remote_images, state.http)
        # base64-decodes small images once, for all choices
        quick = quick_to_prepare(chat, config.limits, config.inline_prep_pixels)
        subs = split_choices(chat, body) if chat.n > 1 else [(chat, body)]
        if quick:  # small images: prepared here, cheaper than a handoff to a thread
            for sub, _ in subs:
                state.backend.prepare(sub)
        else:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(state.prep, state.backend.prepare, sub)
                                   for sub, _ in subs))
        rec["images"] = len(chat.images)
        rec["ingest_ms"] = (time.monotonic() - request.scope["llavamed.t0"]) * 1000
        headers = {"X-Request-Id": rec["id"]}
        if chat.n > 1:
            return await _answer_choices(request, state, chat, subs, rec, headers)

        async def wait_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                continue

        ctx = RequestContext(rec["id"], model_name, rec, wait_disconnect)
        if chat.stream:
            events = await state.backend.stream(chat, ctx, body)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**_SSE_HEADERS, **headers})
        try:
            result = await state.backend.complete(chat, ctx, body)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(result, headers=headers)

    @router.post("/v1/images/render")
    async def render_image(request: Request) -> Any:
        # The picture the model sees for an image data URL ({"url": ...}), as a PNG data URL: the
        # web page shows DICOM/NIfTI uploads through this (the same rendering as `data view`).
        from .images import decode_data_url, open_image, png_data_url

        check_auth(request, config.api_key)
        check_json(request)
        body = parse_json_body(await read_body(request, config.limits))
        url = body.get("url")
        if not isinstance(url, str):
            raise APIError(400, "url: expected an image data URL", "invalid_request_error", "url",
                           "invalid_image_url")

        def render() -> str:
            data, media_type = decode_data_url(url, "url", config.limits)
            return png_data_url(open_image(data, "url", config.limits, media_type))

        return {"url": await asyncio.get_running_loop().run_in_executor(state.prep, render)}

    return router


async def _answer_choices(request: Request, state: Any, chat: Any, subs: list, rec: dict,
                          headers: dict) -> Any:
    """Answer an ``n`` > 1 request: the choices run as requests of their own, one disconnect
    watcher shared by all of them."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            continue

    watcher = asyncio.ensure_future(watch())

    async def wait_disconnect() -> None:
        await asyncio.shield(watcher)

    model = state.config.model_name
    ctxs = [RequestContext(rec["id"], model, {}, wait_disconnect) for _ in subs]
    if chat.stream:
        try:
            events = await stream_choices(state.backend, subs, ctxs, chat, rec["id"], model,
                                          ctxs[0].created, rec)
        except BaseException:
            watcher.cancel()
            raise

        async def relay() -> Any:
            try:
                async for event in events:
                    yield event
            finally:
                watcher.cancel()
                await events.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream", headers={**_SSE_HEADERS, **headers})
    try:
        result = await complete_choices(state.backend, subs, ctxs, rec["id"], rec)
    except ClientGone:
        return Response(status_code=499)
    finally:
        watcher.cancel()
    return JSONResponse(result, headers=headers)
