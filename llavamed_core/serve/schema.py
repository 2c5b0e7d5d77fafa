"""The chat-completions request as pydantic models, and their errors as OpenAI-style API errors.

:class:`ChatCompletionRequest` is the schema of ``POST /v1/chat/completions``: types are strict
(``"1"`` is not a number, ``true`` is not an integer), values are range-checked, and fields that
would change the answer but are not implemented (``tools``, ``logprobs``, ``response_format``
other than text, ...) are refused by name, while harmless client fields (``user``, ``store``,
``metadata``, ...) are accepted and ignored. Server limits (``max_tokens``, ``n``) come in the
validation context (``context={"limits": ServeLimits}``).

:func:`validation_error` turns the first error of a ``pydantic.ValidationError`` into one
:class:`~.api_errors.APIError` naming the field as a path (``messages[0].content[1].text``):
422 for a body that breaks the schema, 400 for an unsupported field or a value over this
server's ``n`` cap. The app validates the parsed body itself rather than declaring the model as a
FastAPI body parameter, because FastAPI would read and parse the body before the route runs:
before the API-key, content-type, size and read-time checks that must come first.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .api_errors import APIError

__all__ = ["ChatCompletionRequest", "Message", "TextPart", "ImagePart", "validation_error", "ROLES",
           "SEED_MIN", "SEED_MAX"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Accepted roles and what each becomes (``developer`` is the newer name for ``system``)."""
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # the range a sampler seed can take
_MAX_STOP = 4
_P = "{param}"  # replaced by the field's path when the error is answered

# Error types of our own (the error's ``code``); those in _BAD_REQUEST are answered 400, the rest
# 422. OpenAI answers an unsupported parameter with 400 ``unsupported_parameter``.
_OURS = {"invalid_type", "invalid_value", "unsupported_value", "empty_messages", "no_user_message",
         "max_tokens_too_large", "n_too_large", "unsupported_parameter"}
_BAD_REQUEST = {"unsupported_parameter", "n_too_large"}


def _refuse(code: str, message: str, at: str | None = None, **ctx: Any) -> PydanticCustomError:
    """A validation error with our code; ``{param}`` in ``message`` becomes the field's path
    (``at`` appended to it for an error found on a part of the value)."""
    return PydanticCustomError(code, message, {**ctx, "at": at} if at else ctx)


def _show(v: Any) -> str:
    """A value for an error message, short."""
    if isinstance(v, float):
        return f"{v:g}"
    try:
        return json.dumps(v, ensure_ascii=False)[:40]
    except (TypeError, ValueError):
        return type(v).__name__


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """``{"type": "image_url", "image_url": {"url": ...}}`` (a bare URL string is accepted too)."""

    type: Literal["image_url"]
    image_url: str
    """The data URL or ``http(s)`` URL."""

    @field_validator("image_url", mode="before")
    @classmethod
    def _url(cls, v: Any) -> Any:
        url = v.get("url") if isinstance(v, dict) else v
        if not isinstance(url, str) or not url:
            raise _refuse("invalid_type", f"'{_P}.url' must be a non-empty string")
        return url


