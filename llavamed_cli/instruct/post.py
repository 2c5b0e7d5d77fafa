"""``llavamed instruct post``: turn raw generations into a training conversation file.

Example::

    llavamed instruct post --input gen.jsonl --output llava_med_instruct.json --seed 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import _console
from .._options import JsonOpt, SeedOpt
from . import app


@app.command("post")
def post(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Generations from `instruct gen` (JSONL or a JSON array).")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="Conversation file to write (JSON array, with domain).")],
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Split generations into turns, filter refusals and source leaks, place <image>; print counts per rule."""
    from llavamed_core.instruct import PostConfig, postprocess_generations

    stats = postprocess_generations(PostConfig(input=input_path, output=output_path, seed=seed))
    out = _console.Output(json_out)
    out.result(stats.to_dict())
    rows = [["samples in", stats.samples_in], ["kept", stats.kept],
            ["  of which with leak phrases stripped", stats.kept_with_strips],
            ["leak phrases stripped", stats.phrases_stripped], ["rounds kept", stats.rounds_kept]]
    rows += [[f"rounds dropped: {k}", v] for k, v in sorted(stats.rounds_dropped.items())]
    rows += [[f"samples dropped: {k}", v] for k, v in sorted(stats.samples_dropped.items())]
    rows += [["<image> before / after the question", f"{stats.image_before} / {stats.image_after}"],
             ["output", str(output_path)]]
    out.table("instruct post", ["rule", "count"], rows)
