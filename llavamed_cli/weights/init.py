"""``llavamed weights init``: write a ready checkpoint from a preset, or compose one from local models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt, SeedOpt
from . import app


@app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    preset: Annotated[Optional[str], typer.Option(help="Build a randomly initialised model from a preset (tiny, llava-med-v1, llava-med-v1.5).")] = None,
    llm: Annotated[Optional[Path], typer.Option(help="Local causal LM directory to compose from (e.g. Vicuna, Mistral-Instruct).")] = None,
    vision: Annotated[Optional[Path], typer.Option(help="Local CLIP vision model directory to compose from.")] = None,
    projector: Annotated[str, typer.Option(help="Projector when composing: linear (v1) or mlp2x_gelu (v1.5).")] = "mlp2x_gelu",
    template: Annotated[str, typer.Option(help="Conversation template when composing: v1, v1.5 or tiny.")] = "v1.5",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write an untrained Llava checkpoint: from a preset, or from a local LLM + CLIP."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.model.compose import compose_llava

    if (preset is None) == (llm is None and vision is None):
        raise ConfigError("give either --preset or both --llm and --vision",
                          "e.g. `llavamed weights init --preset tiny --out ckpt/tiny`")
    if preset is not None:
        model, processor = build_from_preset(preset, seed=seed)
        source = f"preset {preset}"
    else:
        if llm is None or vision is None:
            raise ConfigError("composing needs both --llm and --vision")
        model, processor = compose_llava(llm, vision, projector=projector, template=template, seed=seed)
        source = f"{llm} + {vision}"
    save_checkpoint(model, processor, out, overwrite=overwrite)
    n = sum(p.numel() for p in model.parameters())
    result = {"out": str(out), "source": source, "parameters": n,
              "image_tokens": model.config.image_seq_length,
              "projector": model.config.projector_hidden_act}
    if json_out:
        _console.print_json(result)
    else:
        _console.print_table("weights init", ["checkpoint", "from", "parameters", "image tokens", "projector"],
                             [[str(out), source, n, result["image_tokens"], result["projector"]]])
