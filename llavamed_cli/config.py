"""``llavamed config``: show the resolved settings and where each came from; set one.

- ``llavamed config show`` — every key, its value and its source (flag-less: environment,
  ``llavamed.toml``, the user file, or the built-in default); ``--json`` for scripts.
- ``llavamed config set KEY VALUE [--project|--user]`` — write one key into the project file
  (the nearest ``llavamed.toml``, else a new one here) or the user file, keeping the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from . import _console
from ._options import JsonOpt

app = typer.Typer(help="Settings: show the resolved values and their sources, or set one.",
                  no_args_is_help=True)


@app.command("show")
def show(json_out: JsonOpt = False) -> None:
    """Print every setting, its value and where it came from: environment, file:line or default."""
    from llavamed_core.config import KEYS
    from llavamed_cli._config import settings

    s = settings()
    values = s.all()
    out = _console.Output(json_out)
    out.result({
        "project_file": str(s.project_path) if s.project_path else None,
        "user_file": str(s.user_path),
        "settings": {v.key: {"value": None if v.value is None else str(v.value), "source": v.source,
                             "env": KEYS[v.key].env} for v in values}})
    # Plain aligned lines, never truncated (paths are long): key, value, [source].
    width = max(len(v.key) for v in values)
    vwidth = max(len(str(v.value)) for v in values if v.value is not None)
    for v in values:
        value = "-" if v.value is None else str(v.value)
        out.text(f"{v.key:<{width}}  {value:<{vwidth}}  [{v.source}]".rstrip())
    _console.info("a command-line flag overrides each; then the environment (LLAVAMED_<KEY>), "
                  "the project file, the user file, the default")
    _console.info(f"project file: {s.project_path or f'none (looked for llavamed.toml in {s.cwd} and its parents)'}")
    _console.info(f"user file: {s.user_path}{'' if s.user_path.is_file() else ' (absent)'}")


@app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="Setting, e.g. model, data_dir, train.instruct.data (`llavamed config show` lists them).")],
    value: Annotated[str, typer.Argument(help="Its value (a relative path is taken from the current folder).")],
    user: Annotated[bool, typer.Option("--user", help="Write the user file ($XDG_CONFIG_HOME/llavamed/config.toml).")] = False,
    project: Annotated[bool, typer.Option("--project", help="Write the project file: the nearest llavamed.toml, else a new one here (the default).")] = False,
) -> None:
    """Write one setting into llavamed.toml (or the user file with --user), keeping the rest of the file."""
    from llavamed_core.config import KEYS, PROJECT_FILE, set_value
    from llavamed_core.errors import ConfigError
    from llavamed_cli._config import settings

    if user and project:
        raise ConfigError("--user and --project both given", "choose one file to write")
    s = settings()
    path = s.user_path if user else (s.project_path or s.cwd / PROJECT_FILE)
    written = value
    spec = KEYS.get(key)
    if spec is not None and spec.type == "path" and value.strip():
        p = Path(value).expanduser()
        if not p.is_absolute():
            # A relative path means from here: the project file keeps it relative to its own
            # folder (the project moves as a whole), the user file makes it absolute.
            p = Path(os.path.normpath(s.cwd / p))
            written = str(p) if user else os.path.relpath(p, path.parent.resolve())
    set_value(path, key, written)
    _console.info(f"{key} = {written} → {path}")
