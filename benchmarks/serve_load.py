"""Load test of ``llavamed serve``: N concurrent clients, continuous batching vs ``--max-batch 1``.

Starts the real server (``python -m llavamed_cli.main serve``) twice on the same checkpoint —
once with batching (``--max-batch 32``), once with ``--max-batch 1`` (one request at a time, the
original demo's behaviour) — and drives each with 1, 8 and 32 concurrent clients sending image
chats (greedy, fixed ``max_tokens``). One request in ten is malformed (bad base64, not an image,
a 25-megapixel image, empty messages, an unknown model, broken JSON); those must be answered
4xx and the rest 200. Prints requests/s, p50/p99 latency and errors per level, and the
requests/s ratio of batching over ``--max-batch 1`` at 32 clients (target: at least 3x).

In the same run, two measures of the serving engine itself:

- server over engine: the batching server's requests/s at 32 clients (valid requests only)
  divided by the standalone engine's requests/s on the same requests at batch 32, loaded in
  this process with the same threads; measured in alternating rounds (server, engine, server,
  ...) and reported as the median of the rounds' ratios, because a shared machine's speed
  varies more from one run to the next than the effects measured (target: at least 0.8);
- the same scheduler alone, in this process, in a closed loop of as many clients with prepared
  requests: once with no turnaround, once with the server's measured turnaround (an answer's way
  out, the client, the next request's way in) — what the arrival pattern costs, without HTTP or
  the engine process;
- short during long: ``--long-requests`` answers of ``--long-tokens`` tokens sent at once, and
  a ``--short-tokens`` request sent a tenth of the way into them: its latency divided by the
  long batch's duration (target: at most 0.25; a static batch makes it wait, ratio >= 1).

Then, unless ``--api-processes 1``, a load where the API process is the limit: large images
(``--api-image-size``, PNG of noise, as a scanner's export is large) and 2-token answers, at the
most clients, against one server with ``--api-processes 1`` and one with ``--api-processes N``
in alternating rounds: the requests/s ratio shows what the extra API processes add where
decoding and preprocessing, not the model, bound the server.

Run::

    python benchmarks/serve_load.py                               # CPU, tiny model
    python benchmarks/serve_load.py --device cuda --size 0.5b     # one GPU, ~0.6B model, < 2 min

``--size 0.5b`` is the ``llava-med-v1.5`` preset (Mistral-7B width, CLIP ViT-L/14-336, 576 image
tokens) cut to 2 text layers and 12 vision layers, randomly initialised and saved (bf16 on CUDA)
to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(size: str, device: str, out: Path) -> dict:
    """Write a randomly initialised checkpoint of ``size`` to ``out``; return what was built."""
    import torch

    from llavamed_core.model import build_from_preset, save_checkpoint

    t0 = time.perf_counter()
    if size == "tiny":
        model, processor = build_from_preset("tiny", seed=0)
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, processor = build_from_preset("llava-med-v1.5", seed=0, dtype=dtype,
                                             text_overrides={"num_hidden_layers": 2},
                                             vision_overrides={"num_hidden_layers": 12})
    save_checkpoint(model, processor, out)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "image_size": processor.image_processor.crop_size["height"],
            "build_s": time.perf_counter() - t0}


def _png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_images(n: int, side: int) -> list[str]:
    """``n`` reproducible random RGB images as PNG data URLs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [_png_data_url(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
            for _ in range(n)]


def malformed_bodies() -> list[tuple[str, bytes]]:
    """(kind, raw body) of requests the server must answer with a 4xx."""
    from PIL import Image

    huge = _png_data_url(Image.new("L", (5000, 5000)))

    def chat(url: str, **kw) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}],
            "max_tokens": 8, **kw}).encode()

    return [
        ("bad-base64", chat("data:image/png;base64,@@@not-base64@@@")),
        ("not-an-image", chat("data:image/png;base64," + base64.b64encode(b"plain text").decode())),
        ("huge-image", chat(huge)),
        ("empty-messages", json.dumps({"messages": []}).encode()),
        ("unknown-model", json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode()),
        ("broken-json", b'{"messages": [{"role": "user", "content": '),
    ]


