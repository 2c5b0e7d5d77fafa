"""The serving engine on the real tiny checkpoint: iteration-level batching and penalties.

- Rows admitted into a running batch at different steps, with different prompt lengths, images
  and limits, give exactly the answers they give alone (greedy and seeded sampling), stream
  deltas that add up to their text, and leave the batch as they finish.
- The scheduler lets a short request join a batch of long answers and finish first; newcomers
  that fill the free rows are prefilled together at once; a cancelled row leaves without
  touching the others.
- Frequency, presence and repetition penalties match a straight implementation of vLLM's formula
  on logits, and end to end a cache-less decode loop that applies that formula; a penalised
  request answers the same in a batch as alone, and the same through the HTTP API.
- The engine process of a real server: 503 while it loads, answers equal to the engine alone,
  and its death is a clear 503 (in-flight stream, later requests, ``/health``), never a hang.
"""

from __future__ import annotations

import threading

import pytest

from serve_helpers import random_image, tiny_engine  # noqa: F401  (tiny_engine is a fixture)


def _request(i: int, max_new_tokens: int = 12, image: bool = True, words: int = 0, **params):
    from llavamed_core.infer import ChatRequest, GenerationParams

    text = f"Finding {i}?" + " and more" * words
    content = [{"type": "image", "image": random_image(i)}, {"type": "text", "text": text}] if image else text
    return ChatRequest([{"role": "user", "content": content}],
                       GenerationParams(max_new_tokens=max_new_tokens, **params))


# ----------------------------------------------------------------------------- admission
@pytest.mark.parametrize("streaming", ["all", "even"])
def test_rows_joining_at_different_steps_answer_as_alone(tiny_engine, streaming):
    """With ``streaming="even"`` odd rows do not stream: they skip the incremental text (decoded
    once at the end) and must answer the same, with no deltas."""
    requests = [
        _request(0, max_new_tokens=20),
        _request(1, max_new_tokens=6, image=False, words=9),
        _request(2, max_new_tokens=14, words=3, temperature=0.9, seed=5),
        _request(3, max_new_tokens=9, image=False),
        _request(4, max_new_tokens=16, words=6),
    ]
    alone = [tiny_engine.generate([r])[0] for r in requests]
    # When each request joins the running batch: two at the start, then at steps 2, 3 and 7.
    joins = {0: [0, 1], 2: [2], 3: [3], 7: [4]}
    deltas: dict[int, list[str]] = {}
    results = {}
    streams = None if streaming == "all" else (lambda k: k % 2 == 0)
    batch = tiny_engine.running_batch(lambda k, d: deltas.setdefault(k, []).append(d), None, streams)
    assert batch._mask_4d  # the steps take their padding mask ready-made (SDPA, full attention)
    sizes = []
    step = 0
    with tiny_engine._lock:
        while step == 0 or batch.rows or any(s > step for s in joins):
            if step in joins:
                results.update(batch.admit([(k, requests[k]) for k in joins[step]]))
            sizes.append(len(batch.rows))
            results.update(batch.step())
            step += 1
    assert [results[k].text for k in range(5)] == [a.text for a in alone]
    assert [results[k].finish_reason for k in range(5)] == [a.finish_reason for a in alone]
    assert [results[k].completion_tokens for k in range(5)] == [a.completion_tokens for a in alone]
    assert [results[k].prompt_tokens for k in range(5)] == [a.prompt_tokens for a in alone]
    streamed = [k for k in range(5) if streams is None or streams(k)]
    assert ["".join(deltas.get(k, [])) for k in streamed] == [alone[k].text for k in streamed]
    assert sorted(deltas) == [k for k in streamed if alone[k].text]
    assert max(sizes) >= 4 and sizes[-1] <= 1  # rows ran together, then left as they finished
    assert len({a.text for a in alone}) == 5


