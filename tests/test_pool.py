"""The one thread pool (``llavamed_core.pool.map_unordered``) used by downloads, extraction, the LLM
jobs and the remote engine.

Covers: the results equal a plain loop's; items are taken lazily, at most two per worker ahead of
the consumer; a job's exception reaches the consumer and stops the rest; chosen exception types are
handed back as results; leaving the loop early sets the stop event (so polling jobs end) and skips
what was queued; the threads are daemons (Ctrl-C never waits for them).
"""

from __future__ import annotations

import threading

import pytest

from llavamed_core.pool import map_unordered


def test_results_equal_a_plain_loop():
    items = list(range(50))
    got = dict(map_unordered(lambda x: x * x, items, 4))
    assert got == {x: x * x for x in items}
    assert dict(map_unordered(lambda x: x, [], 4)) == {}


def test_items_are_taken_lazily_two_per_worker_ahead():
    taken: list[int] = []
    gate = threading.Event()

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    def job(x: int) -> int:
        gate.wait()
        return x

    it = map_unordered(job, items(), 3)
    # Before any job finishes, only 2 × 3 items have been taken from the generator.
    first = threading.Thread(target=lambda: next(it))
    first.start()
    while len(taken) < 6:
        gate.wait(0.001)  # let the pool take what it will
    for _ in range(50):
        gate.wait(0.001)
    assert len(taken) == 6
    gate.set()
    first.join()
    rest = list(it)
    assert len(rest) == 99 and len(taken) == 100


def test_a_job_error_reaches_the_consumer_and_stops_the_rest():
    ran: list[int] = []
    stop = threading.Event()

    def job(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        stop.wait(0.05 if x > 3 else 0)  # later jobs are still queued when 3 fails
        ran.append(x)
        return x

    with pytest.raises(ValueError, match="bad item 3"):
        list(map_unordered(job, range(1000), 2, stop=stop))
    assert stop.is_set()
    assert len(ran) < 20  # items are taken lazily and what was queued is skipped, not run


def test_one_worker_starts_nothing_after_a_fatal_error():
    """A 401 with ``--concurrency 1`` must be the only request: the worker stops itself before it
    takes the queued item, however late the consumer thread gets to see the error."""
    started: list[int] = []

    def job(x: int) -> int:
        started.append(x)
        if x == 0:
            raise ValueError("fatal")
        return x

    for _ in range(50):  # the race needs no sleep to show: run it many times
        started.clear()
        with pytest.raises(ValueError):
            list(map_unordered(job, range(10), 1))
        assert started == [0]


def test_chosen_errors_are_results():
    class Soft(Exception):
        pass

    def job(x: int) -> int:
        if x % 2:
            raise Soft(x)
        return x

    got = dict(map_unordered(job, range(6), 2, return_errors=(Soft,)))
    assert sorted(k for k, v in got.items() if isinstance(v, Soft)) == [1, 3, 5]
    assert {k: v for k, v in got.items() if not isinstance(v, Soft)} == {0: 0, 2: 2, 4: 4}


def test_leaving_early_sets_stop_and_threads_are_daemons():
    stop = threading.Event()
    seen_stop: list[bool] = []
    names: list[str] = []

    def job(x: int) -> int:
        names.append(threading.current_thread().name)
        assert threading.current_thread().daemon
        if x > 0:
            seen_stop.append(stop.wait(30))  # a long transfer that polls the stop event
        return x

    gen = map_unordered(job, range(10), 2, stop=stop, name="t-pool")
    for x, _ in gen:
        if x == 0:
            break
    gen.close()
    assert stop.is_set()
    for t in [t for t in threading.enumerate() if t.name.startswith("t-pool")]:
        assert t.daemon
        t.join()
    assert seen_stop and all(seen_stop)  # the running job saw the stop, rather than its timeout
    assert all(n.startswith("t-pool-") for n in names)
