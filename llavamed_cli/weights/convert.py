"""``llavamed weights convert``: original LLaVA-Med v1 / v1.5 checkpoints → standard HF Llava.

Run: ``llavamed weights convert llava-med-v1.5-mistral-7b --out llava-med-v1.5-hf``
(v1: add ``--vision clip-vit-large-patch14``, its tower is not inside the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt
from . import app


@app.command("convert")
def convert_command(
    src: Annotated[Path, typer.Argument(help="Original LLaVA-Med checkpoint directory (v1 or v1.5).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (a standard HF Llava checkpoint).")],
    vision: Annotated[Optional[Path], typer.Option("--vision", help="Local CLIP directory: the tower for v1 (required); the CLIP config and preprocessing for v1.5 (optional).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 500MB, 2GB.")] = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert an original LLaVA-Med checkpoint to a standard Hugging Face Llava checkpoint."""
    from dataclasses import asdict

    from llavamed_core.model.convert import ConvertConfig, convert_checkpoint
    from llavamed_core.model.shards import parse_size

    from llavamed_core.io import check_out_not_overlapping

    check_out_not_overlapping(out, [("SRC", src), ("--vision", vision)])
    cfg = ConvertConfig(src=src, out=out, vision=vision, overwrite=overwrite,
                        max_shard_bytes=parse_size(max_shard_size))
    with _console.progress() as cb:
        result = convert_checkpoint(cfg, progress=cb)
    if json_out:
        _console.print_json(asdict(result))
        return
    _console.print_table("weights convert", ["field", "value"],
                         [["layout found", f"{result.layout}: {result.description}"], ["out", result.out],
                          ["text model", result.text_model_type], ["projector", result.projector],
                          ["image tokens", result.image_tokens], ["tensors", result.tensors],
                          ["shards", result.shards], ["seconds", round(result.seconds, 2)]])
    _console.print_table("what was done", ["step"], [[a] for a in result.actions])
