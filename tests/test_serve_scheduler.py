"""The batching scheduler on the real tiny engine: batches fill up to ``max_batch``, results equal
one-at-a-time generation, the queue is bounded, cancelled jobs are dropped, and failures reach
exactly the requests they concern (a failed batch is retried one request at a time)."""

from __future__ import annotations

import threading

import pytest

from serve_helpers import random_image, tiny_engine  # noqa: F401  (tiny_engine is a fixture)


def _request(i: int, max_new_tokens: int = 5):
    from llavamed_core.infer import ChatRequest, GenerationParams

    msgs = [{"role": "user", "content": [{"type": "image", "image": random_image(i)},
                                         {"type": "text", "text": f"Finding {i}?"}]}]
    return ChatRequest(msgs, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))


class _Collector:
    """A job sink that records what the worker delivers and signals the outcome."""

    def __init__(self):
        self.deltas: list[str] = []
        self.outcome = None
        self.kind = None
        self.done = threading.Event()

    def __call__(self, kind, payload):
        if kind == "delta":
            self.deltas.append(payload)
            return
        self.kind, self.outcome = kind, payload
        self.done.set()


def test_requests_queued_together_share_batches_and_match_single_runs(tiny_engine):
    from llavamed_core.serve.scheduler import BatchScheduler

    requests = [_request(i) for i in range(5)]
    alone = [tiny_engine.generate([r])[0] for r in requests]
    sched = BatchScheduler(tiny_engine, max_batch=4, max_wait_ms=500, max_queue=10)
    try:
        sinks = [_Collector() for _ in requests]
        jobs = [sched.submit(r, s, stream=(i == 0)) for i, (r, s) in enumerate(zip(requests, sinks))]
        for s in sinks:
            assert s.done.wait(60)
        assert [s.kind for s in sinks] == ["done"] * 5
        assert [s.outcome.text for s in sinks] == [a.text for a in alone]
        assert [j.batch_size for j in jobs] == [4, 4, 4, 4, 1]
        assert sched.stats.batches == 2 and sched.stats.max_batch_seen == 4
        # Only the streaming job got deltas, and they add up to its answer.
        assert "".join(sinks[0].deltas).strip() == sinks[0].outcome.text
        assert all(not s.deltas for s in sinks[1:])
    finally:
        sched.close()


class _Held:
    """The real engine, whose batches hold every admission at a gate until the test releases it."""

    def __init__(self, engine):
        self.engine = engine
        self.entered = threading.Event()
        self.gate = threading.Event()

    def running_batch(self, on_delta, should_stop, streams=None, detokenize=True):
        batch = self.engine.running_batch(on_delta, should_stop, streams, detokenize)
        admit = batch.admit

        def held_admit(items):
            self.entered.set()
            self.gate.wait(60)
            return admit(items)

        batch.admit = held_admit
        return batch

    def generate(self, requests, **kw):
        return self.engine.generate(requests, **kw)


