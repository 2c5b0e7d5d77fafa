"""``llavamed weights apply-delta`` and ``make-delta``: LLaVA-Med delta weights, streamed.

Run: ``llavamed weights apply-delta --base LLAMA-7B --delta llava-med-7b-delta --out llava-med-7b``
(add ``--to-hf --vision clip-vit-large-patch14`` for a standard Hugging Face Llava checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt
from . import app
from ._write import ShardOpt, write_checkpoint

DtypeCastOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Cast both inputs to float16, bfloat16 or float32 first (the original tool used float16). "
                    "Default: keep the stored dtypes, which must match.")]


def _render(result) -> None:
    if result is None:  # printed as JSON
        return
    if result.notes:
        for note in result.notes:
            _console.info(note)
    if result.inexact_elements:
        _console.warn(f"{result.inexact_elements:,} elements in {len(result.inexact_tensors)} tensors "
                      f"(e.g. {result.inexact_tensors[0]}) cannot be reached exactly as base + delta in "
                      "their dtype; apply-delta will give the nearest reachable values (see README)")
    rows = [["out", result.out], ["tensors written", result.tensors],
            ["combined with the base", result.combined],
            ["taken as stored (no base)", ", ".join(result.taken_as_stored) or "-"],
            ["extra rows taken as stored", ", ".join(f"{k} +{v}" for k, v in result.extra_rows.items()) or "-"],
            ["base-only buffers dropped", len(result.dropped)], ["shards", result.shards],
            ["bytes", result.bytes], ["seconds", round(result.seconds, 2)]]
    if result.mode == "make":
        rows.insert(5, ["elements not reachable exactly", result.inexact_elements])
    _console.print_table(f"weights {result.mode}-delta", ["field", "value"], rows)
    if result.convert is not None:
        _console.print_table(f"converted: {result.convert.layout}", ["what was done"],
                             [[a] for a in result.convert.actions])


@app.command("apply-delta")
def apply_delta_command(
    base: Annotated[Path, typer.Option("--base", help="Base model directory (LLaMA-7B in Hugging Face format for LLaVA-Med v1).")],
    delta: Annotated[Path, typer.Option("--delta", help="Delta directory (e.g. microsoft/llava-med-7b-delta).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    to_hf: Annotated[bool, typer.Option("--to-hf", help="Write a standard Hugging Face Llava checkpoint (see `weights convert`).")] = False,
    vision: Annotated[Optional[Path], typer.Option("--vision", help="CLIP directory for --to-hf (the v1 vision tower).")] = None,
    dtype: DtypeCastOpt = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Add a delta to its base model, tensor by tensor, in constant memory."""
    from llavamed_core.model.delta import ApplyDeltaConfig, apply_delta

    _render(write_checkpoint(apply_delta, ApplyDeltaConfig, out=out,
                             inputs=[("--base", base), ("--delta", delta), ("--vision", vision)],
                             max_shard_size=max_shard_size, overwrite=overwrite, json_out=json_out,
                             base=base, delta=delta, dtype=dtype, to_hf=to_hf, vision=vision))


@app.command("make-delta")
def make_delta_command(
    base: Annotated[Path, typer.Option("--base", help="Base model directory.")],
    target: Annotated[Path, typer.Option("--target", help="Full model directory (same tensor names as the base).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the delta.")],
    dtype: DtypeCastOpt = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write target minus base: the exact inverse of apply-delta."""
    from llavamed_core.model.delta import MakeDeltaConfig, make_delta

    _render(write_checkpoint(make_delta, MakeDeltaConfig, out=out, inputs=[("--base", base), ("--target", target)],
                             max_shard_size=max_shard_size, overwrite=overwrite, json_out=json_out,
                             base=base, target=target, dtype=dtype))
