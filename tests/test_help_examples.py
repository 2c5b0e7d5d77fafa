"""Every command's --help ends with examples, and every option an example uses exists on that
command (so the examples cannot drift from the options)."""

from __future__ import annotations

import re

import typer.main

from llavamed_cli._examples import EXAMPLES
from llavamed_cli.main import app


def _commands() -> dict:
    root = typer.main.get_command(app)
    out: dict = {}

    def walk(cmd, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (Typer carries its own click)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = cmd

    walk(root, [])
    return out


def test_every_command_has_examples_that_use_real_options():
    commands = _commands()
    assert len(commands) > 20
    missing = sorted(set(commands) - set(EXAMPLES))
    assert not missing, f"commands without examples: {missing}"
    assert not sorted(set(EXAMPLES) - set(commands)), "examples for commands that do not exist"
    for path, cmd in commands.items():
        assert cmd.epilog and "Examples:" in cmd.epilog, path
        options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for line in EXAMPLES[path]:
            assert line.startswith(f"llavamed {path} ") or line == f"llavamed {path}", line
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                assert flag in options, f"{path}: example uses unknown option {flag}"


def test_help_shows_the_examples(cli):
    r = cli("chat", "--help")
    assert r.exit_code == 0 and "Examples:" in r.stdout and "llavamed chat scan.png" in r.stdout
    r = cli("train", "instruct", "--help")
    assert "2e-3" in r.stdout and "smoke" in r.stdout


def test_train_help_groups_its_options_into_panels(cli):
    out = cli("train", "instruct", "--help").stdout
    for panel in ("Data", "Schedule", "LoRA", "Parallelism", "Logging", "Checkpoints"):
        assert f"─ {panel} ─" in out, panel
    # An option sits in its panel: --deepspeed after the Parallelism heading, before Logging.
    assert out.index("─ Parallelism ─") < out.index("--deepspeed") < out.index("─ Logging ─")


def _complete(words: str, cwd) -> list[str]:
    """What Tab offers after ``words`` (bash protocol, the installed program's own completer)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, _LLAVAMED_COMPLETE="complete_bash", COMP_WORDS=words,
               COMP_CWORD=str(len(words.split(" ")) - 1))
    code = "from llavamed_cli.main import app; app(prog_name='llavamed')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd, timeout=120)
    return r.stdout.split()


def test_choices_are_listed_and_tab_completed(cli, tmp_path):
    from llavamed_cli.weights.init import Preset
    from llavamed_core.model.presets import PRESETS

    assert [p.value for p in Preset] == list(PRESETS)  # the CLI's list follows the core's
    (tmp_path / "ds_config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    assert _complete("llavamed weights init --preset llava", tmp_path) == ["llava-med-v1", "llava-med-v1.5"]
    assert _complete("llavamed train instruct --deepspeed ", tmp_path) == ["zero2", "zero3", "ds_config.json"]
    assert _complete("llavamed eval summarize --format c", tmp_path) == ["csv"]
    assert _complete("llavamed serve --engine ", tmp_path) == ["native", "vllm"]
    assert _complete("llavamed eval vqa --dataset s", tmp_path) == ["slake"]
    assert "<native|vllm>" in cli("serve", "--help").stdout
    r = cli("eval", "summarize", "x.jsonl", "--format", "yaml")
    assert r.exit_code == 2 and "yaml" in r.stderr and "markdown" in r.stderr
