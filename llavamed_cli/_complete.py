"""Tab completion of options that take a name or a file (``--deepspeed zero3|FILE.json``,
``--dataset vqa-rad|FILE``): the names first, then matching files."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable


def names_or_files(names: tuple[str, ...], suffixes: tuple[str, ...] = ()) -> Callable[[str], list[str]]:
    """A Typer ``autocompletion`` function: ``names`` starting with the typed text, then paths
    (folders, and files ending with one of ``suffixes``; any file when none are given)."""

    def complete(incomplete: str) -> list[str]:
        out = [n for n in names if n.startswith(incomplete)]
        for path in sorted(glob.glob(os.path.expanduser(incomplete) + "*")):
            if os.path.isdir(path):
                out.append(path + "/")
            elif not suffixes or path.endswith(suffixes):
                out.append(path)
        return out

    return complete


DEEPSPEED = names_or_files(("zero2", "zero3"), (".json",))
DATASETS = names_or_files(("vqa-rad", "slake", "pathvqa"), (".json", ".jsonl"))