def test_admission_failure_leaves_the_running_rows_alone(tiny_engine):
    from llavamed_core.errors import ConfigError

    ref = tiny_engine.generate([_request(0, max_new_tokens=10)])[0]
    results = {}
    batch = tiny_engine.running_batch()
    with tiny_engine._lock:
        results.update(batch.admit([("a", _request(0, max_new_tokens=10))]))
        results.update(batch.step())
        with pytest.raises(ConfigError, match="max_new_tokens"):
            batch.admit([("b", _request(1)), ("bad", _request(2, max_new_tokens=0))])
        assert [r.index for r in batch.rows] == ["a"]
        while batch.rows:
            results.update(batch.step())
    assert results["a"].text == ref.text


# ----------------------------------------------------------------------------- scheduler
class _Sink:
    def __init__(self):
        self.deltas: list[str] = []
        self.kind = self.outcome = None
        self.first = threading.Event()
        self.done = threading.Event()

    def __call__(self, kind, payload):
        if kind == "delta":
            self.deltas.append(payload)
            self.first.set()
            return
        self.kind, self.outcome = kind, payload
        self.done.set()


def test_a_short_request_joins_running_long_ones_and_finishes_first(tiny_engine):
    from llavamed_core.serve.scheduler import BatchScheduler

    long_reqs = [_request(11, max_new_tokens=300), _request(12, max_new_tokens=300, words=4)]
    short_req = _request(14, max_new_tokens=3, image=False)
    cancel_req = _request(13, max_new_tokens=300)
    alone = [tiny_engine.generate([r])[0] for r in [*long_reqs, short_req]]
    sched = BatchScheduler(tiny_engine, max_batch=8, max_wait_ms=0)
    try:
        longs = [_Sink() for _ in long_reqs]
        for r, s in zip(long_reqs, longs):
            sched.submit(r, s, stream=True)
        assert all(s.first.wait(60) for s in longs)  # the long answers are being decoded
        short, cancelled = _Sink(), _Sink()
        cancel_job = sched.submit(cancel_req, cancelled, stream=True)
        sched.submit(short_req, short)
        assert short.done.wait(60) and short.kind == "done"
        assert not any(s.done.is_set() for s in longs)  # it did not wait for the long answers
        assert cancelled.first.wait(60)
        cancel_job.cancel()  # its client went away: the row leaves, the others go on
        assert cancelled.done.wait(60) and cancelled.outcome.finish_reason == "cancelled"
        assert all(s.done.wait(120) for s in longs)
        assert [s.outcome.text for s in [*longs, short]] == [a.text for a in alone]
        assert [s.outcome.finish_reason for s in longs] == ["length", "length"]
        assert ["".join(s.deltas) for s in longs] == [a.text for a in alone[:2]]
        assert sched.stats.max_batch_seen == 4 and sched.stats.cancelled == 1
        assert sched.stats.requests == 4 and sched.stats.failed_batches == 0
    finally:
        sched.close()


def test_newcomers_that_fill_the_free_rows_are_prefilled_together_without_waiting(tiny_engine):
    from llavamed_core.serve.scheduler import BatchScheduler

    first = [_request(11, max_new_tokens=300), _request(12, max_new_tokens=300, words=4),
             _request(15, max_new_tokens=3, image=False), _request(16, max_new_tokens=4)]
    newcomers = [_request(17, max_new_tokens=5), _request(18, max_new_tokens=6, image=False)]
    alone = [tiny_engine.generate([r])[0].text for r in newcomers]
    # A minute of max_wait: newcomers may only join early because they fill the free rows.
    sched = BatchScheduler(tiny_engine, max_batch=4, max_wait_ms=60_000)
    try:
        sinks = [_Sink() for _ in first]
        for r, s in zip(first, sinks):
            sched.submit(r, s, stream=True)
        assert sinks[2].done.wait(60) and sinks[3].done.wait(60)  # two rows are free now
        assert not sinks[0].done.is_set() and not sinks[1].done.is_set()
        late = [_Sink() for _ in newcomers]
        for r, s in zip(newcomers, late):
            sched.submit(r, s)
        assert all(s.done.wait(60) for s in late)
        assert not sinks[0].done.is_set() and not sinks[1].done.is_set()
        assert [s.outcome.text for s in late] == alone
        assert sched.stats.batches == 2 and sched.stats.requests == 6
    finally:
        sched.close()


