"""``llavamed data download`` end to end against a real local server holding the released files.

The server serves the manifest's paths under ``/med_llava/``; tests check the files, the recorded
sha256s in ``MANIFEST.json``, skipping and ``--verify`` on reruns, failures, the mirror setting,
and resuming a download whose process was killed (SIGKILL) with an HTTP Range request.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from http_fixtures import FileServer
from llavamed_core.data.manifest import RELEASED_FILES

QA50 = Path(__file__).resolve().parent / "data" / "llava_med_eval_qa50_qa.jsonl"


@pytest.fixture(autouse=True)
def _no_data_url(monkeypatch):
    monkeypatch.delenv("LLAVAMED_DATA_URL", raising=False)


def _content(path: str) -> bytes:
    if path.endswith("llava_med_eval_qa50_qa.jsonl") and QA50.exists():
        return QA50.read_bytes()
    seed = int(hashlib.sha1(path.encode()).hexdigest()[:8], 16)
    rnd = random.Random(seed)
    return json.dumps([{"id": i, "v": rnd.random()} for i in range(200)]).encode()


@pytest.fixture
def released():
    """A server holding every released file under /med_llava/ (small stand-ins)."""
    with FileServer() as srv:
        contents = {}
        for f in RELEASED_FILES:
            contents[f.path] = _content(f.path)
            srv.add(f"med_llava/{f.path}", contents[f.path])
        srv.contents = contents
        yield srv


def _gets(srv: FileServer) -> int:
    return sum(1 for r in srv.log if r.method == "GET")


def test_download_eval_and_urls_then_rerun_skips(cli, released, tmp_path):
    dest = tmp_path / "data"
    res = cli("data", "download", "eval", "image-urls", "--dest", dest,
              "--base-url", released.url("med_llava/"), "--workers", "3")
    assert res.exit_code == 0, res
    assert "data download" in res.stdout and "downloaded" in res.stdout
    want = [f for f in RELEASED_FILES if f.group in ("eval", "image-urls")]
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    for f in want:
        data = (dest / f.path).read_bytes()
        assert data == released.contents[f.path]
        rec = manifest["files"][f.path]
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert not (dest / "alignment").exists() and not (dest / "instruct").exists()
    assert not list(dest.rglob("*.part*"))

    before = _gets(released)
    res = cli("data", "download", "eval", "image-urls", "--dest", dest,
              "--base-url", released.url("med_llava/"), "--json")
    assert res.exit_code == 0, res
    report = json.loads(res.stdout)
    assert {f["status"] for f in report["files"]} == {"present"} and len(report["files"]) == len(want)
    assert _gets(released) == before  # nothing fetched again


def test_verify_refetches_a_corrupted_file(cli, released, tmp_path):
    dest = tmp_path / "data"
    base = released.url("med_llava")  # no trailing slash: joined all the same
    assert cli("data", "download", "eval", "--dest", dest, "--base-url", base).exit_code == 0
    target = dest / "eval/llava_med_eval_qa50_fig_captions.json"
    good = target.read_bytes()
    target.write_bytes(bytes(b ^ 0xFF for b in good[:10]) + good[10:])  # same size, other bytes
    # Without --verify the size matches, so the file counts as present.
    res = cli("data", "download", "eval", "--dest", dest, "--base-url", base, "--json")
    assert {f["status"] for f in json.loads(res.stdout)["files"]} == {"present"}
    res = cli("data", "download", "eval", "--dest", dest, "--base-url", base, "--verify", "--json")
    assert res.exit_code == 0, res
    status = {f["path"]: f["status"] for f in json.loads(res.stdout)["files"]}
    assert status == {"eval/llava_med_eval_qa50_qa.jsonl": "verified",
                      "eval/llava_med_eval_qa50_fig_captions.json": "re-downloaded",
                      "eval/llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json": "verified"}
    assert target.read_bytes() == good


def test_existing_file_without_record_is_checked_and_recorded(cli, released, tmp_path):
    dest = tmp_path / "data"
    path = "instruct/llava_med_instruct_10k.json"
    (dest / "instruct").mkdir(parents=True)
    (dest / path).write_bytes(released.contents[path])
    res = cli("data", "download", "llava_med_instruct_10k.json", "--dest", dest,
              "--base-url", released.url("med_llava/"), "--json")
    assert res.exit_code == 0, res
    assert json.loads(res.stdout)["files"][0]["status"] == "recorded"
    assert [r.method for r in released.log] == ["HEAD"]
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    assert manifest["files"][path]["sha256"] == hashlib.sha256(released.contents[path]).hexdigest()


def test_missing_file_is_reported_and_the_others_finish(cli, released, tmp_path):
    dest = tmp_path / "data"
    released.fault("med_llava/eval/llava_med_eval_qa50_fig_captions.json", "status", times=None, status=404)
    released.fault("med_llava/eval/llava_med_eval_qa50_qa.jsonl", "status", times=1, status=500)
    res = cli("data", "download", "eval", "--dest", dest, "--base-url", released.url("med_llava/"))
    assert res.exit_code == 1
    assert "Error: 1 of 3 files could not be downloaded" in res.stderr and "404" in res.stderr
    assert "Hint:" in res.stderr
    assert "failed" in res.stdout
    assert (dest / "eval/llava_med_eval_qa50_qa.jsonl").exists()  # the 500 was retried
    assert not (dest / "eval/llava_med_eval_qa50_fig_captions.json").exists()
    assert len(released.requests_for("med_llava/eval/llava_med_eval_qa50_fig_captions.json")) == 1


def test_base_url_from_environment(cli, released, tmp_path):
    dest = tmp_path / "data"
    res = cli("data", "download", "image-urls", "--dest", dest,
              env={"LLAVAMED_DATA_URL": released.url("med_llava/")})
    assert res.exit_code == 0, res
    assert (dest / "llava_med_image_urls.jsonl").read_bytes() == released.contents["llava_med_image_urls.jsonl"]


def test_unknown_group_is_a_clear_error(cli, tmp_path):
    res = cli("data", "download", "alignmnet", "--dest", tmp_path)
    assert res.exit_code == 1
    assert "Error: unknown data file or group 'alignmnet'" in res.stderr
    assert "Hint: did you mean 'alignment'? choose from all, alignment, instruct, eval, image-urls" in res.stderr
    assert res.stdout == ""


def test_killed_download_resumes_with_range(released, tmp_path):
    """SIGKILL a real `llavamed data download` mid-file; the rerun asks only for the rest."""
    path = "instruct/llava_med_instruct_10k.json"
    big = os.urandom(3_000_000)
    released.add(f"med_llava/{path}", big)
    released.bandwidth = 400_000  # ~7.5 s for the whole file: time to kill it halfway
    dest = tmp_path / "data"
    cmd = [sys.executable, "-m", "llavamed_cli.main", "data", "download", "llava_med_instruct_10k.json",
           "--dest", str(dest), "--base-url", released.url("med_llava/")]
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = dest / (path + ".part")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 600_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    kept = part.stat().st_size
    assert 0 < kept < len(big) and not (dest / path).exists()
    assert (dest / (path + ".part.json")).exists()

    released.bandwidth = None
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["files"][0]["status"] == "resumed"
    assert report["files"][0]["transferred"] == len(big) - kept
    assert (dest / path).read_bytes() == big
    assert released.requests_for(f"med_llava/{path}")[-1].range == f"bytes={kept}-"
    assert sorted(p.name for p in (dest / "instruct").iterdir()) == ["llava_med_instruct_10k.json"]
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    assert manifest["files"][path]["sha256"] == hashlib.sha256(big).hexdigest()


def test_cli_defaults_are_the_core_defaults():
    import inspect

    from llavamed_cli.data.download import download
    from llavamed_core.data.download import DownloadConfig
    from llavamed_core.http import HttpConfig

    params = inspect.signature(download).parameters
    assert params["workers"].default == DownloadConfig.workers
    assert params["verify"].default == DownloadConfig.verify
    assert params["retries"].default == HttpConfig.retries
    assert params["timeout"].default == HttpConfig.read_timeout
