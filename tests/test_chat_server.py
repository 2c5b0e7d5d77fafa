"""``llavamed chat --server`` and ``llavamed eval vqa --server`` against a real ``llavamed serve``.

One real server process (tiny checkpoint, API key required) on a free local port; the answers
over HTTP must equal the in-process engine's (greedy), streamed or not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from llavamed_core.eval.answers import VQAEvalConfig, evaluate_vqa
from llavamed_core.infer import ChatRequest, Engine, GenerationParams
from llavamed_core.infer.remote import RemoteEngine
from llavamed_core.io import read_jsonl

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAVAMED_API_KEY=KEY)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "llavamed_cli.main", "serve", "--model", str(tiny_ckpt),
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llavamed serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llavamed serve did not become healthy: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine(tiny_ckpt) -> Engine:
    return Engine.load(tiny_ckpt)


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(path)
    return path


def test_chat_one_shot_over_http_equals_in_process(cli, server, engine, tmp_path):
    img = _image(tmp_path / "x.png")
    expected = engine.generate([ChatRequest(
        [{"role": "user", "content": [{"type": "image", "image": Image.open(img).convert("RGB")},
                                      {"type": "text", "text": "Is there a lesion?"}]}],
        GenerationParams(max_new_tokens=10))])[0].text
    r = cli("chat", img, "--server", server, "--api-key", KEY, "--prompt", "Is there a lesion?",
            "--temperature", "0", "--max-new-tokens", "10", "--json")
    assert r.exit_code == 0, r
    rec = json.loads(r.stdout)
    assert rec["text"] == expected and rec["model"] == "tiny"
    # Streaming through the same client gives the same text.
    remote = RemoteEngine.connect(server, api_key=KEY)
    req = ChatRequest([{"role": "user", "content": [{"type": "image", "image": Image.open(img).convert("RGB")},
                                                    {"type": "text", "text": "Is there a lesion?"}]}],
                      GenerationParams(max_new_tokens=10))
    assert "".join(remote.stream(req)) == expected
    remote.close()


def test_wrong_api_key_is_a_clear_error(cli, server, tmp_path):
    img = _image(tmp_path / "x.png")
    r = cli("chat", img, "--server", server, "--api-key", "wrong", "--prompt", "hi")
    assert r.exit_code == 1 and "refused" in r.stderr and "--api-key" in r.stderr


def test_eval_vqa_over_http_equals_in_process(server, tiny_ckpt, synth_data, tmp_path, cli):
    local = evaluate_vqa(VQAEvalConfig(dataset=synth_data / "test.json", out=tmp_path / "local",
                                       model=tiny_ckpt, max_new_tokens=12, limit=20))
    r = cli("eval", "vqa", "--server", server, "--api-key", KEY, "--dataset", synth_data / "test.json",
            "--out", tmp_path / "remote", "--max-new-tokens", "12", "--limit", "20", "--concurrency", "6",
            "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["server"] == server and res["metrics"] == local.results["metrics"]
    a = {o["question_id"]: o["text"] for o in read_jsonl(tmp_path / "local" / "answers.jsonl")}
    b = {o["question_id"]: o["text"] for o in read_jsonl(tmp_path / "remote" / "answers.jsonl")}
    assert a == b and len(b) == 20
