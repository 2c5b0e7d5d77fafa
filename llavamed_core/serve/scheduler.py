"""Continuous batching in front of the engine: one batching loop, many waiting requests.

Requests are queued by the HTTP handlers (any thread); a single loop (a worker thread of the
scheduler's own, or the thread that calls :meth:`BatchScheduler.run`) runs one
:class:`~llavamed_core.infer.batch.RunningBatch` of up to ``max_batch`` rows and, between decode
steps, admits queued requests into it (iteration-level batching, as Orca and vLLM do): a new
request joins a running batch and a finished one leaves at once, so a short answer never waits
for the longest one in its batch. Newcomers are prefilled together, in one forward pass: on an
idle server the first request waits up to ``max_wait_ms`` for company; while rows run, newcomers
join at the next step once they fill the free rows or the first of them has waited
``join_wait_ms`` (a prefill stalls every running row for about two decode steps, whatever the
number of newcomers, so while the engine is busy it pays to gather them).
The queue is bounded (:class:`QueueFull` → 429). A request whose client went away is cancelled:
dropped if still queued, stopped through the engine's ``should_stop`` if running, so its row
is freed.

Requests never share a fate: when the prefill of several newcomers fails, each is admitted again
alone; when a decode step fails, each running request is run again alone from its start, so only
a request that fails by itself gets an error (a streamed one that already got text is resumed
without repeating it, or fails if its answer comes out different).

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
    """When it joined the running batch (its prefill began)."""
    finished_at: float | None = None
    """When its answer was complete."""
    batch_size: int = 0
    """The most requests that decoded together while it ran."""
    cancelled: bool = False
    """Set by :meth:`cancel` (any thread); read by the worker and the engine's ``should_stop``."""
    stopped_by_caller: bool = False
    """Cancelled because the caller found a stop string (not counted as a cancellation)."""
    sent: list[Any] = field(default_factory=list)
    """The deltas delivered so far (kept to resume a stream when its batch is retried)."""

    def cancel(self) -> None:
        """Give up on this job: dropped if queued, stopped at the next token if running."""
        self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters since start (read for ``/health`` and tests)."""

    batches: int = 0
    """Admissions: groups of requests prefilled together (a running batch takes many)."""
    requests: int = 0
    """Requests that went through the engine."""
    max_batch_seen: int = 0
    """Most requests decoding together."""
    cancelled: int = 0
    """Requests cancelled before or during generation."""
    failed_batches: int = 0
    """Prefills and decode steps the engine failed on (their requests were then run alone)."""
    retried_alone: int = 0
    """Requests run again alone after their batch failed."""
    steps: int = 0
    """Decode steps run."""


class BatchScheduler:
    """Runs concurrent requests through one engine in a continuously refilled batch.

    Args:
        engine: an ``llavamed_core.infer.engine.Engine`` (``running_batch`` for the batch,
            ``generate`` for a request run again alone).
        max_batch: most requests decoding together (1 = one at a time).
        max_wait_ms: on an idle engine, longest wait for more requests to prefill with the first.
        join_wait_ms: while rows run, longest a newcomer waits for company before it is
            prefilled into the batch (default: ``max_wait_ms``).
        max_queue: most queued (not yet running) requests.
        check: called in the worker thread with each request right before it is admitted; an
            exception it raises fails that request alone (e.g. a prompt over the context length).
        after_round: called in the worker thread after each round of admitting and stepping
            (the engine process sends the round's events to the API process in one message).
        detokenize: ``False``: the engine produces token ids only — deltas are lists of ids,
            results carry ``token_ids``, stop strings are the caller's (the engine process,
            whose API process detokenises).
        start: ``True``: run the batching loop in a worker thread of its own, started now.
            ``False``: the caller runs it with :meth:`run`, in the thread that loaded the model
            (the engine process's main thread). On CPU that matters: an OpenMP thread pool
            belongs to the thread that starts parallel work, and once a second thread had its
            own next to the main thread's, every CPU kernel of a decode step ran 2-3x slower in
            the worker thread than in the main thread (measured; most likely libgomp stops
            letting idle pool threads spin once they outnumber the cores).
    """

    def __init__(self, engine: Any, max_batch: int = 16, max_wait_ms: float = 10.0,
                 max_queue: int = 256, check: Callable[[Any], None] | None = None,
                 after_round: Callable[[], None] | None = None, detokenize: bool = True,
                 join_wait_ms: float | None = None, start: bool = True):
        self.engine = engine
        self.detokenize = detokenize
        self.check = check
        self.after_round = after_round
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.join_wait = (max_wait_ms if join_wait_ms is None else join_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="llavamed-batcher", daemon=True)
            self._thread.start()

    failure: str | None = None
    """Why the scheduler stopped answering (never set in this process; see ``engine_proc``)."""

    @property
    def alive(self) -> bool:
        """Whether the scheduler takes requests."""
        return not self._closed

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

    def run(self) -> None:
        """Run the batching loop in the calling thread until :meth:`close` was called and the
        running requests finished (for a scheduler built with ``start=False``)."""
        if self._thread is not None:
            raise RuntimeError("this scheduler runs its loop in a thread of its own")
        self._run()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, cancel the queued ones, and wait for the running ones (when the
        loop runs in the scheduler's own thread; :meth:`run` returns once they are done)."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            _deliver(job, "error", SchedulerClosed())
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self, running: int, can_admit: bool) -> list[Job] | None:
        """The queued jobs to admit now (``None``: closed and nothing runs)."""
        with self._cond:
            while True:
                if running:
                    if self._closed or not can_admit or running >= self.max_batch:
                        return []
                    # Newcomers join together: when they fill the free rows, or once the first
                    # has waited join_wait (each admission costs a forward pass of its own).
                    if len(self._pending) < self.max_batch - running and self._pending and \
                            time.monotonic() - self._pending[0].enqueued_at < self.join_wait:
                        return []
                else:
                    while not self._pending and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return None
                    # Idle: give the first request's company max_wait to arrive.
                    deadline = self._pending[0].enqueued_at + self.max_wait
                    while len(self._pending) < self.max_batch and not self._closed:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                taken: list[Job] = []
                while self._pending and running + len(taken) < self.max_batch:
                    job = self._pending.popleft()
                    if job.cancelled:
                        self.stats.cancelled += 1
                        continue
                    taken.append(job)
                if taken or running:
                    return taken

    def _run(self) -> None:
        batch = self._new_batch()
        while True:
            jobs = self._take(len(batch.rows), batch.can_admit)
            if jobs is None:
                return
            if jobs:
                self._admit(batch, jobs)
            if batch.rows:
                self._step(batch)
            if self.after_round is not None:
                self.after_round()

    def _new_batch(self) -> Any:
        def on_delta(job: Job, text: str) -> None:
            if job.stream and not job.cancelled:
                job.sent.append(text)
                _deliver(job, "delta", text)

        return self.engine.running_batch(on_delta, lambda job: job.cancelled, lambda job: job.stream,
                                         detokenize=self.detokenize)

    def _admit(self, batch: Any, jobs: list[Job]) -> None:
        """Prefill queued jobs into the running batch; a failed prefill of several is retried
        one job at a time, so only a job that fails alone gets the error."""
        if self.check is not None:
            jobs = [job for job in jobs if self._passes_check(job)]
            if not jobs:
                return
        now = time.monotonic()
        for job in jobs:
            job.started_at = now
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        size = len(batch.rows) + len(jobs)
        try:
            finished = batch.admit([(job, job.request) for job in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc, "generation failed for one request")
                return
            log.warning("the prefill of %d requests failed (%s: %s); admitting them one at a time",
                        len(jobs), type(exc).__name__, exc, exc_info=not isinstance(exc, _EXPECTED))
            self.stats.failed_batches += 1
            finished = []
            for job in jobs:
                self.stats.retried_alone += 1
                try:
                    finished += batch.admit([(job, job.request)])
                except Exception as exc_alone:
                    self._fail(job, exc_alone, "generation failed for one request run alone")
        self._note_size(batch, jobs, size)
        self._settle(finished)

    def _step(self, batch: Any) -> None:
        """One decode step; if it fails, every running job is run again alone."""
        try:
            finished = batch.step()
        except Exception as exc:
            jobs = batch.clear()
            if len(jobs) == 1:
                self._fail(jobs[0], exc, "generation failed for one request")
                return
            # One bad row must not fail the others: run each request again, alone.
            log.warning("generation failed for a batch of %d (%s: %s); running its requests one "
                        "at a time", len(jobs), type(exc).__name__, exc, exc_info=not isinstance(exc, _EXPECTED))
            self.stats.failed_batches += 1
            for job in jobs:
                self._run_alone(job)
            return
        self.stats.steps += 1
        self._settle(finished)

    def _note_size(self, batch: Any, jobs: list[Job], size: int) -> None:
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, size)
        for row in batch.rows:
            row.index.batch_size = max(row.index.batch_size, size)
        for job in jobs:
            job.batch_size = max(job.batch_size, size)

    def _settle(self, finished: list) -> None:
        end = time.monotonic()
        for job, res in finished:
            job.finished_at = end
            if job.cancelled and not job.stopped_by_caller:
                self.stats.cancelled += 1
            _deliver(job, "done", res)

    def _fail(self, job: Job, exc: Exception, what: str) -> None:
        job.finished_at = time.monotonic()
        log.error("%s (%s: %s)", what, type(exc).__name__, exc, exc_info=not isinstance(exc, _EXPECTED))
        _deliver(job, "error", exc)

    def _generate(self, batch: list[Job], on_delta: Callable[[int, str], None]) -> list:
        def should_stop(i: int) -> bool:
            return batch[i].cancelled

        streaming = any(j.stream for j in batch)
        results = self.engine.generate([j.request for j in batch], batch_size=len(batch),
                                       on_delta=on_delta if streaming else None,
                                       should_stop=should_stop, detokenize=self.detokenize)
        if len(results) != len(batch):
            raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
        return results

    def _run_alone(self, job: Job) -> None:
        """Run one request of a failed batch by itself; a stream resumes where its client is."""
        if job.cancelled:
            self.stats.cancelled += 1
            return
        self.stats.retried_alone += 1
        # What the client holds: text, or token ids when the caller detokenises.
        sent: Any = "".join(job.sent) if self.detokenize else [t for part in job.sent for t in part]
        state = {"text": sent[:0], "diverged": False}

        def on_delta(_i: int, text: Any) -> None:
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
            self._fail(job, exc, "generation failed for one request run alone")
            return
        job.finished_at = time.monotonic()
        if state["diverged"] or (sent and state["text"][:len(sent)] != sent):
            job.cancelled = False
            _deliver(job, "error", RuntimeError("the streamed answer could not be resumed after its "
                                                "batch failed"))
            return
        if job.cancelled:
            self.stats.cancelled += 1
        _deliver(job, "done", result)

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

