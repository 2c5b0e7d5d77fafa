"""Load a pickle that may only hold plain data: lists, dicts, tuples, sets, strings, numbers.

PathVQA's question files are pickles, and loading a pickle with :func:`pickle.load` runs whatever
code the file names (``__reduce__`` → ``os.system`` and friends). :func:`load_plain_pickle` uses an
unpickler whose ``find_class`` refuses every global except the constructors of plain built-in
containers and scalars, so a file that tries to import anything else is refused before any of its
code can run.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["load_plain_pickle", "ALLOWED_GLOBALS"]

ALLOWED_GLOBALS = {
    # Protocol 0-2 pickles build sets, frozensets and bytes by calling these types.
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
    ("builtins", "tuple"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "complex"),
    ("collections", "OrderedDict"),
    # Protocols 0-2 write bytes as _codecs.encode(text, "latin1"): a pure text → bytes function.
    ("_codecs", "encode"),
}
"""(module, name) pairs a plain-data pickle may name; anything else is refused."""


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        # Protocols 0-2 name the built-ins module by its Python 2 name.
        module = "builtins" if module == "__builtin__" else module
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle API
        raise _RefusedGlobal("<persistent id>", repr(pid)[:40])


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """Load ``path`` if it holds plain data only; refuse it otherwise.

    Args:
        path: the pickle file.

    Returns:
        The unpickled object (lists, dicts, tuples, sets, strings, bytes, numbers, ``None``).

    Raises:
        DataError: the file is missing, is not a pickle, is truncated, or names any other global
            (a class, a function: the kind of pickle that can run code when loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found", "check --src")
    data = path.read_bytes()
    try:
        # encoding="utf-8": Python 2 pickles store str as bytes; PathVQA's text is UTF-8.
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"{path}: refused to load: the pickle names '{exc.module}.{exc.name}', which is not "
            "plain data (a pickle like this can run code when it is loaded)",
            "only lists/dicts of strings and numbers are accepted; use the Parquet release, or "
            "convert the file to JSON with a trusted tool") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, UnicodeDecodeError,
            IndexError, KeyError, AttributeError, OverflowError) as exc:
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})",
                        "the file may be truncated or not a pickle; download it again") from None
