"""Provenance of evaluation outputs: which model, data and settings made an answer or review file.

``eval vqa`` and ``eval gpt-score`` append to their output and resume it, so a rerun with another
model (or prompt, or generation setting) must never extend a file that an earlier run began. Each
output therefore gets a *run header* (``run.json`` beside ``answers.jsonl``, ``NAME.run.json``
beside a review file), written atomically before the first record. It holds:

- ``checked``: the settings that decide the records (model fingerprint, dataset hash, prompt
  suffixes, generation settings, llavamed version, ...). Their hash, the ``run_id`` (12 hex), is
  also stored in every record, so records of different runs can be told apart even in a file whose
  header was lost.
- ``info``: what a reader wants to know but does not decide the records (paths, the per-file hashes
  of the checkpoint, batch size, processes, time of creation).

A rerun resumes only when its ``checked`` equals the header's; otherwise :func:`mismatch_error`
names what differs.

Model fingerprint: the sha256 of the list ``name<TAB>sha256`` of the checkpoint folder's top-level
files (weights, config, tokenizer, chat template, image processor; training logs and states are left
out, see :data:`IGNORED_FILES`). Each file's sha256 is the full content streamed once, cached in
``$LLAVAMED_HOME/hash-cache`` (default ``~/.cache/llavamed``) by path, size, mtime, ctime and inode,
so a weight file changed in place (even with its mtime restored) is hashed again, and an unchanged
one is not (a 7B checkpoint costs one read of its ~14 GB, then milliseconds). A LoRA adapter's
fingerprint covers the adapter's files and its base checkpoint's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError

__all__ = ["IGNORED_FILES", "file_sha256", "checkpoint_identity", "run_id_of", "make_header",
           "read_header", "differences", "mismatch_error", "short", "llavamed_version"]

HEADER_FORMAT = "llavamed-eval-run/1"

IGNORED_FILES = ("README*", "*.md", "*.log", ".*", "trainer_state.json", "training_args.bin",
                 "training_args.json", "train_config.json", "optimizer.*", "scheduler.*",
                 "rng_state*", "run.json", "results.json")
"""Top-level checkpoint files that do not change what the model answers (left out of its fingerprint)."""

_SMALL = 1 << 20  # files under 1 MiB are hashed directly, not cached


def llavamed_version() -> str:
    """The installed llavamed version."""
    from .. import __version__

    return __version__


def _home() -> Path:
    home = os.environ.get("LLAVAMED_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llavamed")
    return Path(home)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, cached by (path, size, mtime, ctime, inode) for files over 1 MiB."""
    path = Path(path).resolve()
    st = path.stat()
    key = None
    if st.st_size >= _SMALL:
        key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
                             .encode()).hexdigest()
        cached = _home() / "hash-cache" / f"{key}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return str(json.loads(cached.read_text())["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if key is not None:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            from ..io import atomic_write_json

            atomic_write_json(_home() / "hash-cache" / f"{key}.json",
                              {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "sha256": digest}, indent=None)
    return digest


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in IGNORED_FILES)


def _folder_hashes(path: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(path.iterdir())
            if p.is_file() and not _ignored(p.name)}


def _combine(files: dict[str, str], base: str | None = None) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\t{files[name]}\n".encode())
    if base:
        h.update(f"base\t{base}\n".encode())
    return h.hexdigest()