class _OtherPart(_Strict):
    """Any other content part: refused with what was sent."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_it(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise _refuse("invalid_type", f"'{_P}' must be an object")
        raise _refuse("unsupported_value", f"'{_P}.type' must be 'text' or 'image_url', got {{got}}", "type",
                      got=_show(v.get("type"))[:30])


def _part_tag(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else None
    return f"~{kind}" if kind in ("text", "image_url") else "~other"


def _content_tag(v: Any) -> str | None:
    return "~str" if isinstance(v, str) else "~parts" if isinstance(v, list) else "~none" if v is None else None


# Tags start with "~" so that validation_error can drop them from the field path.
Part = Annotated[Union[Annotated[TextPart, Tag("~text")], Annotated[ImagePart, Tag("~image_url")],
                       Annotated[_OtherPart, Tag("~other")]], Discriminator(_part_tag)]
Content = Annotated[Union[Annotated[str, Tag("~str")], Annotated[list[Part], Tag("~parts")],
                          Annotated[None, Tag("~none")]],
                    Discriminator(_content_tag, custom_error_type="invalid_type",
                                  custom_error_message=f"'{_P}' must be a string or a list of parts")]


class Message(_Strict):
    """One chat message; ``role`` is normalised (``developer`` → ``system``)."""

    role: str
    content: Content = None
    """A string, a list of parts, or ``None`` (only for an assistant turn: tool-call history,
    read as empty text)."""

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise _refuse("invalid_value", f"'{_P}' must be one of system, user, assistant; got {{got}}",
                          got=_show(v)[:30])
        return ROLES[v]

    @model_validator(mode="after")
    def _content_fits_role(self) -> "Message":
        if self.content is None:
            if self.role != "assistant":
                raise _refuse("invalid_type", f"'{_P}.content' must be a string or a list of parts", "content")
            self.content = ""
        elif isinstance(self.content, list) and self.role != "user":
            for j, part in enumerate(self.content):
                if isinstance(part, ImagePart):
                    raise _refuse("unsupported_value", f"'{_P}.content[{j}]': images are only accepted in "
                                  f"user messages", f"content[{j}]")
        return self


class StreamOptions(_Strict):
    """``stream_options``: only ``include_usage`` is read."""

    include_usage: bool | None = None
    """With ``stream``, send a last chunk carrying ``usage``."""


# Fields capped by a server limit: (ServeLimits attribute, error code, unit in the message).
_CAPS = {"max_tokens": ("max_tokens", "max_tokens_too_large", ""),
         "max_completion_tokens": ("max_tokens", "max_tokens_too_large", ""),
         "n": ("max_n", "n_too_large", " choices per request")}


# Fields that would change the answer and are not implemented, refused by name (400) unless they
# ask for nothing: (what they are for, the values that ask for nothing, what to say is accepted).
_UNSUPPORTED = {
    "tools": ("function calling", ([],), None),
    "functions": ("function calling", ([],), None),
    "tool_choice": ("function calling", ("none",), '"none"'),
    "function_call": ("function calling", ("none",), '"none"'),
    "response_format": ("structured output", ({"type": "text"},), '{"type": "text"}'),
    "logprobs": ("log probabilities", (False,), None),
    "top_logprobs": ("log probabilities", (0,), None),
    "logit_bias": ("token biases", ({},), None),
    "modalities": ("output other than text", (["text"],), '["text"]'),
    "audio": ("audio output", (), None),
    "web_search_options": ("web search", (), None),
    # vLLM's sampling extensions: `--engine vllm` would honour them and the native engine would not,
    # so the two engines would answer one request differently. Refused unless they ask for nothing.
    "top_k": ("top-k sampling", (-1, 0), None),
    "min_p": ("min-p sampling", (0, 0.0), None),
    "min_tokens": ("a minimum answer length", (0,), None),
    "best_of": ("best-of sampling", (1,), None),
    "use_beam_search": ("beam search", (False,), None),
    "guided_json": ("guided decoding", (), None),
    "guided_regex": ("guided decoding", (), None),
    "guided_choice": ("guided decoding", (), None),
    "guided_grammar": ("guided decoding", (), None),
}


def _limits(info: ValidationInfo) -> Any:
    return (info.context or {}).get("limits")


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (the OpenAI fields this server reads or refuses)."""

    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stop: list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Not implemented (see _UNSUPPORTED): refused unless they ask for nothing.
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None
    top_k: Any = None
    min_p: Any = None
    min_tokens: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise _refuse("empty_messages", f"'{_P}' is empty; send at least one user message")
        if not any(m.role == "user" for m in v):
            raise _refuse("no_user_message", f"'{_P}' has no user message")
        return v

    @field_validator("max_tokens", "max_completion_tokens", "n")
    @classmethod
    def _under_cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        attr, code, unit = _CAPS[info.field_name]
        if v is not None and limits is not None and v > getattr(limits, attr):
            raise _refuse(code, f"'{_P}' is {v}, over this server's limit of {getattr(limits, attr)}{unit}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) and s for s in v)):
            raise _refuse("invalid_type", f"'{_P}' must be a non-empty string or a list of them")
        if v is not None and len(v) > _MAX_STOP:
            raise _refuse("invalid_value", f"'{_P}' has {len(v)} strings; at most {_MAX_STOP} are allowed")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_MIN <= v <= SEED_MAX:
            raise _refuse("invalid_value", f"'{_P}' must be between -2**63 and 2**64-1, got {str(v)[:40]}")
        return v

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        what, harmless, accepted = _UNSUPPORTED[info.field_name]
        if v is None or v in harmless:
            return None
        tail = f"; only {accepted} is accepted" if accepted else ""
        raise _refuse("unsupported_parameter", f"'{_P}' ({what}) is not supported by this server, got "
                      f"{_show(v)}{tail}")


_KINDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
          "bool_type": "true or false", "list_type": "a list", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object", "none_required": "null"}
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
           "greater_than": ("greater than", "gt"), "less_than": ("less than", "lt")}


def _path(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith("~"):  # union tags are not fields
            out += f".{p}" if out else str(p)
    return out


def validation_error(exc: ValidationError) -> APIError:
    """The API error for the first problem pydantic found (422, or 400 for an unsupported field)."""
    err = exc.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    base = _path(err["loc"])
    at = ctx.get("at") or ""
    param = base + at if at.startswith("[") or not (base and at) else f"{base}.{at}"
    kind, value = err["type"], err.get("input")
    code, status = kind, 422
    if kind in _OURS:
        message = err["msg"].replace(_P, base)
        status = 400 if kind in _BAD_REQUEST else 422
    elif kind == "missing":
        message, code = f"'{param}' is missing", "invalid_type"
    elif kind in _KINDS:
        message, code = f"'{param}' must be {_KINDS[kind]}, got {_show(value)}", "invalid_type"
    elif kind == "finite_number":
        message, code = f"'{param}' must be a finite number, got {_show(value)}", "invalid_value"
    elif kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        message, code = f"'{param}' must be {words} {_show(ctx.get(key))}, got {_show(value)}", "invalid_value"
    else:
        message, code = f"'{param}': {err['msg']}", "invalid_value"
    return APIError(status, message, "invalid_request_error", param or None, code)
