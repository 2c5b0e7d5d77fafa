"""Layered settings: where ``llavamed`` finds the model, data and runs folders when a flag is absent.

Each key is looked up, first match wins, in:

1. the command-line flag (the caller passes it to :meth:`Settings.resolve`);
2. the environment (``LLAVAMED_<KEY>``, dots as underscores: ``LLAVAMED_MODEL``,
   ``LLAVAMED_TRAIN_INSTRUCT_DATA``);
3. the project file ``llavamed.toml`` in the current folder or the nearest parent;
4. the user file ``$XDG_CONFIG_HOME/llavamed/config.toml`` (default ``~/.config``);
5. the built-in default (for the train stages' ``model``: the previous stage's output, see below).

:data:`KEYS` is the one table of keys (name, type, environment variable, default, help); the CLI
reads it for ``llavamed config show`` and the docs list it. Paths in a file are relative to that
file's folder; paths from the environment or a flag are relative to the current folder; the
built-in ``data_dir`` and ``runs_dir`` are relative to the project folder (that of
``llavamed.toml``; the current folder without one).

The paper's three training stages chain: ``train.instruct.model`` defaults to ``train.align.out``
when that is set, else to the newest finished ``align-*`` run under ``<runs_dir>/train/``; likewise
``train.finetune.model`` from instruct.

Nothing here imports more than the standard library: ``llavamed --help`` stays instant.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ConfigError

__all__ = ["Key", "KEYS", "Value", "Settings", "PROJECT_FILE", "STAGE_ORDER", "user_config_path",
           "find_project_file", "set_value", "finished_run", "newest_run"]

PROJECT_FILE = "llavamed.toml"
STAGE_ORDER = ("align", "instruct", "finetune")


@dataclass(frozen=True)
class Key:
    """One setting: its dotted name, type (``path`` or ``str``), default and help text."""

    name: str
    type: str
    help: str
    default: Optional[str] = None

    @property
    def env(self) -> str:
        """Its environment variable: ``LLAVAMED_`` + the name upper-cased, dots as underscores."""
        return "LLAVAMED_" + self.name.upper().replace(".", "_")


def _keys() -> dict[str, Key]:
    keys = [
        Key("model", "path", "Checkpoint that chat, serve and eval use when --model is absent."),
        Key("data_dir", "path", "Data folder: `data prepare NAME` writes DATA/NAME; `eval vqa --dataset NAME` reads it.",
            "data"),
        Key("runs_dir", "path", "Runs folder: eval results go to RUNS/eval/<model>/<dataset>/, training to "
            "RUNS/train/<stage>-<timestamp>/.", "runs"),
    ]
    for i, stage in enumerate(STAGE_ORDER):
        prev = STAGE_ORDER[i - 1] if i else None
        keys += [
            Key(f"train.{stage}.model", "path", f"Input checkpoint of `train {stage}`"
                + (f" (default: train.{prev}.out, else the newest finished {prev} run)." if prev else ".")),
            Key(f"train.{stage}.data", "path", f"Conversation file of `train {stage}`."),
            Key(f"train.{stage}.images", "path", f"Image folder of `train {stage}`."),
            Key(f"train.{stage}.out", "path", f"Output checkpoint of `train {stage}` "
                f"(default: RUNS/train/{stage}-<timestamp>/)."),
        ]
    return {k.name: k for k in keys}


KEYS: dict[str, Key] = _keys()


@dataclass(frozen=True)
class Value:
    """A resolved setting: its value (``None`` when unset) and where it came from."""

    key: str
    value: Any
    source: str

    @property
    def is_set(self) -> bool:
        return self.value is not None


def user_config_path(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$XDG_CONFIG_HOME/llavamed/config.toml`` (``~/.config`` when unset or empty)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "llavamed" / "config.toml"


def find_project_file(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest ``llavamed.toml`` in ``start`` (default: the current folder) or a parent."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


# --- reading ---------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _dotted(raw: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in raw.split("."))


def _key_lines(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Line numbers (1-based) of each ``key = …`` (as a dotted name) and of each ``[table]``."""
    keys: dict[str, int] = {}
    tables: dict[str, int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            table = _dotted(m.group(1))
            tables.setdefault(table, n)
            continue
        m = _ASSIGN.match(line)
        if m and not line.lstrip().startswith("#"):
            name = _dotted(m.group(1))
            keys.setdefault(f"{table}.{name}" if table else name, n)
    return keys, tables


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and name not in KEYS:
            if not v and name not in _known_tables():
                flat[name] = v  # an empty table that is not one of ours: reported as unknown
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def _known_tables() -> set[str]:
    tables = set()
    for name in KEYS:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            tables.add(".".join(parts[:i]))
    return tables


def _check_value(key: Key, value: Any, where: str) -> str:
    if key.type in ("path", "str"):
        if not isinstance(value, str):
            kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                    dict: "a table"}.get(type(value), type(value).__name__)
            raise ConfigError(f"{where}: {key.name} must be a {'path' if key.type == 'path' else 'string'} "
                              f"in quotes, got {kind} ({value!r})",
                              f'write it as {key.name.rsplit(".", 1)[-1]} = "…"')
        if not value.strip():
            raise ConfigError(f"{where}: {key.name} is empty", "give a value or delete the line")
        return value
    raise AssertionError(key.type)  # pragma: no cover - the table declares only these


