"""Typed errors: the only exceptions the CLI maps to one-line messages.

Every error carries a one-line ``message`` (what went wrong, naming the file, record and field
where there is one) and an optional ``hint`` (what to do next). The CLI prints
``Error: <message>`` and ``Hint: <hint>`` and exits 1.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "LlavamedError",
    "ConfigError",
    "DataError",
    "ModelError",
    "NetworkError",
    "LLMError",
    "TrainingError",
    "DependencyError",
    "StorageError",
    "data_error",
    "did_you_mean",
]


class LlavamedError(Exception):
    """Base class of every error llavamed raises on purpose.

    Args:
        message: one line saying what went wrong (file, record, field where relevant).
        hint: one line saying what to do about it, or ``None``.
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ConfigError(LlavamedError):
    """A bad option, config file or combination of options."""


class DataError(LlavamedError):
    """A data file that does not follow its format (file, record, field named)."""


class ModelError(LlavamedError):
    """A checkpoint that is missing, incomplete or of an unknown layout."""


class NetworkError(LlavamedError):
    """A download or HTTP request that failed for good (after retries)."""


class LLMError(LlavamedError):
    """An LLM endpoint that refused or failed (auth, quota, repeated errors)."""


class TrainingError(LlavamedError):
    """A training run that could not start or finish."""


class DependencyError(LlavamedError):
    """An optional dependency or external program that is not installed."""


class StorageError(LlavamedError):
    """An output that could not be written: the disk (or quota) is full.

    Attributes:
        path: the destination that was being written.
        what: ``"no space left on device"`` or ``"disk quota exceeded"``.
    """

    path: str = ""
    what: str = "no space left on device"


def data_error(path: object, record: object | None, field: str | None, problem: str,
               hint: str | None = None) -> DataError:
    """Build a :class:`DataError` whose message names file, record and field.

    Args:
        path: the file the problem is in.
        record: the record id (or line number, as ``"line 12"``), or ``None``.
        field: the field name, or ``None``.
        problem: what is wrong, e.g. ``"expected exactly one <image>, found 2"``.
        hint: what to do about it.

    Returns:
        The error, to be raised by the caller.
    """
    where = str(path)
    if record is not None:
        where += f", record {record}"
    if field:
        where += f", field '{field}'"
    return DataError(f"{where}: {problem}", hint)


def did_you_mean(name: str, choices: Iterable[str], known: str = "choose one of") -> str:
    """A hint for a misspelt name: ``did you mean 'slake'? choose one of: vqa-rad, slake, pathvqa``."""
    import difflib

    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    tail = f"{known}: {', '.join(choices)}"
    return f"did you mean '{close[0]}'? {tail}" if close else tail
