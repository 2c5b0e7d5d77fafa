"""Regenerate the shell completion scripts in this folder from the app.

Run: ``python completions/generate.py`` (tests/test_cli_root.py checks they are current).
Install one by sourcing it (bash: ``source completions/llavamed.bash``), or run
``llavamed --install-completion`` to let Typer install it for the current shell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHELLS = {"bash": "llavamed.bash", "zsh": "_llavamed", "fish": "llavamed.fish"}


def script_for(shell: str) -> str:
    """The completion script Typer generates for ``shell``."""
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    code = "from llavamed_cli.main import app; app(prog_name='llavamed')"
    res = subprocess.run([sys.executable, "-c", code, "--show-completion", shell],
                         capture_output=True, text=True, env=env, check=True)
    return res.stdout


def main() -> None:
    for shell, name in SHELLS.items():
        (HERE / name).write_text(script_for(shell))
        print(HERE / name)


if __name__ == "__main__":
    main()
