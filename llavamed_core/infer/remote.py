"""The engine interface over the OpenAI-compatible chat API (``llavamed serve``, vLLM, hosted models).

:class:`RemoteEngine` has the :class:`~llavamed_core.infer.engine.Engine` calls that ``chat`` and
``eval vqa`` use (``generate``, ``stream``), so those commands run the same code against a
checkpoint in this process or a server. Images travel as PNG data URLs (FORMATS.md); many
requests are in flight at once (``concurrency``); answers stream as Server-Sent Events.

Use::

    remote = RemoteEngine.connect("http://127.0.0.1:8000", api_key=None)
    print(remote.generate([ChatRequest(messages)])[0].text)
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from ..errors import ConfigError, LLMError, NetworkError
from ..progress import ProgressCallback, emit
from .engine import ChatRequest, GenerationResult

__all__ = ["RemoteEngine", "to_openai_messages", "image_data_url", "api_base"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


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
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 3):
        import httpx

        self.base_url = api_base(base_url)
        self.model_name = model_name
        self.concurrency = max(1, int(concurrency))
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                    limits=httpx.Limits(max_connections=self.concurrency + 2))
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, model_name: str | None = None,
                concurrency: int = 8) -> "RemoteEngine":
        """Connect to a server; without ``model_name``, take the first model ``/v1/models`` lists.

        Raises:
            NetworkError: the server does not answer.
            LLMError: it refuses (bad API key) or lists no model.
        """
        engine = cls(url, model_name or "", api_key=api_key, concurrency=concurrency)
        if not model_name:
            data = engine._request("GET", "/models")
            models = [m.get("id") for m in (data.get("data") or []) if isinstance(m, dict)]
            if not models:
                raise LLMError(f"{engine.base_url}/models lists no model", "pass --model-name")
            engine.model_name = models[0]
        return engine

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # ------------------------------------------------------------------ HTTP
    def _raise_for(self, resp: Any) -> None:
        if resp.status_code < 400:
            return
        try:
            body = resp.json()
            msg = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) \
                else body.get("error") or body.get("detail") or resp.text
        except (ValueError, AttributeError):
            msg = resp.text
        msg = str(msg).strip().splitlines()[0][:300] if msg else resp.reason_phrase
        if resp.status_code in (401, 403):
            raise LLMError(f"{self.base_url}: the server refused the request ({resp.status_code}: {msg})",
                           "pass the right --api-key")
        if resp.status_code == 404 and "model" in msg.lower():
            raise LLMError(f"{self.base_url}: {msg}", "check --model-name against GET /v1/models")
        raise LLMError(f"{self.base_url}: HTTP {resp.status_code}: {msg}")

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.request(method, self.base_url + path, json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise NetworkError(f"{self.base_url}: cannot reach the server ({exc})",
                                       "is the server running? check --server") from None
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                wait = resp.headers.get("retry-after")
                time.sleep(float(wait) if wait and wait.replace(".", "", 1).isdigit() else delay)
                delay *= 2
                continue
            self._raise_for(resp)
            try:
                return resp.json()
            except ValueError:
                raise LLMError(f"{self.base_url}{path}: the answer is not JSON") from None
        raise NetworkError(f"{self.base_url}: no answer after {self.retries + 1} tries")

    def _body(self, request: ChatRequest, stream: bool) -> dict:
        p = request.params
        body: dict[str, Any] = {"model": self.model_name, "messages": to_openai_messages(request.messages),
                                "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                                "top_p": p.top_p, "stream": stream}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    # ------------------------------------------------------------------ generation
    def _complete(self, request: ChatRequest) -> GenerationResult:
        data = self._request("POST", "/chat/completions", self._body(request, stream=False))
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LLMError(f"{self.base_url}/chat/completions: unexpected answer (no choices[0].message)") from None
        usage = data.get("usage") or {}
        return GenerationResult(text=text.strip(), finish_reason=choice.get("finish_reason") or "stop",
                                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                completion_tokens=int(usage.get("completion_tokens") or 0))

    def _stream_events(self, request: ChatRequest) -> Iterator[dict]:
        """The decoded ``data:`` events of one streamed completion."""
        import httpx

        try:
            with self._client.stream("POST", self.base_url + "/chat/completions",
                                     json=self._body(request, stream=True)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        yield json.loads(payload)
                    except json.JSONDecodeError:
                        raise LLMError(f"{self.base_url}: a streamed event is not JSON: {payload[:80]}") from None
        except httpx.TransportError as exc:
            raise NetworkError(f"{self.base_url}: the connection failed ({exc})",
                               "is the server running? check --server") from None

    def _streamed(self, index: int, request: ChatRequest, on_delta: Callable[[int, str], None] | None,
                  should_stop: Callable[[int], bool] | None) -> GenerationResult:
        pieces: list[str] = []
        finish = "stop"
        usage: dict = {}
        started = False
        for event in self._stream_events(request):
            if should_stop is not None and should_stop(index):
                finish = "cancelled"
                break
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") or ""
                if not started:
                    delta = delta.lstrip()
                    started = bool(delta)
                if delta:
                    pieces.append(delta)
                    if on_delta is not None:
                        on_delta(index, delta)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        text = "".join(pieces)
        return GenerationResult(text=text.rstrip(), finish_reason=finish,
                                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                completion_tokens=int(usage.get("completion_tokens") or len(pieces)))

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
        emit(progress, "generate", 0, len(requests), "answer")
        done = 0
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._streamed, i, r, on_delta, should_stop) if streamed
                       else pool.submit(self._complete, r): i for i, r in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    done += 1
                    if on_result is not None:
                        on_result(i, results[i])
                    emit(progress, "generate", done, len(requests), "answer")
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        emit(progress, "generate", done, len(requests), "answer", finished=True)
        return [r for r in results if r is not None]

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """Text deltas of one request as the server sends them."""
        started = False
        pending = ""
        for event in self._stream_events(request):
            for choice in event.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") or ""
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
