"""Micro-batching in front of the engine: one worker thread, many waiting requests.

Requests are queued by the HTTP handlers (any thread); a single worker thread takes up to
``max_batch`` of them and runs them through ``Engine.generate`` together. A batch starts when it
is full or when its first request has waited ``max_wait_ms``; requests that arrive while a batch
runs wait and form the next one, so under load every batch is full and on an idle server a lone
request waits at most ``max_wait_ms``. The queue is bounded (:class:`QueueFull` → 429). A request
whose client went away is cancelled: dropped if still queued, stopped through the engine's
``should_stop`` if running, so its slot is freed.

Requests never share a fate: when the engine fails on a batch, each of its requests is run again
alone, so only a request that fails by itself gets an error (a streamed one that already got text
is resumed without repeating it, or fails if its answer comes out different).

The worker talks to the asyncio side only through each job's ``sink`` callable, so this module
knows nothing of HTTP or event loops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LlavamedError

__all__ = ["Job", "BatchScheduler", "QueueFull", "SchedulerClosed", "SchedulerStats"]

log = logging.getLogger("llavamed.serve")

_EXPECTED = (LlavamedError,)
"""Errors the engine raises on purpose for a bad request (logged without a traceback)."""

Sink = Callable[[str, Any], None]
"""``sink(kind, payload)`` with kind ``"delta"`` (new text), ``"done"`` (a GenerationResult) or
``"error"`` (an exception). Called from the worker thread."""


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no more requests."""


