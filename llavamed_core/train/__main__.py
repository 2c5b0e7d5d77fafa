"""``python -m llavamed_core.train CONFIG [--result FILE]``: one process of a training run.

What ``llavamed train … --nproc/--gpus N`` (and ``--nnodes``) starts in every process under
torchrun (see :mod:`llavamed_core.launch`); also usable by hand::

    torchrun --nproc_per_node 8 -m llavamed_core.train run.yaml

``CONFIG`` is a YAML/JSON file of :class:`~llavamed_core.train.TrainConfig` fields (and
TrainingArguments fields), the shape ``--config`` reads, with ``stage`` and the four paths in it.
Rank 0 prints progress as plain lines and errors as ``Error:``/``Hint:`` on stderr, and writes
the :class:`~llavamed_core.train.TrainResult` as JSON to ``--result FILE``. Exit status: 0, 1 for a
reported error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

from ..launch import redirect_rank_output
from ..progress import ProgressEvent


class _PlainProgress:
    """Progress as plain lines on stderr, at most one per task every ``interval`` seconds (rank 0)."""

    def __init__(self, interval: float = 5.0):
        self._interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        if not (ev.finished or now - self._last.get(ev.task, 0.0) >= self._interval):
            return
        self._last[ev.task] = now
        total = f"/{_fmt(ev.total)}" if ev.total else ""
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in ev.info.items())
        sys.stderr.write(f"[{ev.task}] {_fmt(ev.done)}{total} {ev.unit}  {extra}".rstrip() + "\n")
        sys.stderr.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def load_train_config(path: str) -> Any:
    """The :class:`TrainConfig` in a YAML/JSON file.

    Raises:
        ConfigError: the file is missing, not a mapping, or lacks ``stage`` or a path.
    """
    from ..errors import ConfigError
    from .config import TrainConfig, load_config_file, merge_settings

    settings = merge_settings({}, load_config_file(path), path)
    missing = [k for k in ("stage", "model", "data", "images", "out") if settings.get(k) is None]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}", "a training config names the stage and the "
                          "model, data, images and out paths (see a run's train_config.json)")
    return TrainConfig(**settings)


def _error(message: str, hint: str | None) -> None:
    sys.stderr.write(f"Error: {message}\n" + (f"Hint: {hint}\n" if hint else ""))
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Train the configuration named on the command line; returns the exit status."""
    redirect_rank_output()
    parser = argparse.ArgumentParser(prog="python -m llavamed_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML/JSON training configuration")
    parser.add_argument("--result", help="write rank 0's result here as JSON")
    args = parser.parse_args(argv)

    from ..errors import LlavamedError

    debug = os.environ.get("LLAVAMED_DEBUG", "") not in ("", "0", "false")
    rank0 = os.environ.get("RANK", "0") in ("", "0")
    if not debug:
        import warnings

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # stdout is not this program's: whatever libraries print there goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            cfg = load_train_config(args.config)
            if cfg.device == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
            from transformers.utils import logging as hf_logging

            from . import train

            hf_logging.disable_progress_bar()
            result = train(cfg, progress=_PlainProgress() if rank0 else None)
    except LlavamedError as exc:
        if debug:
            raise
        _error(exc.message, exc.hint)  # rank 0's on the console, the others' in their logs
        if not rank0:
            time.sleep(10)  # rank 0 reports (every rank meets the same data errors): give it time to
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    except Exception as exc:  # one line, not a traceback per rank
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__} in the training process of rank {os.environ.get('RANK', '0')}: {exc}",
               "rerun with LLAVAMED_DEBUG=1 to see the traceback, and report it")
        return 1
    if rank0 and args.result:
        from ..io import atomic_write_json

        atomic_write_json(args.result, result.to_dict())
    return 0


if __name__ == "__main__":
    from ..quick_exit import freeze_objects_at_exit

    freeze_objects_at_exit()
    sys.exit(main())
