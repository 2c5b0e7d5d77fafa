"""Models by Hugging Face Hub id (``org/name[@revision]``), against a local fake Hub.

The fake Hub is a small HTTP server given to ``huggingface_hub`` through ``HF_ENDPOINT``; it
answers the calls ``snapshot_download`` makes (revision info, file tree, HEAD/GET of each file),
serves a private repo (401) and a gated one (403 with the gated error code), and counts requests so a
test can see that the cache, not the network, answered. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llavamed_core.errors import ModelError
from llavamed_core.model.hub import parse_hub_id, resolve_model


class FakeHub:
    """Repos held in memory: ``{repo_id: {revision_name: (sha, {path: bytes})}}``."""

    def __init__(self):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.private: set[str] = set()
        self.gated: set[str] = set()
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, code=200, headers=None):
                self._send(code, json.dumps(obj).encode(),
                           dict({"Content-Type": "application/json"}, **(headers or {})))

            def _denied(self, repo):
                if repo in hub.gated:
                    self._json({"error": "gated"}, 403, {"X-Error-Code": "GatedRepo",
                                                         "X-Error-Message": "Access to model is restricted"})
                    return True
                if repo in hub.private or repo not in hub.repos:
                    self._json({"error": "Repository not found"}, 401,
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                    return True
                return False

            def _find(self, repo, rev):
                for name, (sha, files) in hub.repos[repo].items():
                    if rev in (name, sha):
                        return sha, files
                return None

            def _handle(self, head):
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    i = parts.index("revision") if "revision" in parts else parts.index("tree")
                    repo, kind, rev = "/".join(parts[2:i]), parts[i], parts[i + 1]
                    if self._denied(repo):
                        return
                    found = self._find(repo, rev)
                    if found is None:
                        self._json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
                        return
                    sha, files = found
                    if kind == "revision":
                        self._json({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                    else:
                        self._json([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                    for f, b in files.items()])
                    return
                if "resolve" in parts:
                    i = parts.index("resolve")
                    repo, rev, fname = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])
                    if self._denied(repo):
                        return
                    found = self._find(repo, rev)
                    if found is None or fname not in found[1]:
                        self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
                        return
                    sha, files = found
                    body = files[fname]
                    self._send(200, body, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                                           "Content-Type": "application/octet-stream"}, head=head)
                    return
                self._json({"error": "not found"}, 404)

            def do_GET(self):
                self._handle(False)

            def do_HEAD(self):
                self._handle(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_dir(self, repo: str, folder: Path, revision: str = "main", sha: str | None = None) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        sha = sha or hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                  .encode() + revision.encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = (sha, files)
        return sha

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _online(monkeypatch, hub: FakeHub, home: Path) -> None:
    """Point huggingface_hub at the fake Hub with an empty cache, online."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # read at import; the conftest set it


def _offline(monkeypatch) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tiny_ckpt, tmp_path, monkeypatch):
    with FakeHub() as h:
        h.add_dir("org/tiny", tiny_ckpt)
        _online(monkeypatch, h, tmp_path / "hf-home")
        yield h


