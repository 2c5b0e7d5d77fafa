"""The engine interface over the OpenAI-compatible chat API (``llavamed serve``, vLLM, hosted models).

:class:`RemoteEngine` has the :class:`~llavamed_core.infer.engine.Engine` calls that ``chat`` and
``eval vqa`` use (``generate``, ``stream``), so those commands run the same code against a
checkpoint in this process or a server. Requests go through the ``openai`` package (its own
retries off; streamed answers parsed by it too) under the one retry policy of
:mod:`llavamed_core.retry`; images travel as PNG data URLs (docs/formats.md); many requests are in
flight at once (``concurrency``) on the shared pool of :mod:`llavamed_core.pool`.

Use::

    remote = RemoteEngine.connect("http://127.0.0.1:8000", api_key=None)
    print(remote.generate([ChatRequest(messages)])[0].text)
"""

from __future__ import annotations

import base64
import contextlib
import io
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ConfigError, LLMError, NetworkError
from ..llm import api_error_message
from ..pool import map_unordered
from ..progress import ProgressCallback, emit
from ..retry import Backoff, RetryPolicy, retry_after_seconds, retryable_status
from .engine import ChatRequest, GenerationResult

__all__ = ["RemoteEngine", "to_openai_messages", "image_data_url", "api_base"]


def api_base(url: str) -> str:
    """The API root of a server URL: ``http://h:8000`` and ``http://h:8000/v1/`` → ``http://h:8000/v1``."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--server {url}: not an http(s) URL", "e.g. --server http://127.0.0.1:8000")
    return url if url.endswith("/v1") else url + "/v1"


def image_data_url(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """transformers chat messages (PIL image parts) → OpenAI chat messages (image_url parts)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(p["image"])}})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text", "")})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