def start_server(ckpt: Path, max_batch: int, device: str, log_path: Path, extra: list[str],
                 cpu_threads: int | None) -> tuple[subprocess.Popen, str]:
    """Start ``llavamed serve`` on a free port; return the process and its URL once healthy
    (``proc.ready_s``: seconds from the command to the first healthy answer)."""
    import httpx

    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)

    cmd = [sys.executable, "-m", "llavamed_cli.main", "serve", "--model", str(ckpt), "--port", "0",
           "--max-batch", str(max_batch), "--max-wait-ms", "10", "--device", device, *extra]
    err = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    err.close()
    deadline = time.monotonic() + 600
    url = None
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become healthy in 600 s")
        if url is None:
            m = re.search(r"on (http://127\.0\.0\.1:\d+);", log_path.read_text(errors="replace"))
            url = m.group(1) if m else None
        if url is not None:
            try:
                healthy = httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                healthy = False  # still starting
            if healthy:
                proc.ready_s = time.monotonic() - t0  # type: ignore[attr-defined]
                return proc, url
        time.sleep(0.2)


def server_batches(lines: list[str]) -> dict:
    """Mean batch size and queue wait of the answered requests, from the server's request log."""
    def mean(key: str) -> float:
        vals = [float(m.group(1)) for m in (re.search(rf" {key}=(\d+)", ln) for ln in lines) if m]
        return statistics.fmean(vals) if vals else float("nan")

    return {"mean_batch": mean("batch"), "mean_ingest_ms": mean("ingest_ms"),
            "mean_queue_ms": mean("queue_ms"), "mean_gen_ms": mean("gen_ms")}


def server_measure(url: str, log_path: Path, clients: int, n: int, images: list[str], max_tokens: int) -> dict:
    """The server's side of the server-over-engine measure: ``n`` valid requests from ``clients``
    closed-loop clients, with how full its decode steps were and its turnaround, from ``/health``
    and the request log ``log_path``."""
    h0 = health_counters(url)
    seen = len(log_path.read_text(errors="replace").splitlines())
    server = asyncio.run(run_level(url, clients, n, images, max_tokens, [], 0))
    h1 = health_counters(url)
    logged = server_batches(log_path.read_text(errors="replace").splitlines()[seen:])
    done = max(1, h1["requests"] - h0["requests"])
    steps = max(1, h1["steps"] - h0["steps"])
    out = {k: server[k] for k in ("clients", "requests", "ok", "errors", "wall_s", "req_per_s")}
    out.update(steps_per_request=steps / done, prefills_per_request=(h1["batches"] - h0["batches"]) / done,
               # The prefill picks each answer's first token, each step one more per row (answers
               # ending early at EOS make this a slight overestimate).
               mean_rows_per_step=(max_tokens - 1) * done / steps,
               # From an answer leaving the engine to the client's next request joining its queue:
               # the answer's way out, the client, the next request's way in.
               turnaround_ms=server["mean_ms"] - logged["mean_queue_ms"] - logged["mean_gen_ms"])
    return out


def health_counters(url: str) -> dict:
    """The scheduler counters of a native server's ``/health`` (requests, steps, prefills)."""
    import httpx

    body = httpx.get(url + "/health", timeout=30).json()
    return {k: int(body.get(k, 0)) for k in ("requests", "steps", "batches")}


def stop_server(proc: subprocess.Popen) -> float:
    """Stop a server started by :func:`start_server` (SIGTERM); return the seconds until it exited."""
    t0 = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - t0


class LeanClient:
    """One keep-alive HTTP/1.1 connection with as little client-side work as possible.

    The load generator shares the machine with the server it measures (on a 2-core CPU, one core
    each for the engine and for the API process plus the clients): httpx spent ~3 ms of CPU per
    request, as much as the server's API process, so the figures measured the client. This one
    writes a prepared body and reads a ``Content-Length`` answer; a closed connection is reopened.
    """

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; return the status and the answer's body."""
        for attempt in (0, 1):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), len(body)) + body)
            try:
                await self._writer.drain()
                head = await self._reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
                continue  # the server closed the idle connection: open a new one and send again
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" not in headers:
                raise RuntimeError(f"answer without Content-Length: {lines[0]}")
            data = await self._reader.readexactly(int(headers["content-length"]))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, data
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
        self._reader = self._writer = None