def _answer(model_spec) -> tuple[str, list[int], str]:
    """What chat/eval do: Engine.load(--model) then one greedy answer on a fixed image."""
    from PIL import Image

    from llavamed_core.infer.engine import ChatRequest, Engine, GenerationParams

    engine = Engine.load(model_spec, device="cpu")
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    req = ChatRequest(messages=[{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": "Is there a lesion?"}]}],
                      params=GenerationParams(max_new_tokens=8, temperature=0.0))
    res = engine.generate([req])[0]
    return res.text, [res.completion_tokens], engine.model_name


def test_parse_hub_id():
    assert parse_hub_id("org/tiny") == ("org/tiny", None)
    assert parse_hub_id("org/tiny@v1.0") == ("org/tiny", "v1.0")
    assert parse_hub_id("microsoft/llava-med-v1.5-mistral-7b@3f1b2c") == ("microsoft/llava-med-v1.5-mistral-7b", "3f1b2c")
    for not_id in ("/abs/ckpt", "./ckpt/tiny", "../x/y", "~/x/y", "a/b/c", "tiny", "org/", "org/..x", "a\\b"):
        assert parse_hub_id(not_id) is None, not_id


def test_hub_id_answers_like_the_local_path(hub, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = _answer(tiny_ckpt)
    by_id = _answer("org/tiny@main")
    assert by_id[:2] == local[:2]
    assert by_id[2] == "tiny"  # the repo's name, not the snapshot's commit folder
    assert any(r.startswith("GET /org/tiny/resolve/") for r in hub.requests)
    from llavamed_core.eval.provenance import checkpoint_identity

    assert checkpoint_identity("org/tiny@main")["fingerprint"] == checkpoint_identity(tiny_ckpt)["fingerprint"]
    assert checkpoint_identity("org/tiny@main")["name"] == "tiny"
    snap = resolve_model("org/tiny")
    assert snap.is_dir() and str(tmp_path / "hf-home") in str(snap)
    assert (snap / "config.json").read_bytes() == (tiny_ckpt / "config.json").read_bytes()


def test_local_path_shadowing_an_id_wins(hub, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_ckpt, tmp_path / "org" / "tiny")
    assert resolve_model("org/tiny") == Path("org/tiny")
    assert hub.requests == []  # the Hub was never asked


def test_offline_uses_the_cache_and_fails_clearly_without_it(hub, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    online = resolve_model("org/tiny@main")
    n = len(hub.requests)
    _offline(monkeypatch)
    assert resolve_model("org/tiny@main") == online
    assert resolve_model("org/tiny") == online
    assert len(hub.requests) == n  # offline: nothing asked
    from llavamed_core.model.checkpoint import check_checkpoint_dir

    assert check_checkpoint_dir("org/tiny") == online
    with pytest.raises(ModelError) as err:
        resolve_model("org/other", what="--model")
    msg = str(err.value)
    assert "org/other" in msg and "not in the cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in err.value.message


def test_unknown_private_gated_revision_and_missing_path(hub, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.add_dir("org/private", tiny_ckpt)
    hub.private.add("org/private")
    hub.add_dir("org/gated", tiny_ckpt)
    hub.gated.add("org/gated")
    cases = {
        "org/nope": "no Hugging Face repo org/nope was found",
        "org/private": "no Hugging Face repo org/private was found",
        "org/gated": "is gated",
        "org/tiny@v9": "has no revision 'v9'",
        "/no/such/ckpt": "checkpoint directory not found",
        "ckpt/a/b": "checkpoint directory not found",
    }
    for spec, expected in cases.items():
        with pytest.raises(ModelError) as err:
            resolve_model(spec, what="--model")
        assert expected in err.value.message, (spec, err.value.message)
        assert "\n" not in err.value.message and err.value.hint
    # The Hub unreachable (nothing listens there), nothing cached.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(ModelError, match="could not be reached for org/elsewhere") as err:
        resolve_model("org/elsewhere")
    assert "HF_ENDPOINT" in err.value.hint


def test_cli_chat_by_hub_id_and_the_one_line_error(hub, tiny_ckpt, tmp_path, monkeypatch, cli):
    """The CLI takes the id where it took a directory (no option rejects it), and a miss is one line."""
    monkeypatch.chdir(tmp_path)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "x.png")
    args = ["chat", str(tmp_path / "x.png"), "--prompt", "Is there a lesion?", "--max-new-tokens", "6",
            "--temperature", "0", "--json"]
    local = cli(*args, "--model", str(tiny_ckpt))
    by_id = cli(*args, "--model", "org/tiny@main")
    assert local.exit_code == 0 and by_id.exit_code == 0, (local.stderr, by_id.stderr)
    assert json.loads(by_id.stdout)["text"] == json.loads(local.stdout)["text"]
    _offline(monkeypatch)
    miss = cli(*args, "--model", "org/absent")
    assert miss.exit_code != 0
    assert "Error:" in miss.stderr and "org/absent" in miss.stderr and "Traceback" not in miss.stderr


def test_serve_takes_a_hub_id(hub, tiny_ckpt, tmp_path, monkeypatch):
    """``serve --model org/tiny``: the snapshot is served under the repo's name."""
    from llavamed_core.model.hub import resolve_served_model
    from llavamed_core.serve.config import ServeConfig

    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig(model="org/tiny@main")
    path = resolve_served_model(cfg)
    assert cfg.model == path and (path / "config.json").is_file() and cfg.model_name == "tiny"
    named = ServeConfig(model="org/tiny", served_model_name="mine")
    resolve_served_model(named)
    assert named.model_name == "mine"
    local = ServeConfig(model=tiny_ckpt)
    assert resolve_served_model(local) == tiny_ckpt and local.model == tiny_ckpt


def test_weights_commands_take_hub_ids(hub, tiny_ckpt, tmp_path, monkeypatch, cli):
    """The weights commands open models through the same resolver: an id gives the bytes a path gives."""
    monkeypatch.chdir(tmp_path)
    by_path = cli("weights", "make-delta", "--base", tiny_ckpt, "--target", tiny_ckpt, "--out", tmp_path / "a")
    by_id = cli("weights", "make-delta", "--base", "org/tiny@main", "--target", "org/tiny", "--out", tmp_path / "b")
    assert by_path.exit_code == 0 and by_id.exit_code == 0, (by_path, by_id)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    miss = cli("weights", "apply-delta", "--base", "org/absent", "--delta", tmp_path / "a", "--out", tmp_path / "c")
    assert miss.exit_code == 1 and "org/absent" in miss.stderr and "Traceback" not in miss.stderr
    assert not (tmp_path / "c").exists()