@dataclass
class Job:
    """One request waiting for or running in a batch."""

    request: Any
    """The engine's ``ChatRequest``."""
    sink: Sink
    """Receives deltas and the outcome (from the worker thread)."""
    stream: bool = False
    """Whether the client wants deltas (otherwise only the outcome is delivered)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    """When it was queued (monotonic seconds)."""
    started_at: float | None = None
    """When its batch started."""
    finished_at: float | None = None
    """When its batch ended."""
    batch_size: int = 0
    """How many requests its batch held."""
    cancelled: bool = False
    """Set by :meth:`cancel` (any thread); read by the worker and the engine's ``should_stop``."""
    sent: list[str] = field(default_factory=list)
    """The deltas delivered so far (kept to resume a stream when its batch is retried)."""

    def cancel(self) -> None:
        """Give up on this job: dropped if queued, stopped at the next token if running."""
        self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters since start (read for ``/health`` and tests)."""

    batches: int = 0
    """Batches run."""
    requests: int = 0
    """Requests that went through the engine."""
    max_batch_seen: int = 0
    """Largest batch run."""
    cancelled: int = 0
    """Requests cancelled before or during generation."""
    failed_batches: int = 0
    """Batches the engine failed on (their requests were then run one by one)."""
    retried_alone: int = 0
    """Requests run again alone after their batch failed."""


class BatchScheduler:
    """Collects concurrent requests into batches for one engine.

    Args:
        engine: an object with ``generate(requests, batch_size, on_delta, should_stop)``
            returning one result per request (``llavamed_core.infer.engine.Engine``).
        max_batch: most requests per batch (1 = one at a time).
        max_wait_ms: longest wait for a batch to fill once its first request is queued.
        max_queue: most queued (not yet running) requests.
        check: called in the worker thread with each request right before its batch runs; an
            exception it raises fails that request alone (e.g. a prompt over the context length).
    """

    def __init__(self, engine: Any, max_batch: int = 16, max_wait_ms: float = 10.0,
                 max_queue: int = 256, check: Callable[[Any], None] | None = None):
        self.engine = engine
        self.check = check
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llavamed-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._pending)

    def submit(self, request: Any, sink: Sink, stream: bool = False) -> Job:
        """Queue a request.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            SchedulerClosed: the scheduler is shutting down.
        """
        job = Job(request=request, sink=sink, stream=stream)
        with self._cond:
            if self._closed:
                raise SchedulerClosed()
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, cancel the queued ones, and wait for the running batch."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            _deliver(job, "error", SchedulerClosed())
        self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = self._pending[0].enqueued_at + self.max_wait
                while len(self._pending) < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch: list[Job] = []
                while self._pending and len(batch) < self.max_batch:
                    job = self._pending.popleft()
                    if job.cancelled:
                        self.stats.cancelled += 1
                        continue
                    batch.append(job)
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        if self.check is not None:
            batch = [job for job in batch if self._passes_check(job)]
            if not batch:
                return
        start = time.monotonic()
        for job in batch:
            job.started_at = start
            job.batch_size = len(batch)
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))

        def on_delta(i: int, text: str) -> None:
            if batch[i].stream and not batch[i].cancelled:
                batch[i].sent.append(text)
                _deliver(batch[i], "delta", text)

        try:
            results = self._generate(batch, on_delta)
        except Exception as exc:
            self._finish(batch)
            if len(batch) == 1:  # the request failed alone: its own error
                log.error("generation failed for one request (%s: %s)", type(exc).__name__, exc,
                          exc_info=not isinstance(exc, _EXPECTED))
                _deliver(batch[0], "error", exc)
                return
            # One bad row must not fail the others: run each request again, alone.
            log.warning("generation failed for a batch of %d (%s: %s); running its requests one "
                        "at a time", len(batch), type(exc).__name__, exc, exc_info=not isinstance(exc, _EXPECTED))
            self.stats.failed_batches += 1
            for job in batch:
                self._run_alone(job)
            return
        self._finish(batch)
        for job, res in zip(batch, results):
            if job.cancelled:
                self.stats.cancelled += 1
            _deliver(job, "done", res)

    def _generate(self, batch: list[Job], on_delta: Callable[[int, str], None]) -> list:
        def should_stop(i: int) -> bool:
            return batch[i].cancelled

        streaming = any(j.stream for j in batch)
        results = self.engine.generate([j.request for j in batch], batch_size=len(batch),
                                       on_delta=on_delta if streaming else None,
                                       should_stop=should_stop)
        if len(results) != len(batch):
            raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
        return results

    def _run_alone(self, job: Job) -> None:
        """Run one request of a failed batch by itself; a stream resumes where its client is."""
        if job.cancelled:
            self.stats.cancelled += 1
            return
        self.stats.retried_alone += 1
        sent = "".join(job.sent)
        state = {"text": "", "diverged": False}

        def on_delta(_i: int, text: str) -> None:
            if job.cancelled or state["diverged"]:
                return
            before, after = state["text"], state["text"] + text
            state["text"] = after
            overlap = min(len(after), len(sent))
            if after[:overlap] != sent[:overlap]:
                state["diverged"] = True  # the client holds text this run did not produce
                job.cancel()
                return
            if len(after) > len(sent):
                new = after[max(len(before), len(sent)):]
                job.sent.append(new)
                _deliver(job, "delta", new)

        job.started_at = time.monotonic()
        job.batch_size = 1
        try:
            result = self._generate([job], on_delta)[0]
        except Exception as exc:
            self._finish([job])
            log.error("generation failed for one request run alone (%s: %s)", type(exc).__name__,
                      exc, exc_info=not isinstance(exc, _EXPECTED))
            _deliver(job, "error", exc)
            return
        self._finish([job])
        if state["diverged"] or (sent and not state["text"].startswith(sent)):
            job.cancelled = False
            _deliver(job, "error", RuntimeError("the streamed answer could not be resumed after its "
                                                "batch failed"))
            return
        if job.cancelled:
            self.stats.cancelled += 1
        _deliver(job, "done", result)

    @staticmethod
    def _finish(batch: list[Job]) -> None:
        end = time.monotonic()
        for job in batch:
            job.finished_at = end

    def _passes_check(self, job: Job) -> bool:
        try:
            self.check(job.request)  # type: ignore[misc]
        except Exception as exc:  # delivered to this request only; the batch goes on
            _deliver(job, "error", exc)
            return False
        return True


def _deliver(job: Job, kind: str, payload: Any) -> None:
    try:
        job.sink(kind, payload)
    except Exception:  # a broken sink (closed event loop) must not stop the worker
        log.debug("could not deliver %s to a job", kind, exc_info=True)
        job.cancelled = True

