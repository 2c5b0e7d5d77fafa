"""``llavamed weights merge-lora``: fold a LoRA adapter into a standalone checkpoint.

Run: ``llavamed weights merge-lora --adapter runs/finetune-lora --out ckpt/merged``
(``--base DIR`` when the adapter's recorded base is not a local directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt
from . import app
from ._write import ShardOpt, write_checkpoint


@app.command("merge-lora")
def merge_lora_command(
    adapter: Annotated[Path, typer.Option("--adapter", help="PEFT LoRA adapter directory (ours, or from the original LLaVA LoRA scripts; LoRA, rsLoRA or DoRA).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    base: Annotated[Optional[Path], typer.Option("--base", help="Base Llava checkpoint (default: the adapter's base_model_name_or_path).")] = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge a LoRA adapter into its base: a checkpoint that loads without PEFT."""
    from llavamed_core.model.merge_lora import MergeLoraConfig, merge_lora

    result = write_checkpoint(merge_lora, MergeLoraConfig, out=out, inputs=[("--adapter", adapter), ("--base", base)],
                              max_shard_size=max_shard_size, overwrite=overwrite, json_out=json_out,
                              adapter=adapter, base=base)
    if result is None:
        return
    _console.print_table("weights merge-lora", ["field", "value"],
                         [["out", result.out], ["base", result.base], ["adapter keys", result.key_format],
                          ["weights merged (PEFT's merge)", result.merged],
                          ["weights replaced (saved whole)", result.replaced], ["tensors", result.tensors],
                          ["seconds", round(result.seconds, 2)]])
