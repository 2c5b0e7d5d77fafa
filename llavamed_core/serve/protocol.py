"""The OpenAI chat-completions protocol: parse and check a request, shape responses and chunks.

:func:`parse_chat_request` validates a JSON body against the pydantic schema (:mod:`.schema`:
schema errors → 422, unsupported fields → 400) and the server's limits, and turns it into the
:class:`ParsedChat` the backends take; :func:`fetch_remote_images` then downloads its remote
images and :func:`decode_images` (in a worker thread) decodes them all. A request for ``n``
choices is run as ``n`` single-choice requests (:meth:`ParsedChat.for_choice`, see
:mod:`.choices`). Responses follow the ``chat.completion`` and ``chat.completion.chunk`` objects
of the OpenAI API (docs/formats.md, "OpenAI-compatible chat API").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from .api_errors import bad_request
from .config import INLINE_PREP_PIXELS, RemoteImagePolicy, ServeLimits
from .images import (decode_data_url, fetch_remote_image, image_pixels, is_medical, is_remote_url,
                     open_image, png_data_url, to_data_url)
from .schema import SEED_MAX, ChatCompletionRequest, ImagePart, validation_error

__all__ = ["ImageRef", "ParsedChat", "parse_json_body", "parse_chat_request", "fetch_remote_images",
           "quick_to_prepare", "decode_images", "completion_body", "chunk_body", "redact_body"]


@dataclass
class ImageRef:
    """One image of a request: where it came from and, once loaded, its bytes and pixels."""

    param: str
    """The request field (``messages[0].content[1].image_url``), for error messages."""
    url: str
    """The data URL or ``http(s)`` URL as sent."""
    data: bytes = b""
    """The encoded image, once loaded."""
    media_type: str = "image/*"
    """Its media type."""
    image: Any = None
    """The decoded RGB ``PIL.Image``, once loaded."""


@dataclass
class ParsedChat:
    """A checked chat request."""

    model: str | None
    """The ``model`` field, or ``None`` when omitted."""
    messages: list[dict]
    """Messages with content as a string or a list of ``{"type": "text", "text"}`` and
    ``{"type": "image", "ref": ImageRef}`` parts."""
    max_tokens: int | None = None
    """``max_tokens`` (or ``max_completion_tokens``), ``None`` when omitted."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    seed: int | None = None
    """Sampling seed."""
    stream: bool = False
    """Answer as Server-Sent Events."""
    include_usage: bool = False
    """With ``stream``, send a last chunk carrying ``usage``."""
    n: int = 1
    """Choices asked for; the backends only ever see 1 (see :meth:`for_choice`)."""
    frequency_penalty: float = 0.0
    """OpenAI ``frequency_penalty`` (−2..2): subtracted from a token's logit once per time the
    token was generated so far."""
    presence_penalty: float = 0.0
    """OpenAI ``presence_penalty`` (−2..2): subtracted from a token's logit once it was generated."""
    repetition_penalty: float = 1.0
    """``repetition_penalty`` (> 0; vLLM, transformers): logits of tokens in the prompt or the
    answer so far are divided by it when positive, multiplied when negative; 1 = off."""
    engine_request: Any = None
    """The backend's ready-to-run request, once prepared (native: a prepared ``ChatRequest``)."""

    def for_choice(self, i: int) -> "ParsedChat":
        """Choice ``i`` of an ``n``-choice request as a request of its own: ``n`` = 1, the seed
        ``seed + i`` (wrapping past 2**64-1) so that each choice is reproducible and differs from
        the others, fresh image references (each choice is prepared on its own), usage always
        counted."""
        seed = None if self.seed is None else self.seed + i
        if seed is not None and seed > SEED_MAX:
            seed -= 2 ** 64
        messages = [{**m, "content": [{**p, "ref": replace(p["ref"])} if p["type"] == "image" else p
                                      for p in m["content"]]} if isinstance(m["content"], list) else m
                    for m in self.messages]
        return replace(self, messages=messages, seed=seed, n=1, include_usage=True, engine_request=None)

    def text_parts(self) -> list[tuple[str, str]]:
        """``(param, text)`` of every text in the messages, ``param`` naming its request field."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m["content"], str):
                out.append((f"messages[{i}].content", m["content"]))
            else:
                out += [(f"messages[{i}].content[{j}].text", p["text"])
                        for j, p in enumerate(m["content"]) if p["type"] == "text"]
        return out

    @property
    def images(self) -> list[ImageRef]:
        """The request's images in order."""
        return [p["ref"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image"]

    def engine_messages(self) -> list[dict]:
        """Transformers chat messages, images as ``{"type": "image", "image": PIL.Image}``."""
        out = []
        for m in self.messages:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image", "image": p["ref"].image} if p["type"] == "image" else p
                           for p in content]
            out.append({"role": m["role"], "content": content})
        return out

    def openai_messages(self) -> list[dict]:
        """OpenAI messages with every image inlined as a data URL (remote ones already fetched)."""
        out = []
        for m in self.messages:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {"url": _inline_url(p["ref"])}}
                           if p["type"] == "image" else p for p in content]
            out.append({"role": m["role"], "content": content})
        return out


def _inline_url(ref: ImageRef) -> str:
    if ref.image is not None and is_medical(ref.data, ref.media_type):
        return png_data_url(ref.image)  # DICOM/NIfTI: forward the rendered picture, not the file
    return to_data_url(ref.data, ref.media_type) if is_remote_url(ref.url) else ref.url


