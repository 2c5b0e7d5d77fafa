"""Map errors to one-line messages and exit codes (STYLE.md "Errors and output").

Known errors (:class:`LlavamedError`) print ``Error:``/``Hint:`` and exit 1; usage errors exit 2
(Typer); Ctrl-C exits 130; anything unexpected prints one line and exits 1.
``LLAVAMED_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

from llavamed_core.errors import LlavamedError

from . import _console


def _debug() -> bool:
    return os.environ.get("LLAVAMED_DEBUG", "") not in ("", "0", "false")


class LlavamedGroup(TyperGroup):
    """Root command group whose ``invoke`` turns exceptions into one-line errors."""

    def invoke(self, ctx: Any) -> Any:  # noqa: D102 - documented on the class
        # Our own progress display and one-line errors replace transformers' tqdm bars and
        # advisory warnings (set before anything imports transformers; LLAVAMED_DEBUG keeps them).
        if not _debug():
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, BrokenPipeError):
            raise
        except LlavamedError as exc:
            if _debug():
                raise
            _console.print_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            _console.print_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            # Click/Typer usage errors carry their own exit code and formatting.
            if hasattr(exc, "exit_code") and hasattr(exc, "show"):
                raise
            if _debug():
                raise
            if isinstance(exc, FileNotFoundError):
                _console.print_error(f"{exc.filename or exc}: file not found", "check the path")
            elif isinstance(exc, PermissionError):
                _console.print_error(f"{exc.filename or exc}: permission denied",
                                     "check the file's permissions or choose another path")
            elif isinstance(exc, OSError) and exc.errno == 28:
                _console.print_error(f"no space left on device ({exc.filename or ''})",
                                     "free some disk space and rerun; the job resumes")
            elif isinstance(exc, UnicodeDecodeError):
                _console.print_error(f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                     "save the file as UTF-8 (a UTF-16 or binary file cannot be read)")
            elif isinstance(exc, RecursionError):
                _console.print_error("an input is nested too deeply to read",
                                     "records are flat JSON objects; is this the right file?")
            else:
                _console.print_error(f"unexpected {type(exc).__name__}: {exc}",
                                     "rerun with LLAVAMED_DEBUG=1 to see the traceback, and "
                                     "report it")
            raise typer.Exit(1) from None
