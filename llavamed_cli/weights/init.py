"""``llavamed weights init``: write a ready checkpoint from a preset, or compose one from local models."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt, SeedOpt
from . import app

# The model presets, as a real choice (help lists them, Tab completes them). Kept in step with
# llavamed_core.model.presets.PRESETS by a test; not imported from there so --help stays light.
Preset = Enum("Preset", {n: n for n in ("tiny", "llava-med-v1", "llava-med-v1.5")}, type=str)


@app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    preset: Annotated[Optional[Preset], typer.Option(help="Build a randomly initialised model from a preset (tiny: a CPU smoke-test model; for its training settings see `llavamed train align --help`).")] = None,
    shrink: Annotated[bool, typer.Option("--shrink", help="With --preset: the preset's exact layout, template, preprocessing and image-token count at tiny sizes (runs on a CPU in seconds).")] = False,
    llm: Annotated[Optional[Path], typer.Option(help="Causal LM to compose from (e.g. Vicuna, Mistral-Instruct): a directory or a Hub id org/name[@revision].")] = None,
    vision: Annotated[Optional[Path], typer.Option(help="CLIP vision model to compose from: a directory or a Hub id.")] = None,
    projector: Annotated[str, typer.Option(help="Projector when composing: linear (v1) or mlp2x_gelu (v1.5).")] = "mlp2x_gelu",
    template: Annotated[str, typer.Option(help="Conversation template when composing: v1, v1.5 or tiny.")] = "v1.5",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write an untrained Llava checkpoint: from a preset, or from a local LLM + CLIP."""
    preset = None if preset is None else Preset(preset).value
    from llavamed_core.errors import ConfigError
    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.model.compose import compose_llava

    from llavamed_core.io import check_out_not_overlapping

    check_out_not_overlapping(out, [("--llm", llm), ("--vision", vision)])
    if (preset is None) == (llm is None and vision is None):
        raise ConfigError("give either --preset or both --llm and --vision",
                          "e.g. `llavamed weights init --preset tiny --out ckpt/tiny`")
    if shrink and preset is None:
        raise ConfigError("--shrink needs --preset", "e.g. `llavamed weights init --preset llava-med-v1.5 --shrink --out ckpt/v15-small`")
    if preset is not None:
        from llavamed_core.model.presets import shrink_preset

        model, processor = build_from_preset(shrink_preset(preset) if shrink else preset, seed=seed)
        source = f"preset {preset}" + (" (shrunk)" if shrink else "")
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
    output = _console.Output(json_out)
    output.result(result)
    output.table("weights init", ["checkpoint", "from", "parameters", "image tokens", "projector"],
                 [[str(out), source, n, result["image_tokens"], result["projector"]]])