def parse_json_body(raw: bytes) -> dict:
    """Parse a request body as a JSON object.

    Raises:
        APIError: 400 when it is not JSON or not an object.
    """
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text", None, "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          None, "invalid_json")
    return body


def parse_chat_request(body: dict, limits: ServeLimits) -> ParsedChat:
    """Check a chat-completions body against the schema and this server's limits.

    Args:
        body: the parsed JSON object.
        limits: the server's caps (images per request, ``max_tokens``, ``n``).

    Returns:
        The checked request; its images are referenced, not yet loaded (see :func:`decode_images`).

    Raises:
        APIError: 422 for a body that breaks the schema, 400 for an unsupported field, ``n`` over
            the cap or too many images.
    """
    try:
        req = ChatCompletionRequest.model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        raise validation_error(exc) from None
    messages = []
    for i, m in enumerate(req.messages):
        content: Any = m.content
        if isinstance(content, list):
            content = [{"type": "image", "ref": ImageRef(param=f"messages[{i}].content[{j}].image_url",
                                                          url=p.image_url)} if isinstance(p, ImagePart)
                       else {"type": "text", "text": p.text} for j, p in enumerate(content)]
        messages.append({"role": m.role, "content": content})
    opts = req.stream_options
    chat = ParsedChat(
        model=req.model, messages=messages,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=list(req.stop or []), seed=req.seed,
        stream=bool(req.stream), include_usage=bool(opts and opts.include_usage), n=req.n or 1,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty)
    n_images = len(chat.images)
    if n_images > limits.max_images:
        raise bad_request(f"the request has {n_images} images, over this server's limit of "
                          f"{limits.max_images} per request", "messages", "too_many_images")
    return chat


async def fetch_remote_images(chat: ParsedChat, limits: ServeLimits, policy: RemoteImagePolicy,
                              client: Any) -> None:
    """Download the ``http(s)`` images of ``chat`` (when the policy allows them), in place.

    Raises:
        APIError: 400 for a remote image that is refused or cannot be fetched.
    """
    for ref in chat.images:
        if is_remote_url(ref.url):
            ref.data, ref.media_type = await fetch_remote_image(ref.url, ref.param, policy, limits, client)


INLINE_PREP_URL_CHARS = 1 << 20
"""Longest data URL (characters) base64-decoded on the event loop to read its image's header."""


def quick_to_prepare(chat: ParsedChat, limits: ServeLimits, max_pixels: int = INLINE_PREP_PIXELS) -> bool:
    """Whether ``chat`` is cheap enough to prepare on the event loop: at most ``max_pixels``
    (``--inline-prep-pixels``, default :data:`INLINE_PREP_PIXELS`) pixels in all, no DICOM/NIfTI
    rendering (read from the images' headers, after base64-decoding data URLs of at most
    :data:`INLINE_PREP_URL_CHARS`). With ``max_pixels=0`` only a request without images is.

    A small request prepares in about a millisecond, less than handing it to a preparation
    thread costs under load (the thread waits for the event loop's interpreter lock each time
    Pillow releases it); a large or medical image goes to the threads, so that it never stalls
    the event loop. The decoded bytes are kept for :func:`decode_images`.

    Raises:
        APIError: 400 for a data URL or image header that cannot be used (as decoding would).
    """
    if chat.images and max_pixels <= 0:
        return False
    pixels = 0
    for r in chat.images:
        if not r.data:
            if is_remote_url(r.url) or len(r.url) > INLINE_PREP_URL_CHARS:
                return False
            r.data, r.media_type = decode_data_url(r.url, r.param, limits)
        if is_medical(r.data, r.media_type):
            return False
        pixels += image_pixels(r.data, r.param)
        if pixels > max_pixels:
            return False
    return True


def decode_images(chat: ParsedChat, limits: ServeLimits) -> None:
    """Decode every image of ``chat`` in place (blocking: run it in a worker thread unless
    :func:`quick_to_prepare` says otherwise).

    Data URLs are base64-decoded (unless already); each image's size is checked from its header
    before decoding.

    Raises:
        APIError: 400 for any image that cannot be used.
    """
    for r in chat.images:
        if not r.data and not is_remote_url(r.url):
            r.data, r.media_type = decode_data_url(r.url, r.param, limits)
        r.image = open_image(r.data, r.param, limits, r.media_type)


def completion_body(request_id: str, model: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A ``chat.completion`` object."""
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_body(request_id: str, model: str, created: int, delta: dict | None,
               finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """A ``chat.completion.chunk`` object (``delta=None`` → the usage-only last chunk)."""
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                            "model": model}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
    if usage is not None:
        body["usage"] = usage
    return body


def redact_body(body: Any) -> Any:
    """A copy of a request body with image data replaced by its length, for ``--log-requests``."""
    if isinstance(body, dict):
        out = {}
        for k, v in body.items():
            if k == "url" and isinstance(v, str) and v[:5].lower() == "data:":
                out[k] = f"{v.partition(',')[0]},<{len(v.partition(',')[2]):,} base64 chars>"
            else:
                out[k] = redact_body(v)
        return out
    if isinstance(body, list):
        return [redact_body(v) for v in body]
    if isinstance(body, str) and body[:5].lower() == "data:" and ";base64," in body[:100]:
        return f"{body.partition(',')[0]},<{len(body.partition(',')[2]):,} base64 chars>"
    return body


def now() -> int:
    """Seconds since the epoch, as the ``created`` field wants."""
    return int(time.time())