@dataclass
class ConfigFile:
    """One parsed TOML file: its flattened, checked values and their line numbers."""

    path: Path
    kind: str  # "project" or "user"
    values: dict[str, str]
    lines: dict[str, int]

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else str(self.path)


def read_config_file(path: Path, kind: str) -> ConfigFile:
    """Parse and check one file.

    Raises:
        ConfigError: not TOML, an unknown key or a bad value (naming the file and line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", "save the file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        where = f"{path}:{m.group(1)}" if m else str(path)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) or "invalid TOML"
        raise ConfigError(f"{where}: not valid TOML: {msg}",
                          'each line is key = "value"; a table starts with its name in brackets, '
                          'e.g. train.align') from None
    lines, tables = _key_lines(text)
    values: dict[str, str] = {}
    known_tables = _known_tables()
    for name, value in _flatten(data).items():
        where = f"{path}:{lines.get(name) or tables.get(name) or '?'}".removesuffix(":?")
        key = KEYS.get(name)
        if key is None:
            if name in known_tables:
                raise ConfigError(f"{where}: {name} must be a table, not a value",
                                  f"write a line with {name} in square brackets, then its keys")
            close = difflib.get_close_matches(name, list(KEYS), n=1)
            raise ConfigError(f"{where}: unknown key '{name}'",
                              (f"did you mean '{close[0]}'? " if close else "")
                              + "`llavamed config show` lists the keys")
        values[name] = _check_value(key, value, where)
    return ConfigFile(path=path, kind=kind, values=values, lines=lines)


# --- resolution ------------------------------------------------------------------------------


def finished_run(path: Path) -> bool:
    """A training output that completed: the checkpoint's config.json and train_config.json."""
    return (path / "config.json").is_file() and (path / "train_config.json").is_file()


def newest_run(runs_dir: Path, stage: str) -> Optional[Path]:
    """The newest finished ``<runs_dir>/train/<stage>-*`` run (timestamped names sort in time order)."""
    folder = runs_dir / "train"
    if not folder.is_dir():
        return None
    # <out>.run beside each run holds its intermediate checkpoints, not a finished one.
    runs = sorted((p for p in folder.glob(f"{stage}-*") if p.is_dir() and p.suffix != ".run" and finished_run(p)),
                  key=lambda p: p.name)
    return runs[-1] if runs else None


