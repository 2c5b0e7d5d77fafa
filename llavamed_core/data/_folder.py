"""Folder-level guards shared by ``data download`` and ``data extract``.

- :func:`locked_folder` holds an exclusive ``flock`` on the output folder itself for the length of
  a run, so two runs never write the same ``.part`` files or images (the lock goes away with the
  process, even after SIGKILL, and leaves no file behind).
- :func:`remove_stale_temporaries` deletes the temporary files (``.<name>.<random>.tmp``, as
  :func:`llavamed_core.io.atomic_write` names them) that a killed run left in a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

__all__ = ["locked_folder", "remove_stale_temporaries"]


@contextlib.contextmanager
def locked_folder(path: Path, command: str, option: str) -> Iterator[None]:
    """Hold an exclusive lock on folder ``path`` while the block runs.

    Args:
        path: an existing folder.
        command: the command named in the error (``llavamed data extract``).
        option: the option that chose the folder (``--out``), named in the hint.

    Raises:
        ConfigError: another process holds the lock.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{path}: another `{command}` is writing to this folder",
                              f"wait for it to finish, or choose another {option}") from None
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, pattern: str = ".*.tmp") -> int:
    """Delete files matching ``pattern`` directly in ``folder``; returns how many.

    Only call this while holding :func:`locked_folder`, so no live run's file is taken.
    """
    n = 0
    for p in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