def test_a_cache_that_cannot_merge_makes_newcomers_wait_for_an_empty_batch(tiny_engine, monkeypatch):
    from llavamed_core.errors import ConfigError
    from llavamed_core.infer import batch as batch_mod
    from llavamed_core.serve.scheduler import BatchScheduler

    # A sliding-window or quantised cache cannot be merged: static batching, same answers.
    monkeypatch.setattr(batch_mod, "_mergeable", lambda cache: False)
    long_req, late_req = _request(11, max_new_tokens=40), _request(17, max_new_tokens=5)
    alone = [tiny_engine.generate([r])[0].text for r in (long_req, late_req)]
    batch = tiny_engine.running_batch()
    with tiny_engine._lock:
        batch.admit([("long", long_req)])
        assert not batch.can_admit
        with pytest.raises(ConfigError, match="cannot take new rows"):
            batch.admit([("late", late_req)])
        batch.clear()
    sched = BatchScheduler(tiny_engine, max_batch=4, max_wait_ms=0)
    try:
        first, late = _Sink(), _Sink()
        sched.submit(long_req, first, stream=True)
        assert first.first.wait(60)
        sched.submit(late_req, late)
        assert late.done.wait(60) and first.done.is_set()  # it waited for the batch to empty
        assert [first.outcome.text, late.outcome.text] == alone
    finally:
        sched.close()


# ----------------------------------------------------------------------------- penalties
def _reference_penalties(logits, prompt_ids, output_ids, repetition, frequency, presence):
    """vLLM's formula written out token by token."""
    out = logits.clone()
    for t in range(out.shape[0]):
        if repetition != 1.0 and (t in prompt_ids or t in output_ids):
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        count = output_ids.count(t)
        out[t] -= frequency * count
        if count:
            out[t] -= presence
    return out


@pytest.mark.parametrize("repetition,frequency,presence",
                         [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, -1.5),
                          (1.2, 0.5, 0.5), (1.0, -2.0, 2.0)])
def test_penalties_match_the_formula(repetition, frequency, presence):
    import torch

    from llavamed_core.infer.penalties import RowPenalties

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen) * 3
    prompt, output = [1, 2, 3, 3, 40], [3, 7, 7, 7, 12, 49]
    pen = RowPenalties(50, prompt, repetition, frequency, presence)
    for t in output:
        pen.add(t)
    expected = _reference_penalties(logits, prompt, output, repetition, frequency, presence)
    assert torch.allclose(pen.apply(logits), expected, atol=1e-6)
    assert not torch.equal(expected, logits)


def _reference_decode(engine, request, max_new: int) -> str:
    """Greedy decoding without a cache: the whole sequence each step, vLLM's penalties, argmax."""
    import torch

    p = request.params
    prepared = engine.prepare(request)
    ids = list(prepared.input_ids)
    prompt = list(ids)
    out: list[int] = []
    for _ in range(max_new):
        kwargs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if "pixel_values" in prepared.tensors:
            kwargs["pixel_values"] = prepared.tensors["pixel_values"]
        with torch.inference_mode():
            logits = engine.model(**kwargs).logits[0, -1].float()
        logits = _reference_penalties(logits, prompt, out, p.repetition_penalty, p.frequency_penalty,
                                      p.presence_penalty)
        token = int(logits.argmax())
        if token in engine.eos_token_ids:
            break
        out.append(token)
        ids.append(token)
    return engine.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_penalised_greedy_matches_a_cacheless_reference_and_batches_as_alone(tiny_engine):
    from llavamed_core.infer import ChatRequest, GenerationParams

    plain = _request(20, max_new_tokens=24)
    ref_plain = tiny_engine.generate([plain])[0]
    toks = tiny_engine.tokenizer(ref_plain.text, add_special_tokens=False)["input_ids"]
    assert len(set(toks)) < len(toks)  # the plain answer repeats tokens: penalties have work to do
    variants = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(repetition_penalty=1.8),
                dict(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4)]
    penalised = [ChatRequest(plain.messages, GenerationParams(max_new_tokens=24, **v)) for v in variants]
    alone = [tiny_engine.generate([r])[0] for r in penalised]
    for req, res in zip(penalised, alone):
        assert res.text != ref_plain.text
        assert res.text == _reference_decode(tiny_engine, req, 24)
    # Batched with plain requests of other lengths == alone.
    others = [_request(21, max_new_tokens=10, words=5), _request(22, max_new_tokens=24, image=False)]
    mixed = [others[0], *penalised, others[1]]
    together = tiny_engine.generate(mixed, batch_size=len(mixed))
    assert [r.text for r in together[1:-1]] == [a.text for a in alone]
    assert [together[0].text, together[-1].text] == [tiny_engine.generate([o])[0].text for o in others]


