"""Shared test fixtures: offline environment, a tiny checkpoint built once, and a CLI runner.

Every test runs offline (``HF_HUB_OFFLINE=1``) on tiny models made in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEST_DATA = Path(__file__).resolve().parent / "data"
REAL_QA50 = TEST_DATA / "llava_med_eval_qa50_qa.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Force offline mode for every test (a hub miss would spend ~25 s retrying)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("LLAVAMED_DEBUG", raising=False)
    # Every server a test talks to is on 127.0.0.1: a proxy from the environment must not intercept it.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    # No user settings file or LLAVAMED_* setting leaks into a test (llavamed_core.config).
    from llavamed_core.config import KEYS

    monkeypatch.setenv("XDG_CONFIG_HOME", os.path.join(os.sep, "nonexistent", "llavamed-test-config"))
    for key in KEYS.values():
        monkeypatch.delenv(key.env, raising=False)


@pytest.fixture
def llm_env(monkeypatch, tmp_path):
    """No LLM endpoint or key from the environment; the response cache under the test's folder."""
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY",
              "OPENAI_API_VERSION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LLAVAMED_HOME", str(tmp_path / "home"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread in the test process: the tiny model's matrices are too small to gain from
    two, and on a shared 2-core machine two spinning threads per process slow everything many times."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llava checkpoint (preset ``tiny``, seed 0), built once per session.

    Treat it as read-only; copy it (``tiny_ckpt_copy``) to modify.
    """
    from llavamed_core.model import build_from_preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    model, processor = build_from_preset("tiny", seed=0)
    save_checkpoint(model, processor, out)
    return out


@pytest.fixture
def tiny_ckpt_copy(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may change."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic VQA set (``llavamed data synth``, 48 train / 24 test records)."""
    from llavamed_core.data.synth import SynthConfig, make_synthetic_vqa

    out = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic_vqa(SynthConfig(out=out, n_train=48, n_test=24, seed=0))
    return out


class CliResult:
    """Outcome of one CLI call: exit code, stdout and stderr kept apart."""

    def __init__(self, exit_code: int, stdout: str, stderr: str):
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:  # shown by pytest on failure
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def cli():
    """Run ``llavamed ARGS`` in-process with Typer's CliRunner; returns a :class:`CliResult`."""
    from typer.testing import CliRunner

    from llavamed_cli.main import app

    def run(*args: str, input: str | None = None, env: dict | None = None) -> CliResult:
        runner = CliRunner()
        res = runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=True)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return CliResult(res.exit_code, res.stdout, res.stderr)

    return run


@pytest.fixture
def cli_subprocess():
    """Run the installed ``llavamed`` program in a real subprocess; returns CompletedProcess."""

    def run(*args: str, timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, "-m", "llavamed_cli.main", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env=full_env, **kw)

    return run
