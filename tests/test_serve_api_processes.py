"""``llavamed serve --api-processes N``: several API processes in front of one engine process.

The contract: every answer is the one a single process gives (greedy, streamed, cut at a stop
string), each API process gets its own jobs' events, the engine's death reaches every API
process as a 503, and the processes live and die together (the death of any API process stops
the server with one error line; the first one's death takes the others and the engine with it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import data_url, image_message, png_bytes, random_image, start_cli_server
from serve_helpers import tiny_engine  # noqa: F401  (a fixture)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie no one reaped has stopped
    except FileNotFoundError:
        return False


def _gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """The pids still running after ``timeout`` (killed, so none is left behind)."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _health_of_each(url: str, count: int, timeout: float = 90.0) -> dict[int, dict]:
    """``/health`` of each of ``count`` API processes once it answers ``ok`` (new connections
    until every process has been reached)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        h = httpx.get(url + "/health", headers={"Connection": "close"}, timeout=10).json()
        if h["status"] == "ok":  # (another may finish its start a moment after the first)
            seen[h["api_process"]] = h
        else:  # only the first answers while the engine loads: the others take connections once ready
            assert h.get("api_process") == 0, h
            time.sleep(0.05)
    return seen


def _alone(engine, body: dict) -> tuple:
    from llavamed_core.infer import ChatRequest, GenerationParams

    content = body["messages"][0]["content"]
    if isinstance(content, list):
        content = [{"type": "image", "image": random_image(40)}, {"type": "text", "text": content[1]["text"]}]
    req = ChatRequest([{"role": "user", "content": content}],
                      GenerationParams(max_new_tokens=body["max_tokens"], temperature=0.0, stop=body.get("stop", [])))
    res = engine.generate([req])[0]
    return 200, res.text, "stop" if res.finish_reason == "stop" else "length"


def _ask(url: str, body: dict) -> tuple:
    if not body.get("stream"):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        choice = r.json()["choices"][0]
        return r.status_code, choice["message"]["content"], choice["finish_reason"]
    text, finish = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                text.append(event["choices"][0]["delta"].get("content") or "")
                finish = event["choices"][0].get("finish_reason") or finish
    return r.status_code, "".join(text), finish


def test_jobs_of_two_api_processes_reach_their_own_process_and_the_engines_death_reaches_both(tiny_ckpt, tiny_engine):
    """The link layer alone (both API ends in this process, the engine in its own): each end's
    jobs are answered as the engine answers them alone, to that end only; a killed engine is
    reported to the end that started it (exit code) and to the attached one (death pipe)."""
    from llavamed_core.infer import ChatRequest, GenerationParams
    from llavamed_core.serve.config import ServeConfig
    from llavamed_core.serve.engine_proc import EngineDied, EngineProcess, SharedEngine

    config = ServeConfig(model=tiny_ckpt, port=0, max_batch=8, max_wait_ms=200)
    shared = SharedEngine(2)
    first, second = EngineProcess(config, shared.link(0)), EngineProcess(config, shared.link(1))
    with ThreadPoolExecutor(2) as pool:  # the attached end waits for the engine the first end starts
        preparers = list(pool.map(lambda p: p.start(), (first, second)))
    try:
        assert first.pid == second.pid and first.pid != os.getpid()
        texts = ["Describe the lesion.", "Any fracture?", "Name one modality.", "What organ is this?"]
        wanted, got = {}, {}
        for end, preparer in zip((first, second), preparers):
            for i, text in enumerate(texts):
                req = ChatRequest([{"role": "user", "content": text}], GenerationParams(max_new_tokens=6 + i))
                wanted[(end.pid, id(end), i)] = tiny_engine.generate([req])[0].text
                req.prepared = preparer.prepare(req)
                key = (end.pid, id(end), i)
                end.submit(req, lambda kind, payload, key=key: got.setdefault(key, []).append((kind, payload)),
                           stream=i % 2 == 1)
        deadline = time.monotonic() + 60
        while len([k for k, v in got.items() if v[-1][0] == "done"]) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        for key, events in got.items():
            assert events[-1][0] == "done", events
            assert events[-1][1].text == wanted[key]
            if key[2] % 2:  # streamed: the deltas add up to the answer
                assert "".join(p for k, p in events if k == "delta") == wanted[key]
        assert set(got) == set(wanted)
        assert first.stats.requests == 8 or second.stats.requests == 8  # one engine ran all eight

        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (first.failure is None or second.failure is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.failure and "exit code -9" in first.failure
        assert second.failure and "the engine process stopped" in second.failure
        req = ChatRequest([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2))
        req.prepared = preparers[1].prepare(req)
        with pytest.raises(EngineDied):
            second.submit(req, lambda kind, payload: None)
    finally:
        second.close(timeout=5)
        first.close(timeout=5)


def test_three_api_processes_answer_as_one_and_the_death_of_one_stops_them_all(tiny_ckpt, tiny_engine, tmp_path):
    srv = start_cli_server(["--model", str(tiny_ckpt), "--api-processes", "3", "--max-batch", "8"],
                           tmp_path / "log.txt")
    try:
        # Each new connection goes to one of the processes; each answers, over one engine.
        seen = _health_of_each(srv.url, 3)
        assert set(seen) == {0, 1, 2}, seen
        assert len({h["engine_pid"] for h in seen.values()}) == 1
        assert len({h["api_pid"] for h in seen.values()}) == 3 and seen[0]["api_processes"] == 3

        lesion = {"messages": [{"role": "user", "content": "Describe the lesion."}], "max_tokens": 16,
                  "temperature": 0}
        full = _alone(tiny_engine, lesion)[1]
        stop = full[len(full) // 2:len(full) // 2 + 2]
        assert stop.strip()
        bodies = [{"messages": image_message(data_url(png_bytes(random_image(40))), "What is shown?"),
                   "max_tokens": 8, "temperature": 0},
                  {"messages": [{"role": "user", "content": "Name one modality."}], "max_tokens": 10,
                   "temperature": 0, "stream": True},
                  {**lesion, "stop": [stop]},
                  {**lesion, "stop": [stop], "stream": True}] * 3
        wanted = [_alone(tiny_engine, b) for b in bodies]
        answered_by: set[str] = set()
        for _ in range(10):  # until both processes have answered chat requests (connections are spread by the kernel)
            with ThreadPoolExecutor(len(bodies)) as pool:
                assert list(pool.map(lambda b: _ask(srv.url, b), bodies)) == wanted
            answered_by = set(re.findall(r" /v1/chat/completions 200 api=(\d)", srv.log()))
            if answered_by == {"0", "1", "2"}:
                break
        assert answered_by == {"0", "1", "2"}

        # The engine's counters in /health are current in every process, not only in the one
        # that answered last (each learns when another's request finished).
        deadline = time.monotonic() + 20
        while True:
            counters = {i: (h["requests"], h["steps"], h["batches"], h["cancelled"])
                        for i, h in _health_of_each(srv.url, 3).items()}
            if len(set(counters.values())) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(counters) == 3 and len(set(counters.values())) == 1, counters
        assert counters[0][0] >= len(bodies), counters

        # An API process dies: the server stops with one error line, taking the other API
        # process and the engine with it.
        os.kill(seen[2]["api_pid"], signal.SIGKILL)
        srv.proc.wait(30)
        assert srv.proc.returncode == 1, srv.log()
        assert "llavamed-api-2 exited with code -9; stopping the server" in srv.log()
        assert "Traceback" not in srv.log()
        assert _gone([seen[1]["api_pid"], seen[0]["engine_pid"]]) == []
    finally:
        srv.stop()


def test_killing_the_first_api_process_ends_the_others_and_the_engine(tiny_ckpt, tmp_path):
    srv = start_cli_server(["--model", str(tiny_ckpt), "--api-processes", "2"], tmp_path / "log.txt")
    try:
        h = _health_of_each(srv.url, 2).get(1, {})
        assert h.get("api_process") == 1
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
    finally:
        srv.stop()
    assert _gone([h["api_pid"], h["engine_pid"]]) == [], "an API process or the engine outlived the first one"
    with pytest.raises(httpx.TransportError):  # nobody holds the port any more
        httpx.get(srv.url + "/health", timeout=2)


def test_a_sigterm_to_the_whole_process_group_stops_the_server_cleanly(tiny_ckpt, tmp_path):
    """systemd (and ``timeout``) send SIGTERM to every process of the group: the engine process
    leaves its stopping to the API process, so no "engine process stopped" error is logged, and the
    server exits through the interpreter's own exit (143), leaking no semaphore."""
    srv = start_cli_server(["--model", str(tiny_ckpt), "--api-processes", "2"], tmp_path / "log.txt",
                           new_session=True)
    try:
        health = _health_of_each(srv.url, 2)
        engine, worker = health[0]["engine_pid"], health[1]["api_pid"]
        os.killpg(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(30)
    finally:
        srv.stop()
    assert _gone([engine, worker]) == []
    time.sleep(1.0)  # the resource tracker reports leaks once the last of them has gone
    log = srv.log()
    assert srv.proc.returncode == 143, log
    assert "ERROR" not in log and "engine process stopped" not in log and "leaked" not in log, log


def test_the_engines_full_queue_reaches_an_api_process_as_429():
    """With several API processes the engine's queue may fill before any one process's own bound:
    its refusal crosses the process boundary as QueueFull and is answered 429, not 500."""
    from llavamed_core.serve.engine_proc import _describe, _rebuild
    from llavamed_core.serve.native import map_engine_error
    from llavamed_core.serve.scheduler import QueueFull

    err = map_engine_error(_rebuild(_describe(QueueFull())))
    assert (err.status, err.code, err.headers.get("Retry-After")) == (429, "queue_full", "1")