def chat_body(image_url: str, text: str, max_tokens: int) -> bytes:
    """The JSON body of one greedy image chat."""
    return json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}],
        "max_tokens": max_tokens, "temperature": 0}).encode()


async def run_level(url: str, clients: int, total: int, images: list[str], max_tokens: int,
                    bad: list[tuple[str, bytes]], malformed_every: int) -> dict:
    """``clients`` concurrent clients send ``total`` requests in all (closed loop)."""
    per_client = max(1, total // clients)
    latencies: list[float] = []
    counts = {"ok": 0, "malformed_4xx": 0, "errors": 0}
    problems: list[str] = []
    path = "/v1/chat/completions"

    async def client(cid: int) -> None:
        http = LeanClient(url)
        try:
            for i in range(per_client):
                n = cid * per_client + i
                if malformed_every and n % malformed_every == malformed_every - 1:
                    kind, raw = bad[(n // malformed_every) % len(bad)]
                    try:
                        status, data = await http.post(path, raw)
                        ok = 400 <= status < 500 and "error" in json.loads(data)
                    except (OSError, RuntimeError, ValueError) as exc:
                        ok, status = False, exc
                    counts["malformed_4xx" if ok else "errors"] += 1
                    if not ok:
                        problems.append(f"{kind}: {status}")
                    continue
                body = chat_body(images[n % len(images)], f"What is the finding in image {n}?", max_tokens)
                t0 = time.perf_counter()
                status, data = 0, b""
                try:
                    status, data = await http.post(path, body)
                    good = status == 200 and json.loads(data)["choices"][0]["message"]["content"] is not None
                except (OSError, RuntimeError, ValueError, KeyError) as exc:
                    good, data = False, str(exc).encode()
                if good:
                    latencies.append(time.perf_counter() - t0)
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1
                    problems.append(f"valid request: {status} {data[:200]!r}")
        finally:
            await http.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = (lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] * 1000) if lat else (lambda p: float("nan"))
    return {"clients": clients, "requests": per_client * clients, **counts, "wall_s": wall,
            "req_per_s": counts["ok"] / wall, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), "problems": problems[:5]}


async def short_during_long(url: str, images: list[str], n_long: int, long_tokens: int,
                            short_tokens: int, short_after_s: float | None) -> dict:
    """Send ``n_long`` long requests at once and, ``short_after_s`` later, one short one."""

    async def one(n: int, max_tokens: int) -> tuple[float, float, int]:
        http = LeanClient(url)  # a connection per request: they run at the same time
        try:
            t0 = time.perf_counter()
            status, data = await http.post("/v1/chat/completions",
                                           chat_body(images[n % len(images)], f"Describe image {n} in detail.",
                                                     max_tokens))
            t1 = time.perf_counter()
        finally:
            await http.close()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return t0, t1, int(json.loads(data).get("usage", {}).get("completion_tokens", 0))

    start = time.perf_counter()
    longs = [asyncio.create_task(one(i, long_tokens)) for i in range(n_long)]
    short = None
    if short_after_s is not None:
        await asyncio.sleep(short_after_s)
        short = await one(1000, short_tokens)
    done = await asyncio.gather(*longs)
    out = {"long_batch_s": max(t1 for _, t1, _ in done) - start,
           "long_completion_tokens_mean": sum(c for _, _, c in done) / len(done)}
    if short is not None:
        out.update(short_latency_s=short[1] - short[0], short_sent_after_s=short_after_s,
                   short_completion_tokens=short[2])
    return out


def measure_short_during_long(url: str, images: list[str], n_long: int, long_tokens: int,
                              short_tokens: int) -> dict:
    """The long batch alone (to time it), then again with the short request a tenth of the way in."""
    alone = asyncio.run(short_during_long(url, images, n_long, long_tokens, short_tokens, None))
    mixed = asyncio.run(short_during_long(url, images, n_long, long_tokens, short_tokens,
                                          0.1 * alone["long_batch_s"]))
    mixed.update(long_batch_alone_s=alone["long_batch_s"], long_requests=n_long,
                 long_max_tokens=long_tokens, ratio=mixed["short_latency_s"] / mixed["long_batch_s"])
    return mixed


def engine_requests(images: list[str], n: int, max_tokens: int) -> list:
    """The requests :func:`run_level` sends (same images, texts, greedy, max_tokens), for the engine."""
    from PIL import Image

    from llavamed_core.infer import ChatRequest
    from llavamed_core.infer.engine import GenerationParams

    pil = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in images]
    return [ChatRequest([{"role": "user", "content": [{"type": "image", "image": pil[i % len(pil)]},
                                                      {"type": "text", "text": f"What is the finding in image {i}?"}]}],
                        GenerationParams(max_new_tokens=max_tokens, temperature=0.0)) for i in range(n)]