def test_bad_penalties_are_refused(tiny_engine):
    from llavamed_core.errors import ConfigError
    from llavamed_core.infer import ChatRequest, GenerationParams

    msgs = [{"role": "user", "content": "hi"}]
    for bad, field in [(dict(frequency_penalty=2.5), "frequency_penalty"),
                       (dict(presence_penalty=float("nan")), "presence_penalty"),
                       (dict(repetition_penalty=0.0), "repetition_penalty")]:
        with pytest.raises(ConfigError, match=field):
            tiny_engine.generate([ChatRequest(msgs, GenerationParams(max_new_tokens=2, **bad))])


# ----------------------------------------------------------------------------- engine process
def test_engine_process_answers_as_in_process_and_its_death_is_a_clear_503(tiny_ckpt, tiny_engine, caplog,
                                                                           monkeypatch):
    import json
    import logging
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    # `llavamed serve` run in-process by an earlier test stops "llavamed" records at its own handler.
    monkeypatch.setattr(logging.getLogger("llavamed"), "propagate", True)

    import httpx

    from llavamed_core.serve.config import ServeConfig
    from serve_helpers import ThreadServer, data_url, image_message, png_bytes

    from llavamed_core.infer import ChatRequest, GenerationParams

    def alone(body):
        content = body["messages"][0]["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": random_image(40)}, {"type": "text", "text": content[1]["text"]}]
        req = ChatRequest([{"role": "user", "content": content}],
                          GenerationParams(max_new_tokens=body["max_tokens"], temperature=0.0,
                                           stop=body.get("stop", [])))
        res = tiny_engine.generate([req])[0]
        return 200, res.text, "stop" if res.finish_reason == "stop" else "length", res.completion_tokens

    # A stop string from the middle of an answer (the engine process leaves stop strings to the
    # API process, which detokenises its ids and cancels the row): cut where the engine cuts.
    lesion = {"messages": [{"role": "user", "content": "Describe the lesion."}], "max_tokens": 16,
              "temperature": 0}
    full = alone(lesion)[1]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip() and len(full) > 6
    bodies = [{"messages": image_message(data_url(png_bytes(random_image(40))), "What is shown?"),
               "max_tokens": 8, "temperature": 0},
              {"messages": [{"role": "user", "content": "Name one modality."}], "max_tokens": 10,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
              {"messages": [{"role": "user", "content": "Any lesion?"}], "max_tokens": 6, "temperature": 0},
              {**lesion, "stop": [stop]},
              {**lesion, "stop": [stop], "stream": True, "stream_options": {"include_usage": True}}]

    def ask(url, body):
        if not body.get("stream"):
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            choice = r.json()["choices"][0]
            return (r.status_code, choice["message"]["content"], choice["finish_reason"],
                    r.json()["usage"]["completion_tokens"])
        text, finish, used = [], None, None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event["choices"]:
                    text.append(event["choices"][0]["delta"].get("content") or "")
                    finish = event["choices"][0].get("finish_reason") or finish
                if event.get("usage"):
                    used = event["usage"]["completion_tokens"]
            return r.status_code, "".join(text), finish, used

    cfg = ServeConfig(model=tiny_ckpt, port=0, max_batch=4, max_wait_ms=300)
    caplog.set_level(logging.INFO, logger="llavamed")  # the request log lines
    with ThreadServer(cfg, wait=False) as srv:  # no engine handed over: the model loads in a child
        seen = []
        while not seen or seen[-1][0] != 200:
            r = httpx.get(srv.url + "/health", timeout=30)
            seen.append((r.status_code, r.json().get("status")))
            time.sleep(0.2)
        assert seen[0] == (503, "loading")
        pid = httpx.get(srv.url + "/health").json()["engine_pid"]
        assert pid != os.getpid()
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: ask(srv.url, b), bodies))
        assert answers == [alone(b) for b in bodies]
        assert answers[3][2] == "stop" and answers[3][3] < alone(lesion)[3]  # the stop string cut it
        # Answers ended here at a stop string are logged with their queue and generation times too.
        lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions 200" in r.getMessage()]
        cut = [m for m in lines if "finish=stop" in m and f"completion_tokens={answers[3][3]} " in m]
        assert len(cut) == 2 and all("queue_ms=" in m and "gen_ms=" in m and "batch=" in m for m in cut), lines
        health = httpx.get(srv.url + "/health").json()
        assert health["requests"] == len(bodies) and health["max_batch_seen"] >= 2
        assert health["cancelled"] == 0  # rows ended at a stop string are not cancellations

        # The engine process dies while a streamed answer is in flight: the stream ends with a 503
        # error event, new requests get 503, /health says why; nothing hangs. The engine is frozen
        # (SIGSTOP) before the request, so the answer cannot finish before the kill, however fast
        # the engine or slow this client.
        long = {"messages": [{"role": "user", "content": "Describe everything."}], "max_tokens": 400,
                "temperature": 0, "stream": True}
        events = []
        os.kill(pid, signal.SIGSTOP)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:  # the stream has started (its role chunk)
                        os.kill(pid, signal.SIGKILL)
        assert len(events) >= 2 and events[-1]["error"]["code"] == "engine_died", events[-1]
        r = httpx.post(srv.url + "/v1/chat/completions", json=bodies[2], timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_died"
        assert "the engine process stopped (exit code -9)" in r.json()["error"]["message"]
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert "engine process stopped" in h.json()["error"]
    assert any("the engine process stopped" in rec.getMessage() for rec in caplog.records)


def test_penalties_sent_to_the_server_reach_the_engine(tiny_ckpt, tiny_engine):
    import httpx

    from llavamed_core.infer import ChatRequest, GenerationParams
    from llavamed_core.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    text = "Describe the scan in detail."
    penalties = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)
    msgs = [{"role": "user", "content": text}]
    expected = tiny_engine.generate([ChatRequest(msgs, GenerationParams(max_new_tokens=24, **penalties))])[0]
    plain = tiny_engine.generate([ChatRequest(msgs, GenerationParams(max_new_tokens=24))])[0]
    assert expected.text != plain.text
    with ThreadServer(ServeConfig(model=tiny_ckpt, port=0), engine_loader=lambda: tiny_engine) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": msgs, "max_tokens": 24, "temperature": 0, **penalties})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected.text


