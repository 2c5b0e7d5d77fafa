"""The OpenAI chat-completions protocol: parse and check a request, shape responses and chunks.

:func:`parse_chat_request` turns a JSON body into a :class:`ParsedChat` (schema errors → 422,
body/image errors → 400, see :mod:`.api_errors`); :func:`fetch_remote_images` then downloads its
remote images and :func:`decode_images` (in a worker thread) decodes them all. Responses follow the ``chat.completion`` and ``chat.completion.chunk`` objects of the
OpenAI API (docs/formats.md, "OpenAI-compatible chat API").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .api_errors import bad_request, invalid_field
from .config import RemoteImagePolicy, ServeLimits
from .images import (decode_data_url, fetch_remote_image, is_medical, is_remote_url, open_image,
                     png_data_url, to_data_url)

__all__ = ["ImageRef", "ParsedChat", "parse_json_body", "parse_chat_request", "fetch_remote_images",
           "decode_images", "completion_body", "chunk_body", "redact_body"]

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOP = 4
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # the range a sampler seed can take


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
    engine_request: Any = None
    """The backend's ready-to-run request, once prepared (native: a prepared ``ChatRequest``)."""

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise invalid_field(f"'{name}' must be a number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v != v or v in (float("inf"), float("-inf")):
        raise invalid_field(f"'{name}' must be a finite number, got {v}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise invalid_field(f"'{name}' must be in {bound}, got {v:g}", name)
    return float(v)


def parse_chat_request(body: dict, limits: ServeLimits) -> ParsedChat:
    """Check a chat-completions body against the schema and this server's limits.

    Args:
        body: the parsed JSON object.
        limits: the server's caps (images per request, ``max_tokens``).

    Returns:
        The checked request; its images are referenced, not yet loaded (see :func:`load_images`).

    Raises:
        APIError: 422 for schema violations and unsupported options, 400 for too many images.
    """
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_field("'model' must be a string", "model", "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list):
        what = "is missing" if messages is None else f"must be a list, got {type(messages).__name__}"
        raise invalid_field(f"'messages' {what}", "messages", "invalid_type")
    if not messages:
        raise invalid_field("'messages' is empty; send at least one user message", "messages",
                            "empty_messages")
    parsed_messages = [_parse_message(m, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "user" for m in parsed_messages):
        raise invalid_field("'messages' has no user message", "messages", "no_user_message")

    chat = ParsedChat(model=model, messages=parsed_messages)
    n_images = len(chat.images)
    if n_images > limits.max_images:
        raise bad_request(f"the request has {n_images} images, over this server's limit of "
                          f"{limits.max_images} per request", "messages", "too_many_images")

    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(name)
    if mt is not None:
        if not _is_int(mt):
            raise invalid_field(f"'{name}' must be an integer, got {json.dumps(mt)[:40]}", name, "invalid_type")
        if mt < 1:
            raise invalid_field(f"'{name}' must be at least 1, got {mt}", name)
        if mt > limits.max_tokens:
            raise invalid_field(f"'{name}' is {mt}, over this server's limit of {limits.max_tokens}",
                                name, "max_tokens_too_large")
        chat.max_tokens = mt
    chat.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    chat.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise invalid_field("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
        if len(stop) > _MAX_STOP:
            raise invalid_field(f"'stop' has {len(stop)} strings; at most {_MAX_STOP} are allowed", "stop")
        chat.stop = list(stop)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise invalid_field("'seed' must be an integer", "seed", "invalid_type")
        if not _SEED_MIN <= seed <= _SEED_MAX:
            raise invalid_field(f"'seed' must be between -2**63 and 2**64-1, got {str(seed)[:40]}",
                                "seed")
        chat.seed = seed
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid_field(f"only n=1 is supported, got n={json.dumps(n)[:20]}", "n", "unsupported_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_field("'stream' must be true or false", "stream", "invalid_type")
    chat.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid_field("'stream_options' must be an object", "stream_options", "invalid_type")
        chat.include_usage = bool(opts.get("include_usage", False))
    if body.get("logprobs"):
        raise invalid_field("'logprobs' is not supported by this server", "logprobs", "unsupported_value")
    for key in ("tools", "functions"):
        if body.get(key):
            raise invalid_field(f"'{key}' (function calling) is not supported by this server", key,
                                "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid_field("only response_format {\"type\": \"text\"} is supported", "response_format",
                            "unsupported_value")
    return chat


def _parse_message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid_field(f"'{where}' must be an object", where, "invalid_type")
    role = m.get("role")
    if role not in _ROLES:
        raise invalid_field(f"'{where}.role' must be one of system, user, assistant; got "
                            f"{json.dumps(role)[:30]}", f"{where}.role")
    role = _ROLES[role]
    content = m.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid_field(f"'{where}.content' must be a string or a list of parts", f"{where}.content",
                            "invalid_type")
    parts: list[dict] = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise invalid_field(f"'{pwhere}' must be an object", pwhere, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid_field(f"'{pwhere}.text' must be a string", f"{pwhere}.text", "invalid_type")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise invalid_field(f"'{pwhere}': images are only accepted in user messages", pwhere,
                                    "unsupported_value")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise invalid_field(f"'{pwhere}.image_url.url' must be a non-empty string",
                                    f"{pwhere}.image_url", "invalid_type")
            parts.append({"type": "image", "ref": ImageRef(param=f"{pwhere}.image_url", url=url)})
        else:
            raise invalid_field(f"'{pwhere}.type' must be 'text' or 'image_url', got "
                                f"{json.dumps(kind)[:30]}", f"{pwhere}.type", "unsupported_value")
    return {"role": role, "content": parts}


async def fetch_remote_images(chat: ParsedChat, limits: ServeLimits, policy: RemoteImagePolicy,
                              client: Any) -> None:
    """Download the ``http(s)`` images of ``chat`` (when the policy allows them), in place.

    Raises:
        APIError: 400 for a remote image that is refused or cannot be fetched.
    """
    for ref in chat.images:
        if is_remote_url(ref.url):
            ref.data, ref.media_type = await fetch_remote_image(ref.url, ref.param, policy, limits, client)


def decode_images(chat: ParsedChat, limits: ServeLimits) -> None:
    """Decode every image of ``chat`` in place (blocking: run it in a worker thread).

    Data URLs are base64-decoded; each image's size is checked from its header before decoding.

    Raises:
        APIError: 400 for any image that cannot be used.
    """
    for r in chat.images:
        if not is_remote_url(r.url):
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
