"""The root CLI: help without heavy imports, --version, error mapping, completions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_groups_and_imports_no_torch():
    code = ("import sys; from llavamed_cli.main import app; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['--help']); "
            "print(r.exit_code); print(r.stdout); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'fastapi') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines()[0] == "0"
    for group in ("data", "weights", "eval"):
        assert group in res.stdout
    assert "HEAVY []" in res.stdout


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0
    assert res.stdout.strip().startswith("llavamed 0.")


def test_usage_error_exits_2(cli):
    res = cli("weights", "init", "--no-such-flag")
    assert res.exit_code == 2
    assert "no-such-flag" in res.stderr or "no-such-flag" in res.stdout


def test_known_error_is_one_line_with_hint(cli, tmp_path):
    res = cli("weights", "init", "--out", tmp_path / "x")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: give either --preset or both --llm and --vision")
    assert "Hint: e.g. `llavamed weights init --preset tiny" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "x").exists()
    # --preset is a choice: a wrong one is a usage error that lists the presets.
    res = cli("weights", "init", "--preset", "nope", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "'nope' is not one of" in res.stderr and "'tiny'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_debug_shows_traceback(tmp_path):
    env = dict(os.environ, LLAVAMED_DEBUG="1")
    res = subprocess.run([sys.executable, "-m", "llavamed_cli.main", "weights", "init",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_missing_file_maps_to_one_line(cli, tmp_path):
    res = cli("data", "validate", tmp_path / "nope.json")
    assert res.exit_code == 1
    assert "nope.json: file not found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("shell,name", [("bash", "llavamed.bash"), ("zsh", "_llavamed"), ("fish", "llavamed.fish")])
def test_completion_scripts_are_current(shell, name):
    sys.path.insert(0, str(ROOT / "completions"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert (ROOT / "completions" / name).read_text() == generate.script_for(shell), \
        "run `python completions/generate.py`"


def test_tab_completion_completes_groups_and_commands():
    env = dict(os.environ, _LLAVAMED_COMPLETE="complete_bash", COMP_WORDS="llavamed da", COMP_CWORD="1")
    code = "from llavamed_cli.main import app; app(prog_name='llavamed')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "data" in res.stdout.split()
    env.update(COMP_WORDS="llavamed data sy", COMP_CWORD="2")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "synth" in res.stdout.split()


def test_install_completion_writes_rc_file(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    code = "from llavamed_cli.main import app; app(prog_name='llavamed')"
    res = subprocess.run([sys.executable, "-c", code, "--install-completion", "bash"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "llavamed" in (tmp_path / ".bashrc").read_text()


def test_error_text_with_brackets_is_printed_as_is(capsys):
    """Messages name TOML tables and paths: Rich markup must not eat "[train.align]"."""
    from llavamed_cli import _console

    _console.print_error("llavamed.toml:3: [train.align] has no key 'mdoel'", "see [docs]/config.md")
    err = capsys.readouterr().err
    assert "[train.align] has no key" in err and "see [docs]/config.md" in err
