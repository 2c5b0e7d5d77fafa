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


@app.command("merge-lora")
def merge_lora_command(
    adapter: Annotated[Path, typer.Option("--adapter", help="PEFT LoRA adapter directory (ours, or from the original LLaVA LoRA scripts).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    base: Annotated[Optional[Path], typer.Option("--base", help="Base Llava checkpoint (default: the adapter's base_model_name_or_path).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 500MB, 2GB.")] = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge a LoRA adapter into its base: a checkpoint that loads without PEFT."""
    from dataclasses import asdict

    from llavamed_core.model.merge_lora import MergeLoraConfig, merge_lora
    from llavamed_core.model.shards import parse_size

    from llavamed_core.io import check_out_not_overlapping

    check_out_not_overlapping(out, [("--adapter", adapter), ("--base", base)])
    cfg = MergeLoraConfig(adapter=adapter, base=base, out=out, overwrite=overwrite,
                          max_shard_bytes=parse_size(max_shard_size))
    with _console.progress() as cb:
        result = merge_lora(cfg, progress=cb)
    if json_out:
        _console.print_json(asdict(result))
        return
    _console.print_table("weights merge-lora", ["field", "value"],
                         [["out", result.out], ["base", result.base], ["adapter keys", result.key_format],
                          ["weights merged (W + s·B·A)", result.merged],
                          ["weights replaced (saved whole)", result.replaced], ["tensors", result.tensors],
                          ["seconds", round(result.seconds, 2)]])