def _chat_template(path: Path) -> str | None:
    """The chat template text a checkpoint folder carries, if any."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            t = json.loads((path / name).read_text(encoding="utf-8")).get("chat_template")
            if t:
                return t if isinstance(t, str) else json.dumps(t, sort_keys=True)
    return None


def _image_preprocessing(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        cfg = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
        keys = ("image_processor_type", "size", "crop_size", "do_resize", "do_center_crop", "do_pad",
                "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                "resample", "do_convert_rgb")
        return {k: cfg[k] for k in keys if k in cfg}
    return None


def checkpoint_identity(model: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name, path, fingerprint, per-file hashes, chat template hash and image preprocessing of a
    checkpoint folder (or LoRA adapter folder with its base).

    Raises:
        ModelError: the folder does not exist, or an adapter's base cannot be found.
    """
    from ..model.hub import model_display_name, resolve_model

    path = resolve_model(model)  # a folder, or a Hub id org/name[@rev] fetched into the cache
    if not path.is_dir():
        raise ModelError(f"{path}: checkpoint directory not found",
                         "make one with `llavamed weights init --preset tiny --out DIR`")
    files = _folder_hashes(path)
    ident: dict[str, Any] = {"name": model_display_name(model), "path": str(path.resolve())}
    base_ident = None
    if (path / "adapter_config.json").is_file():
        try:
            acfg = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            acfg = {}
        bpath = Path(base) if base is not None else (
            Path(acfg["base_model_name_or_path"]) if acfg.get("base_model_name_or_path") else None)
        if bpath is None or not bpath.is_dir():
            raise ModelError(f"{path}: LoRA adapter whose base model '{bpath or '(not recorded)'}' "
                             "is not a local directory", "pass the base checkpoint with --base DIR")
        base_ident = checkpoint_identity(bpath)
    ident["fingerprint"] = _combine(files, base_ident["fingerprint"] if base_ident else None)
    proc_dir = path if _chat_template(path) is not None or base_ident is None else Path(base_ident["path"])
    template = _chat_template(proc_dir)
    ident["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest() if template else None
    pre = _image_preprocessing(path) if (path / "preprocessor_config.json").is_file() or base_ident is None \
        else _image_preprocessing(Path(base_ident["path"]))
    ident["image_preprocessing"] = pre
    ident["files"] = files
    if base_ident is not None:
        ident["base"] = {k: base_ident[k] for k in ("name", "path", "fingerprint")}
    return ident


def short(fingerprint: str | None) -> str:
    """The 12-hex short form of a fingerprint (``-`` when unknown)."""
    return fingerprint[:12] if fingerprint else "-"


def run_id_of(checked: dict[str, Any]) -> str:
    """The 12-hex hash of the settings that decide the records."""
    return hashlib.sha256(json.dumps(checked, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def make_header(checked: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """A run header: format, run_id, checked settings and informational fields."""
    return {"format": HEADER_FORMAT, "run_id": run_id_of(checked),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checked": checked, **info}


def read_header(path: Path) -> dict[str, Any] | None:
    """A run header from disk (``None`` when absent).

    Raises:
        ConfigError: a file that is not a run header.
    """
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        head = None
    if not isinstance(head, dict) or head.get("format") != HEADER_FORMAT or \
            not isinstance(head.get("checked"), dict):
        raise ConfigError(f"{path}: not a llavamed run header (unreadable or foreign file)",
                          "pass --overwrite to start the output over, or choose another output")
    return head


def _show(key: str, v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and key.endswith(("fingerprint", "sha256")):
        return v[:12]
    return json.dumps(v, ensure_ascii=False)


def differences(old: dict[str, Any], new: dict[str, Any], old_labels: dict[str, str] | None = None,
                new_labels: dict[str, str] | None = None) -> list[str]:
    """``key old → new`` for each checked setting that differs (in ``new``'s key order).

    ``*_labels`` give a readable form of a key's value (e.g. the model's name beside its fingerprint).
    """
    ol, nl = old_labels or {}, new_labels or {}
    keys = list(new) + [k for k in old if k not in new]
    return [f"{k} {ol.get(k) or _show(k, old.get(k))} → {nl.get(k) or _show(k, new.get(k))}"
            for k in keys if old.get(k) != new.get(k)]


def mismatch_error(what: str, count: int, header: Path, diffs: list[str], hint: str) -> ConfigError:
    """The one-line refusal to extend ``what`` (``count`` records) made with other settings."""
    return ConfigError(f"{what} holds {count} record(s) made with other settings than this run "
                       f"({header.name}): {'; '.join(diffs)}", hint)
