"""``llavamed data validate``: check a conversation file and summarise its problems by kind."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt
from . import app


@app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="Conversation file (JSON array or JSONL).")],
    images: Annotated[Optional[Path], typer.Option(help="Image folder; checks each image exists and decodes.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint whose template and image tokens set the length check.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit (default: the model's context length).")] = None,
    text_only: Annotated[bool, typer.Option(help="Records need no image.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check every record: schema, one <image>, roles, images decode, length; exit 1 on any problem."""
    from llavamed_core.data.validate import processor_and_context_length, validate_conversations

    processor, ctx = (None, None)
    if model is not None:
        processor, ctx = processor_and_context_length(model)
    with _console.progress() as cb:
        rep = validate_conversations(file, images, processor=processor, max_length=max_length or ctx,
                                     require_image=not text_only, progress=cb)
    out = _console.Output(json_out)
    d = rep.to_dict()
    out.result(d)
    rows = [[kind, count, d["examples"][kind][0]["message"]] for kind, count in rep.by_kind().items()]
    out.table(f"{file}: {rep.records:,} records, {rep.ok:,} ok",
              ["problem", "records", "first example"], rows or [["none", 0, "-"]])
    if rep.max_tokens is not None:
        _console.info(f"longest record: {rep.max_tokens} tokens (limit {rep.max_length})")
    if rep.problems:
        _console.print_error(f"{file}: {len(rep.problems)} problem(s) in {rep.records - rep.ok} record(s)",
                             "fix the records listed above (--json lists up to 20 per kind)")
        raise typer.Exit(1)
