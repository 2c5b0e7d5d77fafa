"""One OpenAI-compatible chat client for every LLM-backed step (``instruct gen``, ``eval gpt-score``).

It talks to OpenAI, Azure OpenAI, or any OpenAI-compatible base URL (``llavamed serve``, vLLM) via
the official ``openai`` package, and adds what long batch jobs need:

- **the one retry policy** of :mod:`llavamed_core.retry` (the ``openai`` client runs with
  ``max_retries=0``): 408/409/425/429, 5xx, timeouts and dropped connections are retried with
  exponential backoff and jitter, honouring ``Retry-After``/``Retry-After-Ms``; so is a 200 whose
  body is not a usable completion (cut, empty: an LLM's answer, worth asking again). 401/403/404
  stop the run at once (:class:`~llavamed_core.errors.LLMError`); other 4xx fail only that request
  (:class:`LLMRequestFailed`).
- **an optional requests-/tokens-per-minute limiter** (:class:`RateLimiter`, sliding 60 s window).
- **token usage and cost** (:class:`UsageMeter`; prices per 1M tokens).
- **an on-disk response cache** (:class:`ResponseCache`) keyed by a hash of the full request (model,
  messages, parameters), under ``$LLAVAMED_HOME/llm-cache`` (default ``~/.cache/llavamed``), so a
  rerun never pays twice.
- **concurrency** (:func:`run_concurrent`): the thread pool of :mod:`llavamed_core.pool` keeping N
  requests in flight, results handed back to the calling thread (which alone writes output files),
  and a stop after too many failures in a row.

Configuration precedence: :class:`LLMConfig` defaults → environment (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, ``AZURE_OPENAI_ENDPOINT``, ``AZURE_OPENAI_API_KEY``, ``OPENAI_API_VERSION``,
read when the client is built) → explicit config fields. API keys are never stored in the config,
never printed and are masked in error messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError, LLMError
from .io import atomic_write_json
from .pool import map_unordered
from .retry import Backoff, RetryPolicy, retry_after_seconds, retryable_status

__all__ = [
    "LLMConfig",
    "Endpoint",
    "Completion",
    "LLMRequestFailed",
    "LLMClient",
    "RateLimiter",
    "UsageMeter",
    "ResponseCache",
    "resolve_endpoint",
    "request_key",
    "run_concurrent",
    "default_cache_dir",
    "estimate_tokens",
    "api_error_message",
]

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$LLAVAMED_HOME/llm-cache``, with ``LLAVAMED_HOME`` defaulting to ``~/.cache/llavamed``."""
    env = os.environ if environ is None else environ
    home = env.get("LLAVAMED_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llavamed")
    return Path(home) / "llm-cache"


@dataclass
class LLMConfig:
    """How to reach the endpoint and how hard to push it. Secrets are not fields: they are read
    from the environment when the client is built."""

    model: str
    """Model name; for Azure, the deployment name."""
    provider: str = "auto"
    """``openai`` (any OpenAI-compatible base URL), ``azure``, or ``auto`` (Azure when an Azure
    endpoint is given or ``AZURE_OPENAI_ENDPOINT`` is set and no base URL is given)."""
    base_url: str | None = None
    """OpenAI-compatible base URL (``…/v1``); default ``OPENAI_BASE_URL`` or api.openai.com."""
    azure_endpoint: str | None = None
    """Azure resource endpoint (``https://NAME.openai.azure.com``); default ``AZURE_OPENAI_ENDPOINT``."""
    api_version: str | None = None
    """Azure API version; default ``OPENAI_API_VERSION``."""
    temperature: float | None = None
    """Sampling temperature sent with every request (``None``: the server's default)."""
    max_tokens: int | None = None
    """Completion-token limit sent with every request (``None``: the server's default)."""
    concurrency: int = 8
    """Requests in flight at once."""
    rpm: int | None = None
    """Requests-per-minute limit (``None``: unlimited)."""
    tpm: int | None = None
    """Tokens-per-minute limit, prompt + completion, estimated before and settled after each call."""
    max_retries: int = 5
    """Retries per request after the first attempt (retryable errors only)."""
    backoff: float = 1.0
    """First retry delay in seconds, doubled each retry (with jitter) up to ``backoff_max``."""
    backoff_max: float = 60.0
    """Longest backoff delay in seconds (a server's ``Retry-After`` may ask for more)."""
    timeout: float = 120.0
    """Seconds to wait for one response."""
    price_in: float | None = None
    """Price per 1M prompt tokens, for the cost estimate."""
    price_out: float | None = None
    """Price per 1M completion tokens, for the cost estimate."""
    cache_dir: Path | None = None
    """Response cache folder (default :func:`default_cache_dir`)."""
    use_cache: bool = True
    """Read and write the response cache."""
    max_consecutive_failures: int = 20
    """Stop the run when this many requests in a row fail after their retries (endpoint down)."""

    def check(self) -> None:
        """Raise :class:`ConfigError` on values that cannot work."""
        if not self.model:
            raise ConfigError("no model given", "pass --model (or --judge) with the model or deployment name")
        if self.provider not in ("auto", "openai", "azure"):
            raise ConfigError(f"unknown provider '{self.provider}'", "use auto, openai or azure")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {self.concurrency}")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name} must be at least 1, got {v}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        for name in ("price_in", "price_out"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {v}")


