"""Helpers for the ``llavamed serve`` tests: images as data URLs, and real servers on free ports.

Two ways to run a real server:

- :func:`start_cli_server` starts the real ``llavamed serve`` command in a subprocess on
  ``--port 0`` and reads its URL from the first log line;
- :class:`ThreadServer` runs :class:`llavamed_core.serve.server.Server` (the same uvicorn app) in
  a thread, sharing one already loaded tiny engine, so servers with different settings start in
  milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def random_image(seed: int, size: int = 32) -> Any:
    """A reproducible random RGB ``PIL.Image``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_bytes(img: Any) -> bytes:
    """An image encoded as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    """Bytes as a base64 data URL."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def image_message(url: str, text: str = "What does the image show?") -> list[dict]:
    """A one-turn user message with an image part and a text part (OpenAI form)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET /health`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            status = httpx.get(url + "/health", timeout=2.0).status_code
        except httpx.TransportError:
            status = None  # not listening yet
        if status == 200:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout} s")


def hang_up_after_first_text(url: str, body: dict) -> None:
    """Stream ``body`` from ``url``'s chat route and disconnect once the first text arrives."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            event = json.loads(line[6:]) if line.startswith("data: {") else {}
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                return


class CliServer:
    """A ``llavamed serve`` subprocess; stderr goes to a file the test can read."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        """Everything the server wrote on stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop the server (SIGTERM) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_cli_server(args: list[str], log_path: Path, env: dict | None = None,
                     wait: bool = True, timeout: float = 120.0, new_session: bool = False) -> CliServer:
    """Start ``llavamed serve --port 0 ARGS`` and return once its URL is known (and, with
    ``wait``, once ``/health`` answers 200); ``new_session``: in a process group of its own."""
    full_env = dict(os.environ, **(env or {}))
    err = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "llavamed_cli.main", "serve", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=err, env=full_env, start_new_session=new_session)
    err.close()
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        m = re.search(r"on (http://127\.0\.0\.1:\d+);", log_path.read_text(errors="replace"))
        if m:
            url = m.group(1)
        elif proc.poll() is not None:
            raise RuntimeError(f"llavamed serve exited with {proc.returncode}: {log_path.read_text()}")
        elif time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("llavamed serve printed no URL")
        else:
            time.sleep(0.05)
    server = CliServer(proc, url, log_path)
    if wait:
        try:
            wait_healthy(url, timeout, proc)
        except BaseException:
            server.stop()
            raise
    return server


class ThreadServer:
    """``Server(config)`` running in a thread of the test process.

    Args:
        config: a ``ServeConfig`` (use ``port=0``).
        engine_loader: returns the engine (e.g. a shared, already loaded tiny engine).
        wait: wait for ``/health`` 200 on entering.
    """

    def __init__(self, config: Any, engine_loader: Any = None, wait: bool = True):
        from llavamed_core.serve.server import Server

        self.server = Server(config, engine_loader=engine_loader)
        self.url = self.server.url
        self.state = self.server.state
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._wait = wait

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # surfaced by __exit__ / the test
            self.error = exc

    def __enter__(self) -> "ThreadServer":
        self._thread.start()
        if self._wait:
            wait_healthy(self.url, 60)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()
        self._thread.join(30)

    def client(self, api_key: str = "none", **kw: Any) -> Any:
        """An official ``openai`` client for this server (no retries, so statuses show)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt):
    """The tiny checkpoint loaded once in the test process (shared by in-thread servers)."""
    from llavamed_core.infer import Engine

    return Engine.load(tiny_ckpt, device="cpu")
