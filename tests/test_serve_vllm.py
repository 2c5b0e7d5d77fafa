"""``--engine vllm``: the command line we build, the missing-vLLM error, and the proxy end to end.

vLLM needs a GPU and its own environment, so the end-to-end test launches a stand-in ``vllm``
executable: a script that records its command line and environment, then runs ``llavamed serve``
on the given host, port and name with ``VLLM_API_KEY`` as its key — an OpenAI-compatible server
behind our proxy, exactly where vLLM would be.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time

import httpx
import openai
import pytest

from serve_helpers import (ThreadServer, data_url, image_message, png_bytes, random_image,
                           tiny_engine, wait_healthy)  # noqa: F401  (tiny_engine is a fixture)


def test_vllm_command_line(tiny_ckpt):
    from llavamed_core.serve.config import ServeConfig, VllmConfig
    from llavamed_core.serve.vllm import build_vllm_command

    cfg = ServeConfig(model=tiny_ckpt, served_model_name="llava-med", api_key="front-secret",
                      vllm=VllmConfig(tensor_parallel_size=4, gpu_memory_utilization=0.85,
                                      extra_args=["--max-model-len", "4096", "--enforce-eager"]))
    cmd = build_vllm_command("/opt/vllm/bin/vllm", cfg, 18001)
    assert cmd == ["/opt/vllm/bin/vllm", "serve", str(tiny_ckpt.resolve()), "--host", "127.0.0.1",
                   "--port", "18001", "--served-model-name", "llava-med", "--tensor-parallel-size", "4",
                   "--gpu-memory-utilization", "0.85", "--max-model-len", "4096", "--enforce-eager"]
    assert "front-secret" not in " ".join(cmd)  # keys never go on a command line (ps shows it)


def test_missing_vllm_is_a_clear_error(cli, tiny_ckpt, tmp_path):
    from llavamed_core.errors import DependencyError
    from llavamed_core.serve.vllm import find_vllm

    res = cli("serve", "--model", tiny_ckpt, "--engine", "vllm", env={"PATH": str(tmp_path)})
    assert res.exit_code == 1 and res.stdout == ""
    assert "Error: vLLM is not installed here: no `vllm` executable on PATH" in res.stderr
    assert "own environment" in res.stderr and "--vllm-bin" in res.stderr
    with pytest.raises(DependencyError, match="no such file"):
        find_vllm(tmp_path / "vllm")
    plain = tmp_path / "vllm"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(DependencyError, match="not executable"):
        find_vllm(plain)


FAKE_VLLM = '''#!{python}
"""Stand-in for vLLM: record argv, then serve the checkpoint with llavamed on the same address."""
import json, os, sys
args = sys.argv[1:]
with open({record!r}, "w") as f:
    json.dump({{"argv": args, "has_key": bool(os.environ.get("VLLM_API_KEY"))}}, f)
if {fail}:
    sys.exit(3)
opt = {{args[i]: args[i + 1] for i in range(2, len(args) - 1, 2)}}
env = dict(os.environ, LLAVAMED_API_KEY=os.environ["VLLM_API_KEY"])
os.execve(sys.executable, [sys.executable, "-m", "llavamed_cli.main", "serve", "--model", args[1],
          "--host", opt["--host"], "--port", opt["--port"], "--served-model-name",
          opt["--served-model-name"]], env)
'''


def _fake_vllm(tmp_path, fail=False):
    path = tmp_path / "vllm"
    record = tmp_path / "vllm-argv.json"
    path.write_text(FAKE_VLLM.format(python=sys.executable, record=str(record), fail=fail))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, record


def _vllm_config(model, vllm_bin, **kw):
    from llavamed_core.serve.config import ServeConfig, VllmConfig

    return ServeConfig(model=model, port=0, engine="vllm",
                       vllm=VllmConfig(bin=vllm_bin, extra_args=["--max-model-len", "512"],
                                       startup_timeout_s=120), **kw)


def test_proxy_to_vllm_end_to_end(tiny_ckpt, tiny_engine, tmp_path):
    from llavamed_core.infer import ChatRequest, GenerationParams

    vllm, record = _fake_vllm(tmp_path)
    cfg = _vllm_config(tiny_ckpt, vllm, api_key="front-key")
    with ThreadServer(cfg, wait=False) as srv:
        wait_healthy(srv.url, 120)
        backend = srv.state.backend
        argv = json.loads(record.read_text())
        assert argv["argv"][:3] == ["serve", str(tiny_ckpt.resolve()), "--host"]
        assert argv["argv"][-2:] == ["--max-model-len", "512"] and argv["has_key"]
        assert "front-key" not in json.dumps(argv)
        client = srv.client(api_key="front-key")
        url = data_url(png_bytes(random_image(4)))
        res = client.chat.completions.create(model="tiny", messages=image_message(url), max_tokens=8,
                                             temperature=0)
        msgs = [{"role": "user", "content": [{"type": "image", "image": random_image(4)},
                                             {"type": "text", "text": "What does the image show?"}]}]
        want = tiny_engine.generate([ChatRequest(msgs, GenerationParams(max_new_tokens=8))])[0]
        assert res.choices[0].message.content == want.text
        assert res.usage.prompt_tokens == want.prompt_tokens
        chunks = list(client.chat.completions.create(model="tiny", messages=image_message(url),
                                                     max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        # Our auth and limits are in front: refused here, never forwarded.
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=image_message("data:image/png;base64,!!"))
        assert exc.value.code == "invalid_base64"
        # vLLM itself is on 127.0.0.1 behind a key only the proxy knows.
        direct = httpx.post(backend.base_url + "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}]})
        assert direct.status_code == 401
        pid = backend.proc.pid
    # Stopping the server stops vLLM.
    deadline = time.monotonic() + 30
    while backend.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_vllm_that_dies_at_startup_stops_the_server(tiny_ckpt, tmp_path):
    from llavamed_core.errors import ModelError

    vllm, _record = _fake_vllm(tmp_path, fail=True)
    srv = ThreadServer(_vllm_config(tiny_ckpt, vllm), wait=False)
    with srv:
        srv._thread.join(60)
        assert not srv._thread.is_alive()
    assert isinstance(srv.error, ModelError)
    assert "vLLM exited with code 3 while starting" in srv.error.message

