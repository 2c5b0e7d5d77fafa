"""The one resumable LLM batch job behind ``instruct gen`` and ``eval gpt-score``.

:func:`run_llm_job` asks the LLM about every item not yet in the output, ``llm.concurrency`` at a
time (:func:`llavamed_core.llm.run_concurrent`), and appends each answer as it arrives through a
:class:`~llavamed_core.io.ResumableJsonl`, so a kill loses at most the answers in flight and a rerun
asks only for the rest. A request that fails for good (retries spent) is not an answer: it is
counted by kind and listed in ``<output stem>.failures.jsonl`` (id, reason, attempts). That file
describes the latest run only — it is removed when a run starts, created at its first failure, and
the items it lists are asked again by the next run.

The job stops with an :class:`~llavamed_core.errors.LLMError` once more than ``max_failures``
requests have failed, once ``llm.max_consecutive_failures`` fail in a row, or when every request
failed; what was answered is kept in any case. Progress events carry done/total, the caller's
counts, failures, tokens and (with prices) the cost so far.

Usage::

    with job_client(cfg.llm, client) as client:
        out = ResumableJsonl(cfg.output, "pair_id")
        todo = out.pending(samples, lambda s: s.pair_id)
        tally = run_llm_job(todo, ask, to_record, out, lambda s: s.pair_id, client, ...)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, LLMError
from .io import JsonlAppender, ResumableJsonl
from .llm import LLMClient, LLMConfig, LLMRequestFailed, run_concurrent
from .progress import ProgressCallback, emit

__all__ = ["JobTally", "check_max_failures", "failures_path", "job_client", "run_llm_job"]

T = TypeVar("T")


@dataclass
class JobTally:
    """What one job run did: answers written, requests failed for good (by kind), usage."""

    requested: int
    """Items asked about in this run (those not in the output already)."""
    succeeded: int = 0
    """Answers appended to the output."""
    failed: int = 0
    """Requests that failed for good (listed in the failures file)."""
    failure_reasons: dict[str, int] = field(default_factory=dict)
    """Failed requests by kind (``"HTTP 500"``, ``"timeout"``, …)."""
    usage: dict[str, Any] = field(default_factory=dict)
    """The client's usage counters at the end (requests, retries, tokens, cost)."""
    elapsed_s: float = 0.0
    """Seconds the job ran."""

    def reasons(self) -> str:
        """``"HTTP 500: 2, timeout: 1"``: the failure kinds and their counts."""
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.failure_reasons.items()))


def failures_path(output: str | os.PathLike) -> Path:
    """Where a job records its failed requests: ``gen.jsonl`` → ``gen.failures.jsonl``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.failures.jsonl")


def check_max_failures(max_failures: int | None) -> None:
    """Refuse a negative ``--max-failures`` before any work starts.

    Raises:
        ConfigError: naming the option and the value.
    """
    if max_failures is not None and max_failures < 0:
        raise ConfigError(f"--max-failures must be 0 or more, got {max_failures}")


@contextlib.contextmanager
def job_client(llm: LLMConfig, client: LLMClient | None = None) -> Iterator[LLMClient]:
    """``client`` as it is, or a new one for ``llm`` that is closed when the block ends."""
    if client is not None:
        yield client
        return
    own = LLMClient(llm)
    try:
        yield own
    finally:
        own.close()


def run_llm_job(todo: Sequence[T], ask: Callable[[T], Any], to_record: Callable[[T, Any], dict],
                output: ResumableJsonl, id_of: Callable[[T], Any], client: LLMClient, *,
                max_failures: int | None = None, progress: ProgressCallback | None = None,
                task: str = "llm", unit: str = "item",
                counts: Callable[[], dict[str, Any]] | None = None) -> JobTally:
    """Ask about every item of ``todo`` and append one record per answer to ``output``.

    Args:
        todo: the items to ask about (``output.pending(...)``: those not answered yet).
        ask: one item's request, run in worker threads (raises
            :class:`~llavamed_core.llm.LLMRequestFailed` when it fails for good).
        to_record: the record to append for an item and its answer (run in the calling thread,
            so it may count).
        output: the resumable output.
        id_of: an item's id, as the failures file records it.
        client: the LLM client (its config gives the concurrency and the failures-in-a-row limit).
        max_failures: stop once more than this many requests have failed (``None``: no limit).
        progress: receives ``task`` events (done/total in ``unit``).
        counts: the caller's counters for the progress events (``{"scored": 3, ...}``;
            default ``{"ok": answers}``).

    Returns:
        The tally of this run.

    Raises:
        LLMError: a fatal endpoint error (credentials, unknown model), too many failures in a row,
            more than ``max_failures`` failures, or every request failed. The answers so far are
            kept and a rerun resumes.
    """
    tally = JobTally(len(todo))
    fail_path = failures_path(output.path)
    start = time.monotonic()

    def report(finished: bool = False) -> None:
        u = client.usage
        info = dict(counts() if counts else {"ok": tally.succeeded})
        info.update(failed=tally.failed, tokens=u.tokens)
        if u.cost is not None:
            info["cost"] = round(u.cost, 4)
        emit(progress, task, tally.succeeded + tally.failed, tally.requested, unit, finished=finished, **info)

    # The failures file describes the latest run only: earlier failures are asked again now.
    fail_path.unlink(missing_ok=True)
    report()
    with output, JsonlAppender(fail_path, lazy=True) as failures:
        for item, res in run_concurrent(ask, todo, client.cfg.concurrency, client.cfg.max_consecutive_failures):
            if isinstance(res, LLMRequestFailed):
                tally.failed += 1
                tally.failure_reasons[res.kind] = tally.failure_reasons.get(res.kind, 0) + 1
                failures.write({output.key: id_of(item), "reason": res.reason, "attempts": res.attempts})
                if max_failures is not None and tally.failed > max_failures:
                    raise LLMError(
                        f"{tally.failed} requests failed, more than --max-failures {max_failures} "
                        f"({tally.reasons()}); stopped with {tally.succeeded} answered (kept in "
                        f"{output.path}); failures listed in {fail_path}",
                        "fix the cause (endpoint, model, quota), then rerun the same command: it resumes")
            else:
                output.write(to_record(item, res))
                tally.succeeded += 1
            report()
    report(finished=True)
    tally.usage = client.usage.snapshot()
    tally.elapsed_s = round(time.monotonic() - start, 3)
    if tally.requested and not tally.succeeded:
        raise LLMError(f"all {tally.requested} requests failed ({tally.reasons()}); listed in {fail_path}",
                       "check the endpoint, model name and quota, then rerun the same command")
    return tally
