"""``--engine vllm``: launch vLLM's OpenAI server for the checkpoint and put our API in front of it.

vLLM pins its own torch and transformers, so it lives in its own environment (see docs/chat-and-serve.md) and
runs as a separate program: we find its ``vllm`` executable (``--vllm-bin`` or ``PATH``), start
``vllm serve CKPT --host 127.0.0.1 --port <internal> --served-model-name NAME
--tensor-parallel-size N --gpu-memory-utilization F [EXTRA...]``, wait for its ``/health``, and
proxy ``/v1/chat/completions`` to it.

Why a proxy rather than exposing vLLM: our auth, request limits, image checks (remote-image
policy, pixel caps), error shapes, request log and web page stay the same for both engines, and
vLLM's other routes (``/tokenize``, ``/pause``, ... which its ``--api-key`` does not cover) are
never reachable from outside. vLLM listens on 127.0.0.1 only and requires a random per-launch key
that we pass in the ``VLLM_API_KEY`` environment variable, so it never shows in ``ps``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..errors import DependencyError, ModelError
from .api_errors import APIError, error_body
from .config import ServeConfig
from .backend import Backend, RequestContext
from .protocol import ParsedChat, decode_images

__all__ = ["find_vllm", "build_vllm_command", "check_vllm_checkpoint", "checkpoint_stop_strings",
           "VllmBackend", "INSTALL_HINT"]

# Projector activations vLLM's Llava implementation accepts (its get_act_fn names).
_VLLM_ACTIVATIONS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu"}

log = logging.getLogger("llavamed.serve")

INSTALL_HINT = ("install vLLM in its own environment (it pins its own torch and transformers): "
                "`python -m venv ~/.venvs/vllm && ~/.venvs/vllm/bin/pip install vllm`, then pass "
                "`--vllm-bin ~/.venvs/vllm/bin/vllm` (or put it on PATH); or use --engine native")


def find_vllm(vllm_bin: str | os.PathLike | None = None) -> Path:
    """The ``vllm`` executable: ``vllm_bin`` if given, else the first ``vllm`` on ``PATH``.

    Raises:
        DependencyError: not found or not executable, with how to install it.
    """
    if vllm_bin is not None:
        path = Path(vllm_bin).expanduser()
        if not path.is_file():
            raise DependencyError(f"--vllm-bin {path}: no such file", INSTALL_HINT)
        if not os.access(path, os.X_OK):
            raise DependencyError(f"--vllm-bin {path}: not executable", f"chmod +x {path}, or {INSTALL_HINT}")
        return path
    found = shutil.which("vllm")
    if found is None:
        raise DependencyError("vLLM is not installed here: no `vllm` executable on PATH", INSTALL_HINT)
    return Path(found)


def check_vllm_checkpoint(model: str | os.PathLike) -> None:
    """Refuse, before vLLM starts, a checkpoint vLLM cannot run: a projector activation it does
    not know (``projector_hidden_act: linear``, the LLaVA-Med v1 single linear projector).

    Raises:
        ModelError: one line with what to do instead.
    """
    path = Path(model) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the checkpoint checks elsewhere name a missing or broken config
    act = cfg.get("projector_hidden_act") if isinstance(cfg, dict) else None
    if isinstance(act, str) and act not in _VLLM_ACTIVATIONS:
        what = "the LLaVA-Med v1 single linear projector" if act == "linear" else "an activation"
        raise ModelError(f"{path}: projector_hidden_act is '{act}' ({what}), which vLLM cannot run",
                         "serve this checkpoint with --engine native (the default); vLLM runs v1.5-style "
                         "checkpoints (projector_hidden_act gelu)")


def checkpoint_stop_strings(model: str | os.PathLike) -> list[str]:
    """The checkpoint's stop strings (``generation_config.json``: ``llavamed_stop_strings``, or
    ``stop_strings`` from an older llavamed), which vLLM does not read itself."""
    from ..model.compat import read_stop_strings

    try:
        gen = json.loads((Path(model) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return read_stop_strings(gen) if isinstance(gen, dict) else []


def build_vllm_command(vllm_bin: str | os.PathLike, config: ServeConfig, port: int) -> list[str]:
    """The ``vllm serve`` command line for the checkpoint (no secrets in it).

    Args:
        vllm_bin: the executable.
        config: our settings (model, name, tensor parallelism, memory share, extra args).
        port: the internal port vLLM listens on (127.0.0.1 only).
    """
    v = config.vllm
    return [str(vllm_bin), "serve", str(Path(config.model).resolve()),
            "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", config.model_name,
            "--tensor-parallel-size", str(v.tensor_parallel_size),
            "--gpu-memory-utilization", f"{v.gpu_memory_utilization:g}",
            *v.extra_args]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmBackend(Backend):
    """vLLM's OpenAI server in a child process, behind our API.

    Args:
        config: the server settings (``config.vllm`` for the launch).
    """

    name = "vllm"
    context_length = None

    def __init__(self, config: ServeConfig):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.base_url = ""
        self.command: list[str] = []
        self._key = secrets.token_urlsafe(32)
        self._healthy = False
        self._closing = False
        self._client: Any = None
        self._stops: list[str] = checkpoint_stop_strings(config.model)

    @property
    def ready(self) -> bool:
        """vLLM answered ``/health`` and is still running."""
        return self._healthy and self.proc is not None and self.proc.poll() is None

    def precheck(self, chat: ParsedChat) -> None:
        """Nothing to check cheaply here: vLLM measures the prompt itself."""

    def prepare(self, chat: ParsedChat) -> None:
        """Decode the images to check them (blocking; in a preparation thread); vLLM gets the
        original data URLs, so the decoded pixels are dropped."""
        decode_images(chat, self.config.limits)
        for ref in chat.images:
            ref.image = None

    def stats(self) -> dict:
        """What ``/health`` shows about the child process."""
        return {"vllm_pid": self.proc.pid if self.proc else None}

    def start(self) -> None:
        """Launch vLLM and wait until its ``/health`` answers 200 (blocking; run in a thread).

        Raises:
            DependencyError: no ``vllm`` executable.
            ModelError: a checkpoint vLLM cannot run (checked first), or vLLM exited or did not
                become healthy in time (its log is on stderr).
        """
        import httpx

        check_vllm_checkpoint(self.config.model)
        exe = find_vllm(self.config.vllm.bin)
        port = self.config.vllm.port or free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.command = build_vllm_command(exe, self.config, port)
        log.info("starting vLLM: %s", " ".join(self.command))
        env = dict(os.environ, VLLM_API_KEY=self._key)
        env.pop("LLAVAMED_API_KEY", None)
        # Its own session, so stopping it also stops the workers it spawns (tensor parallel).
        self.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + self.config.vllm.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ModelError(f"vLLM exited with code {code} while starting (its log is above)",
                                     "check that the checkpoint loads in vLLM and the GPU has room; "
                                     "add vLLM options with --vllm-args")
                if self._closing:
                    return
                try:
                    healthy = client.get(self.base_url + "/health").status_code == 200
                except httpx.TransportError:
                    healthy = False  # not listening yet: keep polling until the deadline
                if healthy:
                    break
                if time.monotonic() > deadline:
                    self.close()
                    raise ModelError(f"vLLM did not become healthy within "
                                     f"{self.config.vllm.startup_timeout_s:g} s",
                                     "see its log above; a larger model needs a longer wait")
                time.sleep(0.5)
        self._healthy = True

    def close(self) -> None:
        """Stop vLLM (SIGTERM to its process group, SIGKILL after 30 s)."""
        self._closing = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            log.debug("vLLM already gone")

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                             limits=httpx.Limits(max_connections=None))
        return self._client

    async def aclose(self) -> None:
        """Close the proxy's HTTP connections."""
        if self._client is not None:
            await self._client.aclose()

    def _forward_body(self, chat: ParsedChat, body: dict) -> dict:
        fwd = dict(body)
        fwd["model"] = self.config.model_name
        fwd["messages"] = chat.openai_messages()
        if chat.max_tokens is not None:
            fwd.pop("max_completion_tokens", None)
            fwd["max_tokens"] = chat.max_tokens
        if self._stops:
            # The checkpoint's stop strings (v1: "###"), which vLLM does not take from the
            # checkpoint, with the request's own.
            own = fwd.get("stop")
            own = [own] if isinstance(own, str) else list(own or [])
            fwd["stop"] = own + [s for s in self._stops if s not in own]
        return fwd

    async def _send(self, chat: ParsedChat, body: dict) -> Any:
        import httpx

        client = self._http()
        req = client.build_request("POST", self.base_url + "/v1/chat/completions",
                                   json=self._forward_body(chat, body),
                                   headers={"Authorization": f"Bearer {self._key}"})
        try:
            return await client.send(req, stream=True)
        except httpx.TransportError:
            raise APIError(503, "the vLLM backend is not reachable", "server_error", None,
                           "backend_unavailable") from None

    @staticmethod
    async def _raise_for(resp: Any) -> None:
        if resp.status_code < 400:
            return
        raw = await resp.aread()
        await resp.aclose()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            raise APIError(resp.status_code, str(err.get("message") or "error from vLLM"),
                           str(err.get("type") or "invalid_request_error"), err.get("param"),
                           err.get("code") if isinstance(err.get("code"), str) else None)
        message = data.get("message") if isinstance(data, dict) else None
        raise APIError(resp.status_code, str(message or f"vLLM answered HTTP {resp.status_code}"),
                       "invalid_request_error" if resp.status_code < 500 else "server_error")

    async def complete(self, chat: ParsedChat, ctx: RequestContext, body: dict) -> dict:
        """Forward a non-streamed request and return vLLM's ``chat.completion`` (our id and name)."""
        resp = await self._send(chat, body)
        await self._raise_for(resp)
        try:
            data = json.loads(await resp.aread())
        finally:
            await resp.aclose()
        usage = data.get("usage") or {}
        ctx.record.update(prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"))
        data["id"] = ctx.request_id
        return data

    async def stream(self, chat: ParsedChat, ctx: RequestContext, body: dict) -> AsyncIterator[bytes]:
        """Forward a streamed request; vLLM's SSE bytes are relayed as they come."""
        resp = await self._send(chat, body)
        await self._raise_for(resp)
        return self._relay(resp, ctx)

    @staticmethod
    async def _relay(resp: Any, ctx: RequestContext) -> AsyncIterator[bytes]:
        import httpx

        done = False
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
            done = True
        except httpx.HTTPError:
            body = error_body("the vLLM backend dropped the stream", "server_error", None,
                              "backend_unavailable")
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
            done = True
        finally:
            await resp.aclose()  # closing our side makes vLLM abort the request
            if not done:
                ctx.record["finish"] = "client_gone"