def load_engine(ckpt: Path, device: str, images: list[str], batch: int, max_tokens: int,
                cpu_threads: int | None) -> Any:
    """The standalone engine in this process, warmed up on a batch of ``batch``."""
    import torch

    from llavamed_core.infer import Engine

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    engine = Engine.load(ckpt, device=device)
    engine.generate(engine_requests(images, batch, max_tokens), batch_size=batch)
    return engine


def engine_rate(engine: Any, device: str, images: list[str], n: int, batch: int, max_tokens: int) -> dict:
    """Requests/s of ``engine`` on ``n`` of :func:`run_level`'s requests at ``batch`` (prepared
    inside the timing, as the engine prepares them when handed images)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    reqs = engine_requests(images, n, max_tokens)
    sync()
    t0 = time.perf_counter()
    out = engine.generate(reqs, batch_size=batch)
    sync()
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "batch_size": batch, "wall_s": wall, "req_per_s": len(out) / wall}


def server_over_engine(url: str, log_path: Path, engine: Any, device: str, images: list[str],
                       clients: int, n: int, rounds: int, max_tokens: int) -> dict:
    """Server requests/s at ``clients`` over the standalone engine's at batch ``clients``, measured
    in ``rounds`` alternating pairs of ``n`` requests each (server, then engine), under the keys
    the results JSON keeps them by.

    Alternating rounds make the two figures share the machine's state: on a shared 2-core CPU
    the same engine run back to back varies by ±25 %, more than the effects measured, and slow
    spells last several seconds. The ratio is the median of the rounds' own ratios (each round's
    server figure over the engine figure measured right after it); each side's best round and
    mean over all rounds are reported with it.
    """
    server_rounds, engine_rounds = [], []
    for _ in range(rounds):
        server_rounds.append(server_measure(url, log_path, clients, n, images, max_tokens))
        engine_rounds.append(engine_rate(engine, device, images, n, clients, max_tokens))
    ratios = [s["req_per_s"] / e["req_per_s"] for s, e in zip(server_rounds, engine_rounds)]

    def total(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows)

    server = {k: total(server_rounds, k) for k in ("requests", "ok", "errors", "wall_s")}
    server.update(clients=clients, rounds=rounds, req_per_s=max(r["req_per_s"] for r in server_rounds),
                  mean_req_per_s=server["ok"] / server["wall_s"],
                  round_req_per_s=[r["req_per_s"] for r in server_rounds])
    for key in ("steps_per_request", "prefills_per_request", "mean_rows_per_step", "turnaround_ms"):
        server[key] = statistics.fmean(r[key] for r in server_rounds)
    eng = {"requests": total(engine_rounds, "requests"), "wall_s": total(engine_rounds, "wall_s"),
           "batch_size": clients, "rounds": rounds, "req_per_s": max(r["req_per_s"] for r in engine_rounds),
           "round_req_per_s": [r["req_per_s"] for r in engine_rounds]}
    eng["mean_req_per_s"] = eng["requests"] / eng["wall_s"]
    return {"server_at_max_clients": server, "engine_standalone": eng, "server_over_engine": statistics.median(ratios),
            "server_over_engine_rounds": ratios, "server_over_engine_best": server["req_per_s"] / eng["req_per_s"]}


def api_processes_measure(ckpt: Path, device: str, log_dir: Path, processes: int, clients: int, n: int,
                          rounds: int, image_side: int, cpu_threads: int | None, max_tokens: int = 2) -> dict:
    """Requests/s of ``--api-processes processes`` over ``--api-processes 1`` on an API-bound load
    (``image_side``-pixel PNGs, ``max_tokens``-token answers, ``clients`` closed-loop clients), in
    ``rounds`` alternating rounds of ``n`` requests; the ratio is the median of the rounds' ratios."""
    images = make_images(8, image_side)
    servers = {}
    try:
        for count in (1, processes):
            log_path = log_dir / f"server-api-{count}.log"
            servers[count] = (*start_server(ckpt, 32, device, log_path, ["--api-processes", str(count)], cpu_threads),
                              log_path)
            asyncio.run(run_level(servers[count][1], clients, clients, images, max_tokens, [], 0))  # warm-up
        rates: dict[int, list[float]] = {1: [], processes: []}
        ingest: dict[int, list[float]] = {1: [], processes: []}
        errors = 0
        for _ in range(rounds):
            for count in (1, processes):
                _proc, url, log_path = servers[count]
                seen = len(log_path.read_text(errors="replace").splitlines())
                lv = asyncio.run(run_level(url, clients, n, images, max_tokens, [], 0))
                errors += lv["errors"]
                rates[count].append(lv["req_per_s"])
                ingest[count].append(server_batches(log_path.read_text(errors="replace").splitlines()[seen:])
                                     ["mean_ingest_ms"])
    finally:
        for proc, _url, _log in servers.values():
            stop_server(proc)
    ratios = [b / a for a, b in zip(rates[1], rates[processes])]
    return {"processes": processes, "clients": clients, "image_side": image_side, "max_tokens": max_tokens,
            "requests_per_round": n, "rounds": rounds, "errors": errors,
            "one_req_per_s": rates[1], "many_req_per_s": rates[processes],
            "one_mean_ingest_ms": statistics.fmean(ingest[1]), "many_mean_ingest_ms": statistics.fmean(ingest[processes]),
            "ratio": statistics.median(ratios), "round_ratios": ratios}


