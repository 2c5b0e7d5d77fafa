"""``llavamed data synth``: write the synthetic medical-flavoured VQA set (see llavamed_core.data.synth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import _console
from .._options import JsonOpt, SeedOpt
from . import app


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (train.json, test.json, align.json, instruct.json, images/).")],
    n: Annotated[int, typer.Option("--n", help="Training images (each gives 2-3 questions).")] = 600,
    n_test: Annotated[int, typer.Option("--n-test", help="Test images.")] = 150,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Write a synthetic, learnable medical VQA set built on real sample images (offline)."""
    from llavamed_core.data.synth import SynthConfig, make_synthetic_vqa

    with _console.progress() as cb:
        res = make_synthetic_vqa(SynthConfig(out=out, n_train=n, n_test=n_test, size=size, seed=seed), cb)
    output = _console.Output(json_out)
    output.result({k: str(v) if isinstance(v, Path) else v for k, v in res.__dict__.items()})
    output.table("data synth", ["file", "records", "what"], [
        [str(res.train), res.train_records, "VQA train (one question per record)"],
        [str(res.test), res.test_records, f"VQA test ({res.closed_test} closed, {res.open_test} open)"],
        [str(res.align), n, "alignment captions"],
        [str(res.instruct), n, "multi-turn instruct conversations"],
        [str(res.out / "images"), res.images, "images"],
    ])