def test_the_engine_process_stops_when_its_api_process_is_killed(tiny_ckpt, tmp_path):
    """The decode loop runs on the engine process's main thread (its messages arrive on another):
    when the API process is killed mid-answer, the engine process still notices and exits at once,
    running rows and all, instead of living on as an orphan holding the model."""
    import os
    import signal
    import threading
    import time

    import httpx

    from serve_helpers import start_cli_server

    srv = start_cli_server(["--model", str(tiny_ckpt)], tmp_path / "log.txt")
    try:
        pid = httpx.get(srv.url + "/health").json()["engine_pid"]
        long = {"messages": [{"role": "user", "content": "Describe everything."}], "max_tokens": 4000,
                "temperature": 0}

        def ask() -> None:
            try:
                httpx.post(srv.url + "/v1/chat/completions", json=long, timeout=60)
            except httpx.HTTPError:
                pass  # its server is killed below

        threading.Thread(target=ask, daemon=True).start()
        time.sleep(0.5)  # the answer is being generated
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
    finally:
        srv.stop()

    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()  # a zombie no one reaped has stopped
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = alive()
    if orphan:  # do not leave it behind
        os.kill(pid, signal.SIGKILL)
    assert not orphan, "the engine process outlived its API process"


def test_a_message_the_engine_process_cannot_read_ends_it_and_requests_fail_instead_of_hanging(tiny_ckpt):
    """The engine process reads its messages in a thread beside the decode loop: if that thread
    fails, the process exits (status 1), so the API side reports the engine dead rather than
    waiting forever for answers."""
    import time

    from llavamed_core.infer import ChatRequest, GenerationParams
    from llavamed_core.serve.config import ServeConfig
    from llavamed_core.serve.engine_proc import EngineDied, EngineProcess

    proc = EngineProcess(ServeConfig(model=tiny_ckpt, port=0))
    preparer = proc.start()
    try:
        got = []
        req = ChatRequest([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=4))
        req.prepared = preparer.prepare(req)
        done = []
        proc.submit(req, lambda kind, payload: done.append(kind))
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            time.sleep(0.02)
        assert done == ["done"]  # it answers
        proc._down.put(("submit", 1))  # a message of the wrong shape (a bug on the API side)
        deadline = time.monotonic() + 30
        while proc.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.failure is not None and "exit code 1" in proc.failure
        try:
            proc.submit(req, lambda kind, payload: got.append(kind))
        except EngineDied:
            got.append("died")
        assert got == ["died"]
    finally:
        proc.close(timeout=5)


