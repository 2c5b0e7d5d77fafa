"""A bounded pool of I/O threads (downloads, tarball streams) that stops promptly.

:func:`map_unordered` keeps at most ``2 × workers`` jobs queued, so a plan of hundreds of thousands
of tarballs never becomes hundreds of thousands of queued jobs, and yields results as they finish.
The threads are daemons: when the consumer is interrupted (Ctrl-C) the ``stop`` event is set and
the process can exit at once instead of waiting for a socket read to time out. That is safe
because every job writes through temporary files that are renamed only when complete.
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

_DONE = object()


def map_unordered(fn: Callable[[T], R], items: Iterable[T], workers: int,
                  stop: threading.Event) -> Iterator[R]:
    """Run ``fn`` over ``items`` on ``workers`` threads; yield results in completion order.

    Args:
        fn: the job; an exception it raises is re-raised here (and the remaining jobs stop).
        items: the inputs (consumed lazily).
        workers: threads.
        stop: set when the run is abandoned, so jobs that poll it end promptly.

    Yields:
        Each job's result as it completes.
    """
    tasks: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def work() -> None:
        while True:
            item = tasks.get()
            if item is _DONE:
                return
            if stop.is_set():
                results.put((False, None))
                continue
            try:
                results.put((True, fn(item)))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                results.put((False, exc))

    threads = [threading.Thread(target=work, name=f"llavamed-io-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    it = iter(items)
    pending = 0
    finished = False
    try:
        for x in itertools.islice(it, 2 * workers):
            tasks.put(x)
            pending += 1
        while pending:
            ok, value = results.get()
            pending -= 1
            if not ok:
                if value is None:
                    continue  # a job skipped because the run is stopping
                raise value
            yield value
            for x in itertools.islice(it, 1):
                tasks.put(x)
                pending += 1
        finished = True
    finally:
        if not finished:
            stop.set()
        for _ in threads:
            tasks.put(_DONE)
        if finished:
            for t in threads:
                t.join()
