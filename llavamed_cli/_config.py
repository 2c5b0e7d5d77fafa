"""Defaults from ``llavamed.toml``, the user file and the environment, for the commands' flags.

Commands call these helpers only where a flag was left out, so a given flag never reads a file.
Resolution and provenance live in :mod:`llavamed_core.config`; this module turns them into the
values the commands need and says, on stderr, where each default came from.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from . import _console


def settings() -> Any:
    """The settings of this invocation (a fresh read: the folder or environment may have changed)."""
    from llavamed_core.config import Settings

    return Settings()


def _note(what: str, value: Any, source: str) -> None:
    _console.info(f"{what}: {value} (from {source})")


def model(flag_value: Optional[Path], command: str, server: bool = False) -> Path:
    """``--model`` or the configured ``model``.

    Raises:
        ConfigError: none given or configured; the hint names the three ways to set one.
    """
    from llavamed_core.errors import ConfigError

    if flag_value is not None:
        return flag_value
    v = settings().get("model")
    if not v.is_set:
        raise ConfigError(f"no model: `llavamed {command}` needs a checkpoint",
                          "give --model PATH, set LLAVAMED_MODEL=PATH, or run "
                          "`llavamed config set model PATH` (writes llavamed.toml)"
                          + ("; or ask a server with --server URL" if server else ""))
    _note("model", v.value, v.source)
    return v.value


def folder(name: str, flag_value: Optional[Path] = None) -> Path:
    """``data_dir`` or ``runs_dir``: the flag when given, else the resolved setting."""
    if flag_value is not None:
        return flag_value
    return settings().get(name).value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def eval_out(model_path: Optional[Path], server: Optional[str], model_name: Optional[str],
             dataset: str, split: str) -> Path:
    """``RUNS/eval/<model-name>/<dataset>/`` for ``eval vqa`` without ``--out`` (printed)."""
    from urllib.parse import urlparse

    if model_path is not None:
        mname = Path(model_path).resolve().name
    else:
        mname = model_name or (urlparse(server or "").netloc or "server")
    ds = Path(dataset)
    if ds.suffix in (".json", ".jsonl"):
        label = ds.parent.name if ds.stem in ("train", "test", "val") and ds.parent.name else ds.stem
    else:
        label = dataset if split == "test" else f"{dataset}-{split}"
    v = settings().get("runs_dir")
    out = v.value / "eval" / _slug(mname) / _slug(label)
    _note("output", out, f"runs_dir, {v.source}")
    return out


def train_paths(stage: str, have: dict[str, Any]) -> dict[str, Path]:
    """Values for ``train STAGE``'s ``model``/``data``/``images``/``out`` that ``have`` lacks.

    From ``[train.STAGE]`` (and the chain to the previous stage's output for ``model``); ``out``
    defaults to ``RUNS/train/<stage>-<timestamp>/``. Unset ones are left out (the caller reports
    them). Each value used is printed with its source.
    """
    missing = [k for k in ("model", "data", "images", "out") if have.get(k) is None]
    if not missing:
        return {}
    s = settings()
    found: dict[str, Path] = {}
    for k in missing:
        v = s.get(f"train.{stage}.{k}")
        if v.is_set:
            found[k] = v.value
            _note(k, v.value, v.source)
    if "out" in missing and "out" not in found:
        runs = s.get("runs_dir")
        base = runs.value / "train"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out, n = base / f"{stage}-{stamp}", 2
        while out.exists():
            out, n = base / f"{stage}-{stamp}-{n}", n + 1
        found["out"] = out
        _note("out", out, f"runs_dir, {runs.source}")
    return found


def write_demo_project(out: Path, paths: dict[str, str]) -> Path:
    """``OUT/llavamed.toml`` pointing at what the demo made, so ``cd OUT && llavamed chat IMAGE``
    works. Paths are relative to OUT (the folder can move); other keys already there are kept."""
    import os

    from llavamed_core.config import PROJECT_FILE, set_value

    toml = out / PROJECT_FILE
    if not toml.exists():
        from llavamed_core.io import atomic_write

        with atomic_write(toml) as fh:
            fh.write("# Written by `llavamed demo`: the settings commands run in this folder use.\n"
                     "# `llavamed config show` lists them; `llavamed config set KEY VALUE` changes one.\n")

    def rel(p: str) -> str:
        return os.path.relpath(Path(p).resolve(), out.resolve())

    for key, value in (("model", paths["instruct"]),
                       ("train.align.model", paths["base"]), ("train.align.data", str(Path(paths["data"]) / "align.json")),
                       ("train.align.images", paths["images"]),
                       ("train.instruct.model", paths["align"]), ("train.instruct.data", paths["train"]),
                       ("train.instruct.images", paths["images"])):
        set_value(toml, key, rel(value))
    return toml