def test_closing_the_engine_process_lets_running_answers_finish_whole(tiny_ckpt, tiny_engine):
    """close() while answers are being generated and more wait: each running one arrives whole
    (equal to the engine's answer alone, its streamed deltas adding up to it), each waiting one
    gets its error, and then the engine process leaves with status 0. (It ends with ``os._exit``
    once its outboxes are sent: nothing may be lost, nothing may fail on the way out.)"""
    import time

    from llavamed_core.serve.config import ServeConfig
    from llavamed_core.serve.engine_proc import EngineProcess
    from llavamed_core.serve.scheduler import SchedulerClosed

    wanted = [tiny_engine.generate([_request(i, max_new_tokens=40, image=i % 2 == 0)])[0].text for i in range(3)]
    proc = EngineProcess(ServeConfig(model=tiny_ckpt, port=0, max_batch=3))
    preparer = proc.start()
    try:
        got: dict[int, list] = {i: [] for i in range(3 + 40)}
        reqs = [_request(i, max_new_tokens=40, image=i % 2 == 0) for i in range(3 + 40)]
        for req in reqs:
            req.prepared = preparer.prepare(req)
        for i, req in enumerate(reqs[:3]):  # together: one batch, the engine's whole width
            proc.submit(req, lambda kind, payload, i=i: got[i].append((kind, payload)), stream=True)
        deadline = time.monotonic() + 60
        while not all(got[i] for i in range(3)) and time.monotonic() < deadline:  # every row has begun
            time.sleep(0.005)
        for i, req in enumerate(reqs[3:], 3):  # these wait for a free row
            proc.submit(req, lambda kind, payload, i=i: got[i].append((kind, payload)))
        assert all(got[i] for i in range(3)) and not any(got[i][-1][0] == "done" for i in range(3))
        proc.close(timeout=60)
        for i in range(3):
            events = got[i]
            assert events[-1][0] == "done", events[-1]
            assert events[-1][1].text == wanted[i]
            assert "".join(p for k, p in events if k == "delta") == wanted[i]
        waited = [got[i] for i in range(3, 43)]
        assert all(len(ev) == 1 and ev[0][0] in ("done", "error") for ev in waited), waited
        assert any(ev[0][0] == "error" for ev in waited)  # (a few may have finished before the close)
        assert all(isinstance(ev[0][1], SchedulerClosed) for ev in waited if ev[0][0] == "error")
        assert proc._proc.exitcode == 0
    finally:
        proc.close(timeout=5)