def closed_loop_round(engine: Any, device: str, images: list[str], n: int, clients: int, max_tokens: int,
                      turnaround_ms: float) -> dict:
    """:func:`scheduler_closed_loop` on ``n`` requests, right after the standalone engine on the
    same ``n`` (so that the two share the machine's moment); ``ratio`` is the first over the second."""
    standalone = engine_rate(engine, device, images, n, clients, max_tokens)
    cl = scheduler_closed_loop(engine, engine_requests(images, n, max_tokens), clients, 10.0, turnaround_ms / 1000.0)
    cl.update(standalone_req_per_s=standalone["req_per_s"], ratio=cl["req_per_s"] / standalone["req_per_s"])
    return cl


def closed_loops(engine: Any, device: str, images: list[str], n: int, clients: int, max_tokens: int,
                 turnaround_ms: float) -> list[dict]:
    """:func:`closed_loop_round` with no turnaround, then with the server's measured one."""
    return [closed_loop_round(engine, device, images, n, clients, max_tokens, t) for t in (0.0, turnaround_ms)]


def scheduler_closed_loop(engine, reqs: list, clients: int, max_wait_ms: float, turnaround_s: float,
                          seed: int = 0, join_wait_ms: float = 25.0) -> dict:
    """The server's :class:`BatchScheduler` alone: ``clients`` requests in flight, each answer
    followed by the client's next request ``turnaround_s`` later (uniformly 0.5–1.5 times that,
    seeded). The requests are prepared beforehand, as the server's API process does. Separates
    what the arrival pattern of a closed loop costs the engine from what HTTP and the engine
    process cost. The loop runs on this thread, the one that loaded the model, as in the engine
    process (see ``BatchScheduler``'s ``start``)."""
    import heapq
    import random
    import threading

    from llavamed_core.serve.scheduler import BatchScheduler

    for r in reqs:
        r.prepared = engine.prepare(r)
    sched = BatchScheduler(engine, max_batch=clients, max_wait_ms=max_wait_ms, join_wait_ms=join_wait_ms,
                           max_queue=len(reqs) + clients, start=False)
    rng = random.Random(seed)
    lock = threading.Condition()
    timers: list[tuple[float, int]] = []  # (when, request index), sent by the dispatcher thread
    state = {"next": min(clients, len(reqs)), "done": 0}
    finished = threading.Event()
    end: list[float] = []

    def sink(kind: str, _payload) -> None:
        if kind == "delta":
            return
        with lock:
            state["done"] += 1
            if state["done"] == len(reqs):
                end.append(time.perf_counter())
                finished.set()
            if state["next"] < len(reqs):
                when = time.monotonic() + turnaround_s * rng.uniform(0.5, 1.5)
                heapq.heappush(timers, (when, state["next"]))
                state["next"] += 1
                lock.notify()

    def dispatch() -> None:
        for i in range(min(clients, len(reqs))):
            sched.submit(reqs[i], sink)
        while not finished.is_set():
            with lock:
                while not timers and not finished.is_set():
                    lock.wait(0.1)
                if finished.is_set():
                    break
                when, i = timers[0]
                delay = when - time.monotonic()
                if delay > 0:
                    lock.wait(delay)
                    continue
                heapq.heappop(timers)
            sched.submit(reqs[i], sink)
        sched.close()

    before = sched.stats.steps, sched.stats.batches
    dispatcher = threading.Thread(target=dispatch, daemon=True)
    t0 = time.perf_counter()
    dispatcher.start()
    sched.run()  # until the dispatcher closes it, once every answer is in
    wall = end[0] - t0
    dispatcher.join(5)
    steps, prefills = sched.stats.steps - before[0], sched.stats.batches - before[1]
    return {"turnaround_ms": turnaround_s * 1000, "requests": len(reqs), "wall_s": wall,
            "req_per_s": len(reqs) / wall, "prefills_per_request": prefills / len(reqs),
            "steps_per_request": steps / len(reqs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default 128 for tiny, 32 for 0.5b); rounded to a multiple of the clients")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 32")
    ap.add_argument("--max-batch", type=int, default=32, help="batch size of the batching server")
    ap.add_argument("--image-size", type=int, default=None, help="side of the test images in pixels (default 64 for tiny, the model's for 0.5b)")
    ap.add_argument("--malformed-every", type=int, default=10, help="every Nth request is malformed (0 = none)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `llavamed serve` argument (repeat)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the server on CPU (default 1: on a small shared machine "
                         "more threads make the tiny model's timings erratic); 0 = torch's default")
    ap.add_argument("--ratio-requests", type=int, default=None,
                    help="requests of the server-over-engine measure, each side (default 2048 for tiny, 128 for 0.5b)")
    ap.add_argument("--ratio-rounds", type=int, default=None,
                    help="alternating server/engine rounds the ratio requests are split into (default 8 for tiny, 2 for 0.5b)")
    ap.add_argument("--long-requests", type=int, default=16, help="long answers of the short-during-long measure")
    ap.add_argument("--long-tokens", type=int, default=256, help="max_tokens of the long answers")
    ap.add_argument("--short-tokens", type=int, default=4, help="max_tokens of the short request")
    ap.add_argument("--api-processes", type=int, default=2,
                    help="API processes of the API-bound measure, against 1 (1 = skip it)")
    ap.add_argument("--api-image-size", type=int, default=1024, help="image side of the API-bound measure")
    ap.add_argument("--api-requests", type=int, default=256, help="requests per round of the API-bound measure")
    ap.add_argument("--api-rounds", type=int, default=3, help="alternating rounds of the API-bound measure")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()

    clients = [int(c) for c in args.clients.split(",")]
    total = args.requests or (128 if args.size == "tiny" else 32)
    max_tokens = args.max_tokens or 32
    top = max(clients)
    ratio_requests = args.ratio_requests or (2048 if args.size == "tiny" else 128)
    args.ratio_rounds = args.ratio_rounds or (8 if args.size == "tiny" else 2)
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        built = build_checkpoint(args.size, args.device, ckpt)
        print(f"checkpoint: {args.size}, {built['parameters'] / 1e6:.1f} M parameters, built in "
              f"{built['build_s']:.1f} s; device {args.device}; {total} requests per level, "
              f"max_tokens {max_tokens}, every {args.malformed_every}th malformed", flush=True)
        images = make_images(16, args.image_size or (64 if args.size == "tiny" else built["image_size"]))
        bad = malformed_bodies()
        runs = []
        for label, max_batch in (("batching", args.max_batch), ("max-batch 1", 1)):
            log_path = Path(tmp) / f"server-{max_batch}.log"
            proc, url = start_server(ckpt, max_batch, args.device, log_path,
                                     args.server_arg, args.cpu_threads if args.device == "cpu" else None)
            try:
                for n in (1, max(clients)):  # warm-up: first batches of a new size are slow
                    asyncio.run(run_level(url, n, n, images, max_tokens, [], 0))
                for n in clients:
                    seen = len(log_path.read_text(errors="replace").splitlines())
                    res = asyncio.run(run_level(url, n, max(total, n), images, max_tokens, bad,
                                                args.malformed_every))
                    res["config"] = label
                    res.update(server_batches(log_path.read_text(errors="replace").splitlines()[seen:]))
                    runs.append(res)
                    print(f"  {label:12s} clients={n:3d}  {res['req_per_s']:7.2f} req/s  p50 "
                          f"{res['p50_ms']:8.1f} ms  p99 {res['p99_ms']:8.1f} ms  ok {res['ok']}  "
                          f"malformed->4xx {res['malformed_4xx']}  errors {res['errors']}  | server means: "
                          f"batch {res['mean_batch']:.1f}, read+check {res['mean_ingest_ms']:.0f} ms, "
                          f"queue {res['mean_queue_ms']:.0f} ms, generate {res['mean_gen_ms']:.0f} ms", flush=True)
                    for p in res["problems"]:
                        print(f"    problem: {p}", flush=True)
                if max_batch > 1:
                    engine = load_engine(ckpt, args.device, images, top, max_tokens,
                                         args.cpu_threads if args.device == "cpu" else None)
                    soe = server_over_engine(url, log_path, engine, args.device, images, top,
                                             max(top, ratio_requests // args.ratio_rounds), args.ratio_rounds,
                                             max_tokens)
                    extra.update(soe)
                    server, eng = soe["server_at_max_clients"], soe["engine_standalone"]
                    print(f"  server vs standalone engine, {args.ratio_rounds} alternating rounds of "
                          f"{server['requests'] // args.ratio_rounds} requests ({server['ok']} ok, "
                          f"{server['errors']} errors): server req/s "
                          f"{', '.join(f'{r:.1f}' for r in server['round_req_per_s'])}; engine at batch {top} "
                          f"{', '.join(f'{r:.1f}' for r in eng['round_req_per_s'])}; median of the rounds' "
                          f"ratios {soe['server_over_engine']:.2f}, best over best "
                          f"{soe['server_over_engine_best']:.2f}", flush=True)
                    print(f"  server: {server['mean_rows_per_step']:.1f} rows per decode step, "
                          f"{server['prefills_per_request']:.2f} prefills per request, turnaround "
                          f"{server['turnaround_ms']:.0f} ms", flush=True)
                    sdl = measure_short_during_long(url, images, args.long_requests, args.long_tokens,
                                                    args.short_tokens)
                    extra["short_during_long"] = sdl
                    print(f"  short during long: {sdl['short_latency_s'] * 1000:.0f} ms for "
                          f"{sdl['short_completion_tokens']} tokens while {args.long_requests} answers "
                          f"of up to {args.long_tokens} tokens took {sdl['long_batch_s']:.2f} s", flush=True)
            finally:
                stop_s = stop_server(proc)
            # A server's start (command to the first healthy answer; the model loads in the
            # engine process) and stop (SIGTERM to exit), as a user meets them.
            extra.setdefault("start_stop", []).append({"config": label, "ready_s": proc.ready_s, "stop_s": stop_s})
            print(f"  {label}: healthy {proc.ready_s:.1f} s after the command; exited {stop_s:.2f} s after SIGTERM",
                  flush=True)
        turnaround = extra["server_at_max_clients"]["turnaround_ms"]
        eng = extra["engine_standalone"]
        eng["closed_loop"] = closed_loops(engine, args.device, images, max(top, ratio_requests // args.ratio_rounds),
                                          top, max_tokens, turnaround)
        for cl in eng["closed_loop"]:
            print(f"  scheduler in this process, {top} clients, turnaround {cl['turnaround_ms']:.0f} ms: "
                  f"{cl['req_per_s']:.2f} req/s ({cl['ratio']:.2f} of the standalone engine's "
                  f"{cl['standalone_req_per_s']:.2f} measured right before), "
                  f"{cl['prefills_per_request']:.2f} prefills and {cl['steps_per_request']:.2f} steps per request",
                  flush=True)
        if args.api_processes > 1:
            del engine  # its threads and memory stay out of the servers' way
            api = api_processes_measure(ckpt, args.device, Path(tmp), args.api_processes, top,
                                        max(top, args.api_requests), args.api_rounds, args.api_image_size,
                                        args.cpu_threads if args.device == "cpu" else None)
            extra["api_processes"] = api
            print(f"  API-bound load ({args.api_image_size}-px PNGs, {api['max_tokens']}-token answers, {top} clients): "
                  f"--api-processes 1 {', '.join(f'{r:.1f}' for r in api['one_req_per_s'])} req/s "
                  f"(mean read+check {api['one_mean_ingest_ms']:.0f} ms); --api-processes {args.api_processes} "
                  f"{', '.join(f'{r:.1f}' for r in api['many_req_per_s'])} req/s "
                  f"(mean read+check {api['many_mean_ingest_ms']:.0f} ms)", flush=True)

    print()
    header = f"{'config':12s} {'clients':>7s} {'requests':>8s} {'req/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s} {'malformed 4xx':>13s} {'errors':>6s}"
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r['config']:12s} {r['clients']:7d} {r['requests']:8d} {r['req_per_s']:8.2f} "
              f"{r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {r['malformed_4xx']:13d} {r['errors']:6d}")
    by = {(r["config"], r["clients"]): r for r in runs}
    ratio = by[("batching", top)]["req_per_s"] / by[("max-batch 1", top)]["req_per_s"]
    errors = sum(r["errors"] for r in runs) + extra["server_at_max_clients"]["errors"]
    over_engine = extra["server_over_engine"]
    sdl = extra["short_during_long"]
    print(f"\nbatching / max-batch 1 at {top} clients: {ratio:.2f}x requests/s (target >= 3x); "
          f"errors: {errors}; malformed answered 4xx: {sum(r['malformed_4xx'] for r in runs)}")
    print(f"server at {top} clients / standalone engine at batch {top}: {over_engine:.2f} "
          f"(median of {len(extra['server_over_engine_rounds'])} alternating rounds; best over best "
          f"{extra['server_over_engine_best']:.2f}; target >= 0.8)")
    print(f"short request ({args.short_tokens} tokens) latency / long batch duration: {sdl['ratio']:.3f} "
          f"(target <= 0.25)")
    if "api_processes" in extra:
        api = extra["api_processes"]
        errors += api["errors"]
        print(f"API-bound load: --api-processes {api['processes']} / --api-processes 1: {api['ratio']:.2f}x "
              f"requests/s (median of {api['rounds']} alternating rounds; {os.cpu_count()} CPUs; "
              f"errors {api['errors']})")
    if args.json:
        print(json.dumps({"size": args.size, "device": args.device, "max_tokens": max_tokens,
                          "parameters": built["parameters"], "runs": runs, "ratio_at_max_clients": ratio,
                          **extra, "server_over_engine": over_engine, "errors": errors},
                         indent=2))


if __name__ == "__main__":
    main()