def test_queue_is_bounded_and_cancelled_jobs_are_dropped(tiny_engine):
    from llavamed_core.serve.scheduler import BatchScheduler, QueueFull

    held = _Held(tiny_engine)
    sched = BatchScheduler(held, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        running = _Collector()
        sched.submit(_request(0), running)
        assert held.entered.wait(30)
        dropped, kept = _Collector(), _Collector()
        job = sched.submit(_request(1), dropped)
        sched.submit(_request(2), kept)
        with pytest.raises(QueueFull):
            sched.submit(_request(3), _Collector())
        job.cancel()  # its client went away while it waited
        held.gate.set()
        assert running.done.wait(60) and kept.done.wait(60)
        assert running.kind == kept.kind == "done"
        assert not dropped.done.is_set() and sched.stats.cancelled == 1 and sched.stats.requests == 2
    finally:
        sched.close()


def test_a_failing_batch_fails_only_its_bad_request_and_the_check_fails_only_one(tiny_engine):
    from llavamed_core.errors import ConfigError
    from llavamed_core.serve.scheduler import BatchScheduler

    def check(request):
        if request.messages[0]["content"][1]["text"] == "Finding 1?":
            raise ValueError("prompt too long")

    sched = BatchScheduler(tiny_engine, max_batch=4, max_wait_ms=300, check=check)
    try:
        sinks = [_Collector() for _ in range(3)]
        for i, s in enumerate(sinks):
            sched.submit(_request(i), s)
        for s in sinks:
            assert s.done.wait(60)
        assert [s.kind for s in sinks] == ["done", "error", "done"]
        assert str(sinks[1].outcome) == "prompt too long"
        # The engine rejects the whole batch (max_new_tokens=0 in one row): the batch is run again
        # one request at a time, so only the bad request gets the error and the other its answer.
        bad = [_Collector(), _Collector()]
        sched.submit(_request(5, max_new_tokens=0), bad[0])
        sched.submit(_request(6), bad[1])
        for s in bad:
            assert s.done.wait(60)
        assert [s.kind for s in bad] == ["error", "done"]
        assert isinstance(bad[0].outcome, ConfigError)
        assert bad[1].outcome.text == tiny_engine.generate([_request(6)])[0].text
        assert sched.stats.failed_batches == 1 and sched.stats.retried_alone == 2
        # ... and the worker carries on.
        after = _Collector()
        sched.submit(_request(7), after)
        assert after.done.wait(60) and after.kind == "done"
    finally:
        sched.close()


def test_close_answers_queued_requests_and_refuses_new_ones(tiny_engine):
    from llavamed_core.serve.scheduler import BatchScheduler, SchedulerClosed

    held = _Held(tiny_engine)
    sched = BatchScheduler(held, max_batch=1, max_wait_ms=0)
    first, queued = _Collector(), _Collector()
    sched.submit(_request(0), first)
    assert held.entered.wait(30)
    sched.submit(_request(1), queued)
    closer = threading.Thread(target=sched.close)
    closer.start()
    assert queued.done.wait(30) and isinstance(queued.outcome, SchedulerClosed)
    held.gate.set()
    closer.join(60)
    assert first.done.is_set() and first.kind == "done"
    with pytest.raises(SchedulerClosed):
        sched.submit(_request(2), _Collector())


@pytest.mark.parametrize("join_wait_ms, prefills", [(0, 3), (2000, 2)])
def test_newcomers_to_a_running_batch_wait_join_wait_for_company(tiny_engine, join_wait_ms, prefills):
    """While a long answer runs, two newcomers 50 ms apart are prefilled together when the join
    wait covers the gap (they fill the free rows, so no longer), apart when it does not; the
    idle engine's first request is admitted after max_wait either way."""
    import time

    from llavamed_core.serve.scheduler import BatchScheduler

    sched = BatchScheduler(tiny_engine, max_batch=3, max_wait_ms=0, join_wait_ms=join_wait_ms)
    try:
        long_sink, a, b = _Collector(), _Collector(), _Collector()
        sched.submit(_request(0, max_new_tokens=400), long_sink)
        while sched.stats.batches < 1:
            time.sleep(0.002)
        sched.submit(_request(1), a)
        time.sleep(0.05)
        sched.submit(_request(2), b)
        assert a.done.wait(60) and b.done.wait(60) and long_sink.done.wait(60)
        assert not long_sink.outcome.finish_reason == "cancelled"
        assert long_sink.outcome.completion_tokens > 50  # it was still running when both came
        assert sched.stats.batches == prefills
    finally:
        sched.close()


def test_a_scheduler_run_by_its_caller_batches_in_the_calling_thread_until_closed(tiny_engine):
    """``start=False``: no thread of its own; ``run()`` does the batching in the calling thread (the
    engine process's main thread, which loaded the model), answers equal one-at-a-time answers,
    and returns once ``close()`` (from another thread) let the running rows finish."""
    from llavamed_core.serve.scheduler import BatchScheduler

    rounds: list[str] = []
    sched = BatchScheduler(tiny_engine, max_batch=4, max_wait_ms=50, start=False,
                           after_round=lambda: rounds.append(threading.current_thread().name))
    sinks = [_Collector() for _ in range(3)]

    def client() -> None:
        for i, sink in enumerate(sinks):
            sched.submit(_request(i), sink)
        for sink in sinks:
            assert sink.done.wait(60)
        sched.close()

    before = threading.active_count()
    other = threading.Thread(target=client, name="client")
    other.start()
    sched.run()  # returns only after close()
    other.join(10)
    assert threading.active_count() == before  # no scheduler thread was started
    assert rounds and set(rounds) == {threading.current_thread().name}
    alone = tiny_engine.generate([_request(i) for i in range(3)], batch_size=1)
    assert [s.kind for s in sinks] == ["done"] * 3
    assert [s.outcome.text for s in sinks] == [r.text for r in alone]
    assert sched.stats.max_batch_seen == 3
    threaded = BatchScheduler(tiny_engine, max_batch=1)
    try:
        with pytest.raises(RuntimeError):
            threaded.run()  # its loop runs in its own thread already
    finally:
        threaded.close()
