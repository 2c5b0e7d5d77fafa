"""The released LLaVA-Med data files, and ``MANIFEST.json``: what was downloaded, with its sha256.

:data:`RELEASED_FILES` is the table of docs/formats.md ("Released data files"): each file's path
under the base URL, the group it belongs to (``alignment``, ``instruct``, ``eval``,
``image-urls``) and its published size. The published sizes are rounded (e.g. 341.52 MiB), so they
serve for the disk-space check and the progress total; the exact size comes from the server's
``Content-Length``. The authors published no checksums: the sha256 of each completed file is
recorded in ``DEST/MANIFEST.json`` and checked against on later runs (``--verify``).

``MANIFEST.json``::

    {"version": 1,
     "files": {"instruct/llava_med_instruct_60k.json":
                 {"url": "...", "size": 88763812, "sha256": "…", "completed": "2026-11-26T15:00:00Z"}}}
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..io import atomic_write_json, load_json

__all__ = [
    "DEFAULT_BASE_URL",
    "ReleasedFile",
    "RELEASED_FILES",
    "GROUPS",
    "select_files",
    "LocalManifest",
]

DEFAULT_BASE_URL = "https://hanoverprod.z21.web.core.windows.net/med_llava/"
"""Where the authors published the files (override with ``--base-url`` / ``LLAVAMED_DATA_URL``)."""

_KIB = 1024
_MIB = 1024 * 1024


@dataclass(frozen=True)
class ReleasedFile:
    """One released file.

    Attributes:
        path: its path under the base URL, also its path under ``--dest``.
        group: ``alignment``, ``instruct``, ``eval`` or ``image-urls``.
        approx_size: the published size in bytes (rounded; not used to verify).
        sha256: the expected sha256 when one is known, else ``None``.
    """

    path: str
    group: str
    approx_size: int
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The file name without folders."""
        return self.path.rsplit("/", 1)[-1]


RELEASED_FILES: tuple[ReleasedFile, ...] = (
    ReleasedFile("alignment/llava_med_alignment_500k.json", "alignment", int(341.52 * _MIB)),
    ReleasedFile("instruct/llava_med_instruct_10k.json", "instruct", int(19.24 * _MIB)),
    ReleasedFile("instruct/llava_med_instruct_60k.json", "instruct", int(84.65 * _MIB)),
    ReleasedFile("instruct/llava_med_instruct_60k_inline_mention.json", "instruct", int(83.61 * _MIB)),
    ReleasedFile("instruct/llava_med_instruct_fig_captions.json", "instruct", int(161.39 * _MIB)),
    ReleasedFile("eval/llava_med_eval_qa50_qa.jsonl", "eval", int(256.18 * _KIB)),
    ReleasedFile("eval/llava_med_eval_qa50_fig_captions.json", "eval", int(51.82 * _KIB)),
    ReleasedFile("eval/llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json", "eval",
                 int(100.97 * _KIB)),
    ReleasedFile("llava_med_image_urls.jsonl", "image-urls", int(122.82 * _MIB)),
)

GROUPS: tuple[str, ...] = ("alignment", "instruct", "eval", "image-urls")
"""The names ``data download`` accepts besides ``all`` and single file names."""


def select_files(names: list[str] | tuple[str, ...]) -> list[ReleasedFile]:
    """The released files named by groups (``instruct``), ``all``, or file names/paths.

    Args:
        names: group names, ``all``, file names (``llava_med_instruct_60k.json``) or paths
            (``instruct/llava_med_instruct_60k.json``). Empty means ``all``.

    Returns:
        The files, in table order, without repeats.

    Raises:
        ConfigError: a name that is none of these.
    """
    wanted: set[str] = set()
    for name in names or ["all"]:
        if name == "all":
            wanted.update(f.path for f in RELEASED_FILES)
            continue
        hits = [f.path for f in RELEASED_FILES if name in (f.group, f.path, f.name)]
        if not hits:
            import difflib

            close = difflib.get_close_matches(name, ["all", *GROUPS, *(f.name for f in RELEASED_FILES)], n=1)
            raise ConfigError(f"unknown data file or group '{name}'",
                              (f"did you mean '{close[0]}'? " if close else "")
                              + f"choose from all, {', '.join(GROUPS)}, or a file name such as "
                              f"{RELEASED_FILES[2].name}")
        wanted.update(hits)
    return [f for f in RELEASED_FILES if f.path in wanted]


class LocalManifest:
    """``DEST/MANIFEST.json``: each completed file's URL, size and sha256; thread-safe updates.

    Args:
        dest: the download folder.

    Raises:
        DataError: an existing manifest that is not valid JSON of the expected shape.
    """

    FILENAME = "MANIFEST.json"

    def __init__(self, dest: str | Path):
        self.path = Path(dest) / self.FILENAME
        self._lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            obj = load_json(self.path)
            if not isinstance(obj, dict) or not isinstance(obj.get("files", {}), dict):
                raise DataError(f"{self.path}: expected an object with a 'files' object",
                                "delete it; the next run re-verifies the files and writes it again")
            self.files = dict(obj.get("files", {}))

    def get(self, path: str) -> dict[str, Any] | None:
        """The record of ``path`` (relative to the folder), or ``None``."""
        with self._lock:
            rec = self.files.get(path)
            return dict(rec) if isinstance(rec, dict) else None

    def record(self, path: str, url: str, size: int, sha256: str) -> None:
        """Record a completed file and rewrite the manifest atomically."""
        with self._lock:
            self.files[path] = {"url": url, "size": size, "sha256": sha256,
                                "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_json(self.path, {"version": 1, "files": dict(sorted(self.files.items()))})

    def forget(self, path: str) -> None:
        """Drop the record of ``path`` (its file is gone or bad) and rewrite the manifest."""
        with self._lock:
            if self.files.pop(path, None) is not None:
                atomic_write_json(self.path, {"version": 1, "files": dict(sorted(self.files.items()))})