class Settings:
    """The resolved settings of one invocation (read once; files are parsed when first needed).

    Args:
        cwd: the current folder (default: ``Path.cwd()``).
        env: the environment (default: ``os.environ``).
    """

    def __init__(self, cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None):
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.env = dict(os.environ if env is None else env)
        self.project_path = find_project_file(self.cwd)
        self.user_path = user_config_path(self.env)
        self._files: Optional[list[ConfigFile]] = None

    @property
    def project_root(self) -> Path:
        """The folder of ``llavamed.toml``, or the current folder without one."""
        return self.project_path.parent if self.project_path else self.cwd

    def files(self) -> list[ConfigFile]:
        """The project file, then the user file (those that exist), parsed and checked."""
        if self._files is None:
            files = []
            if self.project_path is not None:
                files.append(read_config_file(self.project_path, "project"))
            if self.user_path.is_file():
                files.append(read_config_file(self.user_path, "user"))
            self._files = files
        return self._files

    def _path(self, raw: str, base: Path) -> Path:
        p = Path(raw).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else base / p))

    def get(self, name: str) -> Value:
        """One key's value and source, ignoring flags (``value`` is ``None`` when unset)."""
        key = KEYS[name]
        raw = self.env.get(key.env, "")
        if raw.strip():
            return Value(name, self._convert(key, raw, self.cwd), f"env {key.env}")
        for f in self.files():
            if name in f.values:
                return Value(name, self._convert(key, f.values[name], f.path.parent), f.where(name))
        if key.default is not None:
            return Value(name, self._convert(key, key.default, self.project_root), "default")
        m = re.fullmatch(r"train\.(\w+)\.model", name)
        if m and m.group(1) in STAGE_ORDER[1:]:
            prev = STAGE_ORDER[STAGE_ORDER.index(m.group(1)) - 1]
            out = self.get(f"train.{prev}.out")
            if out.is_set:
                return Value(name, out.value, f"train.{prev}.out ({out.source})")
            runs = self.get("runs_dir").value
            newest = newest_run(runs, prev)
            if newest is not None:
                return Value(name, newest, f"newest finished {prev} run in {runs / 'train'}")
        return Value(name, None, "not set")

    def _convert(self, key: Key, raw: str, base: Path) -> Any:
        return self._path(raw, base) if key.type == "path" else raw

    def resolve(self, name: str, flag_value: Any, flag: str) -> Value:
        """The flag's value when given (``flag`` names it as the source), else :meth:`get`."""
        if flag_value is not None:
            return Value(name, flag_value, flag)
        return self.get(name)

    def all(self) -> list[Value]:
        """Every key, resolved, in table order."""
        return [self.get(name) for name in KEYS]


# --- writing ---------------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def set_value(path: Path, name: str, value: str) -> Path:
    """Write ``name = value`` into the TOML file ``path`` (created if absent), keeping the rest.

    An existing ``name`` line is replaced in place; a new key goes at the end of its table (a new
    ``[table]`` at the end of the file when there is none). The file is checked before and after,
    and replaced atomically.

    Raises:
        ConfigError: unknown key, bad value, or a file that is already invalid.
    """
    from .io import atomic_write

    key = KEYS.get(name)
    if key is None:
        close = difflib.get_close_matches(name, list(KEYS), n=1)
        raise ConfigError(f"unknown key '{name}'", (f"did you mean '{close[0]}'? " if close else "")
                          + "`llavamed config show` lists the keys")
    _check_value(key, value, f"{name} {value!r}")
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if text:
        read_config_file(path, "edit")  # refuse to edit a file we cannot read
    lines = text.splitlines()
    keys, tables = _key_lines(text)
    table, _, leaf = name.rpartition(".")
    new_line = f"{leaf} = {_toml_string(value)}"
    if name in keys:
        i = keys[name] - 1
        old = lines[i]
        m = re.match(r"^(\s*[^=]+?=\s*)(?:\"(?:[^\"\\]|\\.)*\"|'[^']*')?(\s*#.*)?\s*$", old)
        # Keeps the key's spelling and a comment after the value.
        lines[i] = ((m.group(1) + _toml_string(value) + (m.group(2) or "")) if m
                    else f"{leaf} = {_toml_string(value)}")
    else:
        # The last line belonging to the table (its header or its last key).
        start = tables.get(table) if table else 0
        if table and start is None:
            if lines and lines[-1].strip():
                lines.append("")
            lines += [f"[{table}]", new_line]
        else:
            end = len(lines)
            for n in range(start, len(lines)):  # start is 1-based header line → index of next line
                if _HEADER.match(lines[n]):
                    end = n
                    break
            insert = end
            while insert > start and not lines[insert - 1].strip():
                insert -= 1
            lines.insert(insert, new_line)
    new_text = "\n".join(lines) + "\n"
    try:
        parsed = _flatten(tomllib.loads(new_text))
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{path}: could not add {name} ({exc})", "edit the file by hand") from None
    if parsed.get(name) != value:
        raise ConfigError(f"{path}: {name} is written in a form this command cannot edit "
                          "(an inline table?)", "edit the file by hand")
    with atomic_write(path) as fh:
        fh.write(new_text)
    return path
