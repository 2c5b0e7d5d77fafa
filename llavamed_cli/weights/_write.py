"""What the commands that write a checkpoint share (convert, merge-lora, apply-delta, make-delta):
the ``--max-shard-size`` option and the run around the core writer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .. import _console

ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 500MB, 2GB.")]


def write_checkpoint(run: Callable[..., Any], config_type: type, *, out: Path,
                     inputs: list[tuple[str, Optional[Path]]], max_shard_size: str, overwrite: bool,
                     json_out: bool, **options: Any) -> Any:
    """Check ``--out`` against the inputs, build the core's options, run the writer with a progress bar.

    Args:
        run: the core function (``convert_checkpoint``, ``merge_lora``, ...).
        config_type: its options class (a :class:`llavamed_core.model.shards.WriteOptions`).
        out: ``--out``.
        inputs: ``(flag, path)`` of every input, which ``--out`` must not overlap.
        max_shard_size: ``--max-shard-size`` as typed.
        overwrite: ``--overwrite``.
        json_out: ``--json``: print the result as JSON here.
        options: the command's own options.

    Returns:
        The result, for the command's tables; ``None`` when it was printed as JSON.
    """
    from dataclasses import asdict

    from llavamed_core.io import check_out_not_overlapping
    from llavamed_core.model.shards import parse_size

    check_out_not_overlapping(out, inputs)
    cfg = config_type(out=out, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size), **options)
    with _console.progress() as cb:
        result = run(cfg, progress=cb)
    output = _console.Output(json_out)
    output.result(asdict(result))
    return None if output.json_mode else result