@dataclass
class Endpoint:
    """The resolved endpoint. ``api_key`` is excluded from ``repr`` and :meth:`describe`."""

    provider: str
    url: str
    api_key: str = field(repr=False)
    key_source: str
    api_version: str | None = None

    def describe(self) -> dict[str, Any]:
        """Safe to print: provider, URL (without any user:password@), API version and where the key
        came from (never the key)."""
        parts = urlsplit(self.url)
        url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl() if "@" in parts.netloc else self.url
        return {"provider": self.provider, "url": url, "api_version": self.api_version,
                "api_key": self.key_source}


def resolve_endpoint(cfg: LLMConfig, environ: Mapping[str, str] | None = None) -> Endpoint:
    """Decide provider, URL and key from the config and the environment.

    Raises:
        ConfigError: a missing key for api.openai.com or Azure, or a missing Azure API version.
    """
    env = os.environ if environ is None else environ
    azure_endpoint = cfg.azure_endpoint or env.get("AZURE_OPENAI_ENDPOINT") or None
    provider = cfg.provider
    if provider == "auto":
        provider = "azure" if (cfg.azure_endpoint or (azure_endpoint and not cfg.base_url)) else "openai"
    if provider == "azure":
        if not azure_endpoint:
            raise ConfigError("Azure needs an endpoint",
                              "pass --azure-endpoint https://NAME.openai.azure.com or set AZURE_OPENAI_ENDPOINT")
        version = cfg.api_version or env.get("OPENAI_API_VERSION")
        if not version:
            raise ConfigError("Azure needs an API version",
                              "pass --api-version (e.g. 2024-06-01) or set OPENAI_API_VERSION")
        key = env.get("AZURE_OPENAI_API_KEY")
        source = "AZURE_OPENAI_API_KEY"
        if not key:
            raise ConfigError("AZURE_OPENAI_API_KEY is not set", "export AZURE_OPENAI_API_KEY=... and rerun")
        return Endpoint("azure", azure_endpoint.rstrip("/"), key, source, version)
    url = (cfg.base_url or env.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    key = env.get("OPENAI_API_KEY")
    if key:
        return Endpoint("openai", url, key, "OPENAI_API_KEY")
    if url == OPENAI_DEFAULT_BASE_URL:
        raise ConfigError("OPENAI_API_KEY is not set",
                          "export OPENAI_API_KEY=..., or point --base-url at an OpenAI-compatible server")
    # Local OpenAI-compatible servers (llavamed serve, vLLM) accept any key.
    return Endpoint("openai", url, "EMPTY", "none (local server)")


def estimate_tokens(messages: list[dict], max_tokens: int | None) -> int:
    """A cheap upper-ish estimate of a request's tokens (4 characters a token + the completion cap)."""
    chars = 0
    for m in messages:
        c = m.get("content")
        chars += len(c) if isinstance(c, str) else len(json.dumps(c))
    return chars // 4 + (max_tokens or 512)


def request_key(model: str, messages: list[dict], params: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the full request: the cache key."""
    blob = json.dumps({"model": model, "messages": messages, "params": dict(params)},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Completion:
    """One assistant answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    attempts: int = 1
    """HTTP attempts this call made (0 when served from the cache)."""


class LLMRequestFailed(LLMError):
    """One request failed for good (retries exhausted, or a non-retryable 4xx); the run goes on.

    Attributes:
        reason: the cause, e.g. ``"HTTP 500 after 6 attempts"``.
        attempts: attempts made.
        kind: the cause's category for counting (``"HTTP 500"``, ``"timeout"``, ``"connection error"``,
            ``"malformed response"``).
    """

    def __init__(self, reason: str, attempts: int, kind: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.kind = kind or reason


class UsageMeter:
    """Thread-safe counters of requests, retries, tokens and cost.

    Args:
        price_in: price per 1M prompt tokens (or ``None``).
        price_out: price per 1M completion tokens (or ``None``).
    """

    def __init__(self, price_in: float | None = None, price_out: float | None = None):
        self._lock = threading.Lock()
        self.price_in = price_in
        self.price_out = price_out
        self.requests = 0
        self.retries = 0
        self.cache_hits = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0
        self.cached_completion_tokens = 0

    def add_response(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one paid response."""
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def add_cached(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one response served from the cache (tokens saved, not paid)."""
        with self._lock:
            self.cache_hits += 1
            self.cached_prompt_tokens += prompt_tokens
            self.cached_completion_tokens += completion_tokens

    def add_retry(self) -> None:
        """Count one retry (a failed attempt followed by another)."""
        with self._lock:
            self.retries += 1

    @property
    def tokens(self) -> int:
        """Paid tokens so far (prompt + completion)."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float | None:
        """Estimated cost of the paid tokens, or ``None`` without prices."""
        if self.price_in is None and self.price_out is None:
            return None
        return (self.prompt_tokens * (self.price_in or 0.0)
                + self.completion_tokens * (self.price_out or 0.0)) / 1e6

    def snapshot(self) -> dict[str, Any]:
        """All counters as a plain dict."""
        with self._lock:
            return {"requests": self.requests, "retries": self.retries, "cache_hits": self.cache_hits,
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "cached_tokens": self.cached_prompt_tokens + self.cached_completion_tokens,
                    "cost": self.cost}


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits over a sliding 60-second window.

    :meth:`acquire` blocks until the request fits and returns a handle; :meth:`settle` replaces the
    estimated tokens by the real count when the response arrives.

    Args:
        rpm: requests per minute, or ``None``.
        tpm: tokens per minute, or ``None``.
        clock: monotonic clock (injectable for tests).
        sleep: sleep function (injectable for tests).
    """

    WINDOW = 60.0

    def __init__(self, rpm: int | None, tpm: int | None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._events: deque[list[float]] = deque()  # [time, tokens]

    def _wait_needed(self, now: float, tokens: int) -> float:
        while self._events and self._events[0][0] <= now - self.WINDOW:
            self._events.popleft()
        wait = 0.0
        if self.rpm is not None and len(self._events) >= self.rpm:
            oldest = self._events[len(self._events) - self.rpm]
            wait = max(wait, oldest[0] + self.WINDOW - now)
        if self.tpm is not None and self._events:
            used = sum(e[1] for e in self._events)
            # A request bigger than the whole budget goes alone in an empty window.
            need = used + min(tokens, self.tpm) - self.tpm
            if need > 0:
                freed = 0.0
                for t, n in self._events:
                    freed += n
                    if freed >= need:
                        wait = max(wait, t + self.WINDOW - now)
                        break
        return wait

    def acquire(self, tokens: int = 0) -> list[float]:
        """Block until one request of ``tokens`` estimated tokens fits; returns its handle."""
        while True:
            with self._lock:
                now = self._clock()
                wait = self._wait_needed(now, tokens)
                if wait <= 0:
                    handle = [now, float(tokens)]
                    self._events.append(handle)
                    return handle
            self._sleep(wait)

    def settle(self, handle: list[float], tokens: int) -> None:
        """Record the real token count of an acquired request."""
        with self._lock:
            handle[1] = float(tokens)


class ResponseCache:
    """Completed responses on disk, one JSON file per request hash (``<dir>/<ab>/<hash>.json``).

    Writes are atomic, so concurrent writers and kills leave either no file or a whole one.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The cached completion for ``key``, or ``None``."""
        path = self._path(key)
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
            return Completion(d["text"], d.get("finish_reason"), int(d.get("prompt_tokens", 0)),
                              int(d.get("completion_tokens", 0)), cached=True, attempts=0)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # An unreadable entry is a miss; the fresh response will overwrite it.
            return None

    def put(self, key: str, model: str, comp: Completion) -> None:
        """Store one completion."""
        atomic_write_json(self._path(key), {
            "key": key, "model": model, "text": comp.text, "finish_reason": comp.finish_reason,
            "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
            "created": time.time()}, indent=None)


def api_error_message(exc: Any, secret: str | None = None, limit: int = 200) -> str:
    """The server's own words from an ``openai`` error, on one line, with ``secret`` masked.

    Reads the OpenAI error shape (``{"error": {"message": ...}}``), FastAPI's ``{"detail": ...}``,
    or the body text, falling back to the exception's message.
    """
    body = getattr(exc, "body", None)
    msg: Any = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
    elif isinstance(body, str):
        msg = body
    text = str(msg or getattr(exc, "message", None) or exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return _mask(text[:limit], secret)


def _mask(text: str, secret: str | None) -> str:
    """``text`` with the secret (and its long prefixes) replaced by ``***``."""
    if secret and secret != "EMPTY" and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


class LLMClient:
    """A thread-safe chat client: cache, rate limit, retries, usage.

    Args:
        cfg: the configuration (checked here).
        environ: environment to read endpoint and secrets from (default ``os.environ``).
        sleep: sleep function used between retries (injectable so tests can record delays).
        rng: random source for backoff jitter.

    Raises:
        ConfigError: a bad config or a missing key.
    """

    def __init__(self, cfg: LLMConfig, environ: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        import openai

        cfg.check()
        self.cfg = cfg
        self.endpoint = resolve_endpoint(cfg, environ)
        self.usage = UsageMeter(cfg.price_in, cfg.price_out)
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm) if (cfg.rpm or cfg.tpm) else None
        self.cache = ResponseCache(cfg.cache_dir or default_cache_dir(environ)) if cfg.use_cache else None
        self.backoff = Backoff(RetryPolicy(cfg.max_retries, cfg.backoff, cfg.backoff_max), sleep, rng)
        ep = self.endpoint
        # The retry policy of llavamed_core.retry replaces the client's (max_retries=0).
        if ep.provider == "azure":
            self._client = openai.AzureOpenAI(azure_endpoint=ep.url, api_version=ep.api_version,
                                              api_key=ep.api_key, max_retries=0, timeout=cfg.timeout)
        else:
            self._client = openai.OpenAI(base_url=ep.url, api_key=ep.api_key, max_retries=0,
                                         timeout=cfg.timeout)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def params(self, **overrides: Any) -> dict[str, Any]:
        """The request parameters (config defaults, then ``overrides``), without ``None`` values."""
        p = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        p.update(overrides)
        return {k: v for k, v in p.items() if v is not None}

    def complete(self, messages: list[dict], *, refresh: bool = False, **overrides: Any) -> Completion:
        """Send one chat request (or answer it from the cache) and return the assistant's text.

        Args:
            messages: OpenAI chat messages.
            refresh: skip the cache lookup (the new answer still replaces the cached one).
            **overrides: request parameters (``temperature``, ``max_tokens``, ``seed``, …).

        Raises:
            LLMError: authentication/permission failure or unknown model/deployment (stop the run).
            LLMRequestFailed: this request failed after its retries, or was refused (4xx).
        """
        import openai

        model = self.cfg.model
        params = self.params(**overrides)
        key = request_key(model, messages, params)
        if self.cache is not None and not refresh:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.add_cached(hit.prompt_tokens, hit.completion_tokens)
                return hit
        attempts = 0
        while True:
            attempts += 1
            handle = self.limiter.acquire(estimate_tokens(messages, params.get("max_tokens"))) \
                if self.limiter else None
            wait_hint: float | None = None
            try:
                resp = self._client.chat.completions.create(model=model, messages=messages, **params)
                comp = self._parse(resp, attempts)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise LLMError(
                    f"the endpoint refused the credentials (HTTP {exc.status_code}) at {self.endpoint.url}: "
                    f"{self._server_message(exc)}",
                    f"check {self.endpoint.key_source}" if self.endpoint.key_source.isupper()
                    else "set OPENAI_API_KEY (or AZURE_OPENAI_API_KEY for Azure)") from None
            except openai.NotFoundError as exc:
                raise LLMError(
                    f"model or deployment '{model}' not found at {self.endpoint.url} (HTTP 404): "
                    f"{self._server_message(exc)}",
                    "check --model/--judge (Azure: the deployment name) and the base URL") from None
            except openai.APIStatusError as exc:
                status = exc.status_code
                if not retryable_status(status):
                    raise LLMRequestFailed(f"HTTP {status}: {self._server_message(exc)}", attempts,
                                           f"HTTP {status}") from None
                kind = reason = f"HTTP {status}"
                wait_hint = retry_after_seconds(exc.response.headers if exc.response is not None else None)
            except openai.APITimeoutError:
                kind, reason = "timeout", f"timeout ({self.cfg.timeout:g} s)"
            except openai.APIConnectionError:
                kind = reason = "connection error"
            except (openai.APIResponseValidationError, ValueError, _Malformed) as exc:
                kind, reason = "malformed response", f"malformed response ({str(exc)[:80]})"
            else:
                if handle is not None:
                    self.limiter.settle(handle, comp.prompt_tokens + comp.completion_tokens)
                self.usage.add_response(comp.prompt_tokens, comp.completion_tokens)
                if self.cache is not None:
                    self.cache.put(key, model, comp)
                return comp
            if self.backoff.gives_up(attempts):
                raise LLMRequestFailed(f"{reason} after {attempts} attempt{'s' * (attempts > 1)}", attempts,
                                       kind)
            self.usage.add_retry()
            self.backoff.wait(attempts, wait_hint)

    def _server_message(self, exc: Any) -> str:
        return api_error_message(exc, self.endpoint.api_key)

    @staticmethod
    def _parse(resp: Any, attempts: int) -> Completion:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _Malformed("no choices")
        msg = choices[0].message
        text = getattr(msg, "content", None)
        if not isinstance(text, str) or not text.strip():
            # An empty answer is useless to every caller: retry it, and never cache it.
            refusal = getattr(msg, "refusal", None)
            raise _Malformed(f"empty message content (finish_reason={choices[0].finish_reason}"
                             + (f", refusal: {refusal[:60]}" if refusal else "") + ")")
        usage = getattr(resp, "usage", None)
        return Completion(text, choices[0].finish_reason,
                          int(getattr(usage, "prompt_tokens", 0) or 0),
                          int(getattr(usage, "completion_tokens", 0) or 0),
                          cached=False, attempts=attempts)


class _Malformed(Exception):
    """A 200 response that is not a usable chat completion."""


T = TypeVar("T")
R = TypeVar("R")


def run_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int,
                   max_consecutive_failures: int | None = None) -> Iterator[tuple[T, R | LLMRequestFailed]]:
    """Run ``fn`` over ``items`` on the shared thread pool and yield ``(item, result)`` as each finishes.

    ``concurrency`` requests are in flight while work remains (:func:`llavamed_core.pool.map_unordered`);
    results come back to the calling thread, so it alone writes files. A :class:`LLMRequestFailed`
    from ``fn`` is yielded in place of the result (the run goes on); any other exception stops the
    run and is raised at once, before more work starts.

    Args:
        fn: the work for one item (called in worker threads).
        items: the items, consumed lazily.
        concurrency: worker threads.
        max_consecutive_failures: raise :class:`LLMError` when this many items in a row fail.

    Raises:
        LLMError: a fatal endpoint error, or too many failures in a row.
    """
    streak = 0
    with contextlib.closing(map_unordered(fn, items, concurrency, return_errors=(LLMRequestFailed,),
                                          name="llm")) as results:
        for item, result in results:
            if isinstance(result, LLMRequestFailed):
                streak += 1
                if max_consecutive_failures and streak >= max_consecutive_failures:
                    raise LLMError(f"{streak} requests in a row failed; the last: {result.reason}",
                                   "check that the endpoint is up (and its URL), then rerun: "
                                   "the job resumes")
            else:
                streak = 0
            yield item, result
