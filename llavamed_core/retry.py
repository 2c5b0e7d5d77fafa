"""The one HTTP retry policy: what is retried, how long to wait, how many times.

Every HTTP client in llavamed uses it: file downloads (:mod:`llavamed_core.http`), the LLM client
(:mod:`llavamed_core.llm`) and the remote engine (:mod:`llavamed_core.infer.remote`).

- **What is retried**: a dropped connection or a timeout (:func:`is_transient`), and the statuses
  in :data:`RETRY_STATUSES`: 408 Request Timeout, 409 Conflict, 425 Too Early, 429 Too Many
  Requests and every 5xx except 501 Not Implemented and 505 HTTP Version Not Supported (those
  answer the same on every try). Any other status (400, 401, 403, 404, ...) is final: the caller
  fails at once with a one-line error.
- **How long to wait** before the next attempt: what the server asks for (``Retry-After`` in
  seconds or as an HTTP date, or ``Retry-After-Ms``), cut to ``retry_after_max``; otherwise
  exponential backoff with equal jitter, between half and all of
  ``min(backoff * 2**(n-1), backoff_max)`` after the n-th failure.
- **How many times**: ``retries`` attempts after the first.

What a client does between attempts (a download resumes with ``Range``, the LLM client counts the
retry) and how a final failure reads stay with the client. The sleep is injectable, so tests
record the waits instead of taking them.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "RETRY_STATUSES",
    "RetryPolicy",
    "Backoff",
    "retryable_status",
    "is_transient",
    "retry_after_seconds",
]

RETRY_STATUSES: frozenset[int] = frozenset({408, 409, 425, 429} | set(range(500, 600))) - {501, 505}
"""Statuses worth another attempt: timeouts, conflicts, rate limits and server-side failures."""

# Transport errors of the HTTP libraries in use, by module: a dropped connection, a refused
# connection or a timeout. Looked up in ``sys.modules`` so this module imports none of them (an
# exception of a library can only exist once that library is loaded).
_TRANSIENT_BY_MODULE = (
    ("requests", ("ConnectionError", "Timeout")),
    ("urllib3.exceptions", ("HTTPError",)),
    ("httpx", ("TransportError",)),
    ("httpx2", ("TransportError",)),
    ("openai", ("APIConnectionError",)),  # APITimeoutError is a subclass
)


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (see :data:`RETRY_STATUSES`)."""
    return status in RETRY_STATUSES


def is_transient(exc: BaseException) -> bool:
    """Whether an exception is a dropped or refused connection or a timeout, from the standard
    library, ``requests``/``urllib3``, ``httpx`` or ``openai``: worth another attempt."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for module, names in _TRANSIENT_BY_MODULE:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, tuple(getattr(mod, n) for n in names if hasattr(mod, n))):
            return True
    return False


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None,
                        cap: float = 600.0) -> float | None:
    """Seconds a response asks the client to wait, or ``None`` when it says nothing usable.

    Reads ``Retry-After-Ms`` (milliseconds, OpenAI's), then ``Retry-After`` (delta-seconds, or an
    HTTP date, counted from ``now``, default the wall clock). Never negative; at most ``cap``.
    """
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        value = value.strip()
        try:
            return min(max(float(value) / scale, 0.0), cap)
        except ValueError:
            if name != "retry-after":
                continue
            import email.utils  # only for the rare HTTP-date form

            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                wait = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
                return min(max(wait, 0.0), cap)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts and how far apart.

    Attributes:
        retries: attempts after the first one.
        backoff: the first delay in seconds; doubled after each further failure (with jitter).
        backoff_max: the longest backoff delay.
        retry_after_max: the longest server-requested wait honoured (a longer one is cut to this).
    """

    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 600.0


class Backoff:
    """A :class:`RetryPolicy` with the sleep and random source one client uses (thread-safe).

    Args:
        policy: the attempt limit and delays.
        sleep: waits the given seconds (tests pass a recorder; downloads pass a stoppable wait).
        rng: random source of the jitter.
    """

    def __init__(self, policy: RetryPolicy, sleep: Callable[[float], object] = time.sleep,
                 rng: random.Random | None = None):
        self.policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def gives_up(self, failures: int) -> bool:
        """Whether ``failures`` failed attempts of one request use up the policy."""
        return failures > self.policy.retries

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1-based).

        The server's ``retry_after`` (already in seconds) wins, cut to ``retry_after_max``;
        otherwise exponential backoff with equal jitter.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.policy.retry_after_max)
        cap = min(self.policy.backoff_max, self.policy.backoff * (2 ** max(0, failures - 1)))
        with self._lock:
            return cap / 2 + self._rng.uniform(0, cap / 2)

    def wait(self, failures: int, retry_after: float | None = None) -> float:
        """Sleep :meth:`delay` seconds; returns them."""
        seconds = self.delay(failures, retry_after)
        self._sleep(seconds)
        return seconds
