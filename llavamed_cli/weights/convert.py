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
from ._write import ShardOpt, write_checkpoint


@app.command("convert")
def convert_command(
    src: Annotated[Path, typer.Argument(help="Original LLaVA-Med checkpoint directory (v1 or v1.5).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (a standard HF Llava checkpoint).")],
    vision: Annotated[Optional[Path], typer.Option("--vision", help="Local CLIP directory: the tower for v1 (required); the CLIP config and preprocessing for v1.5 (optional).")] = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert an original LLaVA-Med checkpoint to a standard Hugging Face Llava checkpoint."""
    from llavamed_core.model.convert import ConvertConfig, convert_checkpoint

    result = write_checkpoint(convert_checkpoint, ConvertConfig, out=out, inputs=[("SRC", src), ("--vision", vision)],
                              max_shard_size=max_shard_size, overwrite=overwrite, json_out=json_out,
                              src=src, vision=vision)
    if result is None:
        return
    _console.print_table("weights convert", ["field", "value"],
                         [["layout found", f"{result.layout}: {result.description}"], ["out", result.out],
                          ["text model", result.text_model_type], ["projector", result.projector],
                          ["image tokens", result.image_tokens], ["tensors", result.tensors],
                          ["shards", result.shards], ["seconds", round(result.seconds, 2)]])
    _console.print_table("what was done", ["step"], [[a] for a in result.actions])
