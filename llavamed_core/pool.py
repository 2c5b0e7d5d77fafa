"""The one thread pool for I/O jobs: downloads, tarball streams, LLM requests, remote answers.

Hand-written on ``threading`` because ``concurrent.futures`` joins its threads at interpreter exit,
so after Ctrl-C the process would wait for every in-flight socket read to time out.

:func:`map_unordered` runs a function over items on N worker threads and yields ``(item, result)``
in completion order, to the calling thread, which alone writes output files:

- **bounded**: at most ``2 × workers`` items are taken from ``items`` ahead of the consumer (the
  ones running and one queued per worker, so a worker never idles while the consumer writes), so a
  plan of hundreds of thousands of tarballs never becomes as many queued jobs;
- **prompt stop**: an exception a job raises is re-raised in the consumer at once (unless its type
  is in ``return_errors``: then it is yielded in place of the result and the run goes on); the
  worker sets ``stop`` before it reports the error, so no queued job starts after it. When the
  consumer stops for any reason (an error, Ctrl-C, leaving the loop) the ``stop`` event is set,
  queued jobs are skipped, and running jobs that poll ``stop`` end; the threads are daemons, so the
  process can exit without waiting for them. That is safe because every job writes through
  temporary files renamed only when complete (or leaves the writing to the consumer).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["map_unordered"]

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()  # tells a worker to exit
_SKIPPED = object()  # a job not run because the run is stopping


def map_unordered(fn: Callable[[T], R], items: Iterable[T], workers: int, *,
                  stop: threading.Event | None = None,
                  return_errors: tuple[type[BaseException], ...] = (),
                  name: str = "llavamed-io") -> Iterator[tuple[T, Any]]:
    """Run ``fn`` over ``items`` on ``workers`` threads; yield ``(item, result)`` as each finishes.

    Args:
        fn: the job for one item (called in a worker thread).
        items: the inputs, consumed lazily.
        workers: threads (at least 1).
        stop: an event set when the run is abandoned, so jobs that poll it end promptly (a new one
            when not given).
        return_errors: exception types yielded in place of the result; any other exception from
            ``fn`` stops the run and is raised here.
        name: the threads' name prefix.

    Yields:
        ``(item, result)``, or ``(item, exception)`` for an exception in ``return_errors``.
    """
    stop = stop if stop is not None else threading.Event()
    workers = max(1, int(workers))
    tasks: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[tuple[Any, Any, bool]] = queue.Queue()

    def work() -> None:
        while True:
            item = tasks.get()
            if item is _DONE:
                return
            if stop.is_set():
                results.put((item, _SKIPPED, False))
                continue
            try:
                results.put((item, fn(item), True))
            except BaseException as exc:  # handed to the consumer, which raises it
                if not isinstance(exc, return_errors):
                    stop.set()  # before this worker takes the next item: no job starts after a fatal error
                results.put((item, exc, False))

    it = iter(items)
    pending = 0

    def feed(n: int) -> None:
        nonlocal pending
        for x in itertools.islice(it, n):
            tasks.put(x)
            pending += 1

    threads: list[threading.Thread] = []
    finished = False
    try:
        feed(2 * workers)
        for i in range(min(workers, pending)):
            t = threading.Thread(target=work, name=f"{name}-{i}", daemon=True)
            t.start()
            threads.append(t)
        while pending:
            item, value, ok = results.get()
            pending -= 1
            if value is _SKIPPED:
                continue
            if not ok and not isinstance(value, return_errors):
                raise value
            feed(1)  # the next job starts before the consumer handles this result
            yield item, value
        finished = True
    finally:
        if not finished:
            stop.set()
        for _ in threads:
            tasks.put(_DONE)
        if finished:
            for t in threads:
                t.join()