class RemoteEngine:
    """Generation through an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Args:
        base_url: the server (``http://h:8000``) or its API root (``…/v1``).
        model_name: the model name sent with every request.
        api_key: the server's API key (``None``: the server needs none).
        concurrency: requests in flight at once in :meth:`generate`.
        timeout: seconds to wait for one answer (10 s to connect).
        retries: attempts after the first for a failed connection or a retryable status.
        backoff: the first wait between attempts in seconds (doubled each time, with jitter).
        sleep: waits between attempts (tests pass a recorder).
        rng: random source of the backoff jitter.

    Attributes:
        base_url: the API root (ending in ``/v1``).
        model_name: the model name sent with every request.
        context_length: unknown for a server (``0``).
        device: ``"remote"``.
        concurrency: requests in flight at once in :meth:`generate`.
    """

    context_length = 0
    device = "remote"

    def __init__(self, base_url: str, model_name: str, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], object] = time.sleep, rng: random.Random | None = None):
        import openai

        self.base_url = api_base(base_url)
        self.model_name = model_name
        self.concurrency = max(1, int(concurrency))
        self.backoff = Backoff(RetryPolicy(retries=retries, backoff=backoff), sleep, rng)
        # A server without a key accepts any; "EMPTY" is the convention (vLLM's too).
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", max_retries=0,
                                     timeout=openai.Timeout(timeout, connect=10.0))

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, model_name: str | None = None,
                concurrency: int = 8, **kwargs: Any) -> "RemoteEngine":
        """Connect to a server; without ``model_name``, take the first model ``/v1/models`` lists.

        Args:
            url: the server or its API root.
            api_key: the server's API key.
            model_name: the model to ask (default: the server's first).
            concurrency: requests in flight at once.
            **kwargs: the other :class:`RemoteEngine` arguments.

        Raises:
            NetworkError: the server does not answer.
            LLMError: it refuses (bad API key) or lists no model.
        """
        engine = cls(url, model_name or "", api_key=api_key, concurrency=concurrency, **kwargs)
        if not model_name:
            page = engine._call("/models", engine._client.models.list)
            models = [getattr(m, "id", None) for m in (getattr(page, "data", None) or [])]
            models = [m for m in models if isinstance(m, str) and m]
            if not models:
                raise LLMError(f"{engine.base_url}/models lists no model", "pass --model-name")
            engine.model_name = models[0]
        return engine

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP
    def _status_error(self, exc: Any) -> LLMError:
        """The one-line error for a final HTTP status."""
        status, msg = exc.status_code, api_error_message(exc, limit=300)
        if status in (401, 403):
            return LLMError(f"{self.base_url}: the server refused the request ({status}: {msg})",
                            "pass the right --api-key")
        if status == 404 and "model" in msg.lower():
            return LLMError(f"{self.base_url}: {msg}", "check --model-name against GET /v1/models")
        return LLMError(f"{self.base_url}: HTTP {status}: {msg}")

    def _unreachable(self, exc: BaseException) -> NetworkError:
        cause = exc.__cause__ or exc
        return NetworkError(f"{self.base_url}: cannot reach the server ({str(cause) or type(cause).__name__})",
                            "is the server running? check --server")

    def _call(self, path: str, fn: Callable[[], Any]) -> Any:
        """One API call under the retry policy; a final failure becomes a one-line error.

        Raises:
            LLMError: a final HTTP status, or an answer that is not JSON.
            NetworkError: the server stayed unreachable (or too slow) through the retries.
        """
        import openai

        failures = 0
        while True:
            retry_after: float | None = None
            try:
                return fn()
            except openai.APIStatusError as exc:
                if not retryable_status(exc.status_code) or self.backoff.gives_up(failures + 1):
                    raise self._status_error(exc) from None
                retry_after = retry_after_seconds(exc.response.headers)
            except openai.APIConnectionError as exc:  # a refused or dropped connection, a timeout
                if self.backoff.gives_up(failures + 1):
                    raise self._unreachable(exc) from None
            except (openai.APIResponseValidationError, ValueError):
                raise LLMError(f"{self.base_url}{path}: the answer is not JSON") from None
            failures += 1
            self.backoff.wait(failures, retry_after)

    def _params(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        p = request.params
        params: dict[str, Any] = {"model": self.model_name, "messages": to_openai_messages(request.messages),
                                  "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                                  "top_p": p.top_p, "stream": stream}
        if p.stop:
            params["stop"] = list(p.stop)
        if p.seed is not None:
            params["seed"] = p.seed
        if stream:
            params["stream_options"] = {"include_usage": True}
        return params

    # ------------------------------------------------------------------ generation
    def _complete(self, request: ChatRequest) -> GenerationResult:
        params = self._params(request, stream=False)
        resp = self._call("/chat/completions", lambda: self._client.chat.completions.create(**params))
        try:
            choice = resp.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise LLMError(f"{self.base_url}/chat/completions: unexpected answer (no choices[0].message)") from None
        usage = getattr(resp, "usage", None)
        return GenerationResult(text=text.strip(), finish_reason=choice.finish_reason or "stop",
                                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    def _chunks(self, request: ChatRequest) -> Iterator[Any]:
        """The chunks of one streamed completion (opening the stream is retried, not the body)."""
        import openai

        params = self._params(request, stream=True)
        stream = self._call("/chat/completions", lambda: self._client.chat.completions.create(**params))
        try:
            yield from stream
        except openai.APIConnectionError as exc:
            raise NetworkError(f"{self.base_url}: the connection failed mid-answer "
                               f"({exc.__cause__ or exc})", "is the server running? check --server") from None
        except openai.APIError as exc:  # an error event in the stream
            raise LLMError(f"{self.base_url}: the server failed mid-answer: {api_error_message(exc, limit=300)}") from None
        except ValueError:
            raise LLMError(f"{self.base_url}: a streamed event is not JSON") from None
        finally:
            stream.close()

    @staticmethod
    def _deltas(chunk: Any) -> Iterator[tuple[str, str | None]]:
        """``(text, finish_reason)`` of each choice of one chunk."""
        for choice in getattr(chunk, "choices", None) or []:
            delta = getattr(choice, "delta", None)
            yield (getattr(delta, "content", None) or ""), getattr(choice, "finish_reason", None)

    def _streamed(self, index: int, request: ChatRequest, on_delta: Callable[[int, str], None] | None,
                  should_stop: Callable[[int], bool] | None) -> GenerationResult:
        pieces: list[str] = []
        finish = "stop"
        usage: Any = None
        started = False
        with contextlib.closing(self._chunks(request)) as chunks:
            for chunk in chunks:
                if should_stop is not None and should_stop(index):
                    finish = "cancelled"
                    break
                usage = getattr(chunk, "usage", None) or usage
                for delta, reason in self._deltas(chunk):
                    if not started:
                        delta = delta.lstrip()
                        started = bool(delta)
                    if delta:
                        pieces.append(delta)
                        if on_delta is not None:
                            on_delta(index, delta)
                    if reason:
                        finish = reason
        text = "".join(pieces)
        return GenerationResult(text=text.rstrip(), finish_reason=finish,
                                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                                completion_tokens=int(getattr(usage, "completion_tokens", 0) or len(pieces)))

    def generate(self, requests: list[ChatRequest], batch_size: int = 16,
                 on_delta: Callable[[int, str], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None,
                 progress: ProgressCallback | None = None,
                 on_result: Callable[[int, GenerationResult], None] | None = None,
                 ) -> list[GenerationResult]:
        """Send the requests, ``concurrency`` at a time (``batch_size`` is the server's business).

        Args and returns as :meth:`Engine.generate`; streaming is used when ``on_delta`` or
        ``should_stop`` is given.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        streamed = on_delta is not None or should_stop is not None

        def answer(i: int) -> GenerationResult:
            if streamed:
                return self._streamed(i, requests[i], on_delta, should_stop)
            return self._complete(requests[i])

        emit(progress, "generate", 0, len(requests), "answer")
        done = 0
        with contextlib.closing(map_unordered(answer, range(len(requests)), self.concurrency,
                                              name="remote")) as answers:
            for i, res in answers:
                results[i] = res
                done += 1
                if on_result is not None:
                    on_result(i, res)
                emit(progress, "generate", done, len(requests), "answer")
        emit(progress, "generate", done, len(requests), "answer", finished=True)
        return [r for r in results if r is not None]

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """Text deltas of one request as the server sends them."""
        started = False
        pending = ""
        with contextlib.closing(self._chunks(request)) as chunks:
            for chunk in chunks:
                for delta, _ in self._deltas(chunk):
                    if not started:
                        delta = delta.lstrip()
                        started = bool(delta)
                    # Hold trailing whitespace back: the final text is stripped, as the local engine's.
                    pending += delta
                    body = pending.rstrip()
                    if body:
                        yield body
                        pending = pending[len(body):]

    def count_tokens(self, request: ChatRequest) -> int:
        """Not known without the server's tokenizer; returns 0 (history is then not trimmed)."""
        return 0
